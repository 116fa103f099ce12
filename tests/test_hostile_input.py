"""Hostile input: every case one clear line (exit 2 from the CLI), nothing left behind,
and no code run from a file a user names."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rmtl import checkpoint
from rmtl.cli import main
from rmtl.errors import DataError


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- checkpoints

class _Planted:
    """Unpickling this runs os.system-like code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def _plant(path: Path, marker: Path, wrap=lambda obj: obj) -> Path:
    torch.save(wrap(_Planted(marker)), path)
    assert not marker.exists()
    return path


@pytest.mark.parametrize("wrap", [lambda o: o, lambda o: {"model": {"w": torch.ones(2)}, "extra": o}],
                         ids=["bare", "inside-a-checkpoint"])
def test_a_planted_pickle_is_refused_and_nothing_runs(tmp_path, wrap):
    marker = tmp_path / "pwned.txt"
    bad = _plant(tmp_path / "evil.pt", marker, wrap)
    with pytest.raises(DataError, match="refused") as info:
        checkpoint.load_user_file(bad, "agent checkpoint")
    assert "evil.pt" in str(info.value) and "never code" in str(info.value)
    assert not marker.exists()


def test_every_user_named_checkpoint_path_refuses_the_planted_pickle(tmp_path, capsys):
    """rmtl agent --backbone FILE, strategy.options.checkpoint=FILE and --resume."""
    from rmtl.agents.rmtl_agent import RMTLAgent
    from rmtl.config import load_config
    from rmtl.pipeline import load_backbone

    marker = tmp_path / "pwned.txt"
    bad = _plant(tmp_path / "evil.pt", marker)
    with pytest.raises(DataError, match="refused"):
        RMTLAgent.load(bad)
    with pytest.raises(DataError, match="refused"):
        load_backbone(bad, load_config("quickstart"), spec=None)
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    _plant(run / "train" / "last.pt", marker)
    code = main(["train", "-c", "quickstart", "--run-dir", str(run), "--resume", "train.max_steps=2",
                 "data.synthetic.users=200", "data.synthetic.items=100", "--no-progress"])
    assert code == 2
    _one_error_line(capsys, "last.pt", "refused")
    assert not marker.exists()


def test_old_style_checkpoints_with_numpy_states_still_load(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "rng": checkpoint.rng_state(),
             "plain": {"prev": np.array([0.5, 0.25]), "n": np.int64(3), "f": np.float32(1.5)}}
    path = checkpoint.save_atomic(state, tmp_path / "last.pt")
    back = checkpoint.load_user_file(path, "checkpoint")
    np.testing.assert_array_equal(back["plain"]["prev"], state["plain"]["prev"])
    checkpoint.set_rng_state(back["rng"])
    assert back["plain"]["n"] == 3


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"],
                         ids=["empty", "text", "truncated"])
def test_corrupt_checkpoint_is_one_data_error(tmp_path, content):
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="best.pt"):
        checkpoint.load_user_file(path, "best checkpoint")


def test_truncated_real_checkpoint_is_one_data_error(tmp_path):
    path = checkpoint.save_atomic({"model": {"w": torch.randn(100, 100)}}, tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="last.pt"):
        checkpoint.load_user_file(path, "checkpoint to resume from")
