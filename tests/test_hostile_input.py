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


class _Shell:
    """The classic payload: unpickling calls os.system (a module torch blocks by name)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_calling_os_system_is_refused_with_the_global_named(tmp_path):
    marker = tmp_path / "pwned.txt"
    torch.save({"model": _Shell(marker)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match=r"refused.*system") as info:
        checkpoint.load_user_file(tmp_path / "evil.pt", "backbone checkpoint")
    assert "weights_only" not in str(info.value)  # not torch's advice to turn the safety off
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


# ----------------------------------------------------------------------------- config values and syntax

@pytest.mark.parametrize("override, key, expected", [
    ("train.lr=nan", "train.lr", "finite"),
    ("train.lr=inf", "train.lr", "finite"),
    ("train.lr=0", "train.lr", "> 0"),
    ("train.weight_decay=-1", "train.weight_decay", ">= 0"),
    ("train.grad_clip=-1", "train.grad_clip", "> 0 (or null)"),
    ("train.patience=-2", "train.patience", ">= 0"),
    ("train.eval_batch_size=0", "train.eval_batch_size", ">= 1"),
    ("train.max_steps=0", "train.max_steps", ">= 1"),
    ("train.num_threads=-4", "train.num_threads", ">= 1"),
    ("data.session_gap=-5", "data.session_gap", "> 0"),
    ("data.min_count=0", "data.min_count", ">= 1"),
    ("data.seed=-1", "data.seed", ">= 0"),
    ("seed=-3", "seed", ">= 0"),
    ("data.split_ratios=[0.6,nan,0.4]", "data.split_ratios[1]", "finite"),
    ("agent.lr=inf", "agent.lr", "finite"),
    ("agent.gamma=nan", "agent.gamma", "finite"),
])
def test_numeric_config_fields_are_range_checked(override, key, expected, tmp_path, capsys):
    from rmtl.config import load_config
    from rmtl.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config("quickstart", [override])
    assert info.value.key == key and expected in str(info.value)
    run = tmp_path / "run"
    assert main(["train", "-c", "quickstart", override, "--run-dir", str(run), "--no-progress"]) == 2
    _one_error_line(capsys, key)
    assert not run.exists()  # nothing written for a refused config


@pytest.mark.parametrize("override, expected", [
    ("bcq.lr=nan", "finite"), ("bcq.lr=-1", "> 0"), ("bcq.gamma=1", "< 1"), ("fqe.cql_alpha=-0.1", ">= 0"),
    ("cem.elite_frac=0", "> 0"), ("user_model.l2=-1", ">= 0"), ("behaviour.noise=-0.3", ">= 0"),
])
def test_fusion_config_numbers_are_range_checked(override, expected):
    from rmtl.errors import ConfigError
    from rmtl.fusion.config import load_fusion_config

    with pytest.raises(ConfigError) as info:
        load_fusion_config("fusion", [override])
    assert info.value.key == override.split("=")[0] and expected in str(info.value)


@pytest.mark.parametrize("text, line", [
    ("train:\n  lr: [1, 2\nseed: 0\n", None),
    ("train:\n\tlr: 0.1\n", 2),
    ("train:\n  lr: 0.1\n   epochs: 2\n", 3),
])
def test_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path, capsys, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "-c", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    msg = _one_error_line(capsys, f"{path}:", "YAML syntax error")
    if line is not None:
        assert f"{path}:{line}:" in msg
    assert not (tmp_path / "run").exists()


def test_config_yaml_is_written_only_for_a_run_that_starts(tmp_path, capsys):
    run = tmp_path / "runs" / "a"
    code = main(["train", "-c", "quickstart", "data.data_dir=" + str(tmp_path / "nowhere"),
                 "--run-dir", str(run), "--no-progress"])
    assert code == 2
    _one_error_line(capsys, "nowhere")
    assert not (tmp_path / "runs").exists()
    # a bad backbone option fails inside fit after folders exist: still nothing left
    assert main(["train", "-c", "quickstart", "model.options.bogus=1", "--run-dir", str(run), "--no-progress"]) == 2
    _one_error_line(capsys, "model.options.bogus")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- usage errors

@pytest.mark.parametrize("argv, needle", [
    (["prepare", "--source", "movielens"], "invalid choice: 'movielens'"),
    (["prepare", "--source", "kuairand", "--session-gap", "-5"], "--session-gap"),
    (["prepare", "--source", "kuairand", "--split-ratios", "a,b"], "--split-ratios"),
    (["nosuch"], "invalid choice"),
])
def test_usage_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    _one_error_line(capsys, needle)


# ----------------------------------------------------------------------------- report, cache, temporaries

def test_report_on_a_truncated_metrics_json_is_one_line(tmp_path, capsys):
    fit_dir = tmp_path / "run" / "train"
    fit_dir.mkdir(parents=True)
    (fit_dir / "metrics.json").write_text('{"test": {"ctr": {"auc": 0.7')
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.png")]) == 2
    _one_error_line(capsys, "metrics.json", "not a complete metrics file")
    assert not (tmp_path / "r.png").exists()


def test_cache_entry_missing_a_column_is_rebuilt(tmp_path):
    import pyarrow.parquet as pq

    from rmtl.data.cache import ROWS_FILE
    from rmtl.data.prepare import prepare

    first = prepare("kuairand", cache_dir=tmp_path, synthetic={"users": 60, "items": 80})
    rows = first.cache_path / ROWS_FILE
    table = pq.read_table(rows)
    pq.write_table(table.drop_columns([table.column_names[-1]]), rows)  # a label column gone
    again = prepare("kuairand", cache_dir=tmp_path, synthetic={"users": 60, "items": 80})
    assert not again.from_cache and again.cache_path == first.cache_path
    np.testing.assert_array_equal(again.log.labels, first.log.labels)
    assert prepare("kuairand", cache_dir=tmp_path, synthetic={"users": 60, "items": 80}).from_cache
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # finished and reaped: no process has this id now (barring reuse within ms)


def test_stale_temporaries_of_killed_runs_are_cleaned_on_the_next_run(tmp_path):
    from rmtl.atomic import write_json
    from rmtl.data.prepare import prepare

    dead, live = _dead_pid(), os.getpid()
    out = tmp_path / "run"
    out.mkdir()
    stale_ckpt = out / f".last.pt.p{dead}-abcd1234.tmp"
    live_ckpt = out / f".last.pt.p{live}-efgh5678.tmp"
    stale_ckpt.write_bytes(b"half")
    live_ckpt.write_bytes(b"being written")
    checkpoint.save_atomic({"step": 1}, out / "last.pt")
    assert not stale_ckpt.exists() and live_ckpt.exists()  # a live writer's file is not touched
    stale_json = out / f".metrics.json.p{dead}-x.tmp"
    stale_json.write_text("{")
    write_json(out / "metrics.json", {"a": 1})
    assert not stale_json.exists()

    cache_root = tmp_path / "cache"
    (cache_root / "synthetic").mkdir(parents=True)
    stale_entry = cache_root / f".tmp-p{dead}-kuairand-0123-xyz"
    stale_synth = cache_root / "synthetic" / f".tmp-p{dead}-kuairand-default-xyz"
    old_style = cache_root / "synthetic" / ".tmp-kuairand-default-old"
    for d in (stale_entry, stale_synth, old_style):
        d.mkdir()
        (d / "rows.parquet").write_bytes(b"partial")
    week_ago = os.path.getmtime(old_style) - 7 * 86400
    os.utime(old_style, (week_ago, week_ago))
    prepare("kuairand", cache_dir=cache_root, synthetic={"users": 40, "items": 50})
    assert not stale_entry.exists() and not stale_synth.exists() and not old_style.exists()


def test_disk_full_while_writing_the_cache_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    import rmtl.data.cache as cache

    synth = tmp_path / "raw"
    assert main(["synth", "--schema", "kuairand", "--out", str(synth), "--users", "40", "--items", "50"]) == 0
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.pq, "write_table", full)
    out = tmp_path / "cache"
    assert main(["prepare", "--source", "kuairand", "--data-dir", str(synth), "--out", str(out)]) == 2
    _one_error_line(capsys, str(out), "No space left on device")
    assert [p for p in out.rglob("*")] == []


def test_read_only_output_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code = main(["train", "-c", "quickstart", "--run-dir", str(tmp_path / "ro" / "run"), "train.max_steps=1",
                 "data.synthetic.users=40", "data.synthetic.items=50", "--no-progress"])
    assert code == 2
    _one_error_line(capsys, str(tmp_path / "ro"), "Read-only file system")


# ----------------------------------------------------------------------------- raw files

def _kuairand_release(tmp_path: Path) -> Path:
    from rmtl.data.synth_kuairand import write_kuairand

    root = tmp_path / "kr"
    write_kuairand(root, users=30, items=40, seed=1)
    return root


def _retailrocket_dir(tmp_path: Path) -> Path:
    from rmtl.data.synth_retailrocket import write_retailrocket

    root = tmp_path / "rr"
    write_retailrocket(root, users=40, items=30, seed=1)
    return root


def _census_file(tmp_path: Path, n: int = 40) -> Path:
    from test_census import record

    path = tmp_path / "census-income.test"
    rows = [record(age=20 + i, marital="Never married" if i % 3 else "Divorced",
                   income="50000+." if i % 4 == 0 else "- 50000.") for i in range(n)]
    path.write_text("\n".join(", ".join(r) for r in rows) + "\n")
    return path


def _prepare_fails(capsys, source: str, data: Path, *needles: str, out: Path | None = None) -> None:
    argv = ["prepare", "--source", source, "--data-dir", str(data), "--no-cache"]
    assert main(argv) == 2
    _one_error_line(capsys, *needles)


def _corrupt(path: Path, how: str) -> Path:
    data = path.read_bytes()
    if how == "non-utf8":
        lines = data.split(b"\n")
        lines[2] = lines[2].replace(b",", b",\xff\xfe", 1)  # a Latin-1 byte pair in row 2
        path.write_bytes(b"\n".join(lines))
        return path
    gz = path.with_name(path.name + ".gz")
    if how == "fake-gz":
        gz.write_bytes(data)  # plain text under a .gz name
    else:  # truncated gzip
        blob = gzip.compress(data * 50)
        gz.write_bytes(blob[: len(blob) // 2])
    path.unlink()
    return gz


@pytest.mark.parametrize("how", ["non-utf8", "fake-gz", "truncated-gz"])
@pytest.mark.parametrize("source", ["kuairand", "retailrocket", "census"])
def test_broken_raw_files_are_one_line_naming_the_file(tmp_path, capsys, source, how):
    if source == "kuairand":
        root = _kuairand_release(tmp_path)
        target = root / ("video_features_basic_1k.csv" if how == "non-utf8" else "log_standard_4_08_to_4_21_1k.csv")
        data = root
    elif source == "retailrocket":
        root = _retailrocket_dir(tmp_path)
        target = root / ("item_properties_part1.csv" if how == "non-utf8" else "events.csv")
        data = root
    else:
        target = _census_file(tmp_path)
        data = tmp_path
    broken = _corrupt(target, how)
    needles = [broken.name] + (["UTF-8"] if how == "non-utf8" else [])
    _prepare_fails(capsys, source, data, *needles)


def test_unreadable_file_is_one_line(tmp_path, capsys, monkeypatch):
    """Permissions, simulated (the test may run as root, which reads any file)."""
    import builtins

    import rmtl.data.kuairand as kuairand

    root = _kuairand_release(tmp_path)
    locked = root / "user_features_1k.csv"

    def guarded_open(file, *args, **kwargs):
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(kuairand, "open", guarded_open, raising=False)
    _prepare_fails(capsys, "kuairand", root, "user_features_1k.csv", "Permission denied")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_by_mode_is_one_line(tmp_path, capsys):
    root = _kuairand_release(tmp_path)
    locked = root / "log_standard_4_22_to_5_08_1k.csv"
    locked.chmod(0)
    try:
        _prepare_fails(capsys, "kuairand", root, locked.name)
    finally:
        locked.chmod(0o644)


def test_kuairand_file_with_a_byte_order_mark_is_read(tmp_path):
    from rmtl.data.kuairand import read_kuairand

    root = _kuairand_release(tmp_path)
    plain = read_kuairand(root)
    for f in root.glob("*.csv"):
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    pd.testing.assert_frame_equal(read_kuairand(root).frame, plain.frame)


def test_kuairand_ids_beyond_2_53_stay_distinct(tmp_path):
    from rmtl.data.kuairand import read_kuairand

    root = _kuairand_release(tmp_path)
    log = root / "log_standard_4_08_to_4_21_1k.csv"
    frame = pd.read_csv(log)
    big = 2**53
    frame.loc[frame["user_id"] == frame["user_id"].iloc[0], "user_id"] = big
    frame.loc[frame["user_id"] == frame["user_id"].iloc[-1], "user_id"] = big + 1
    frame.to_csv(log, index=False)
    raw = read_kuairand(root, user_features=[])
    users = set(raw.frame["user"].tolist())
    assert big in users and big + 1 in users  # a float64 round trip would merge them
    assert raw.frame["user"].dtype == np.int64


def test_a_legal_40_mb_property_value_is_accepted(tmp_path):
    from rmtl.data.retailrocket import read_retailrocket

    root = _retailrocket_dir(tmp_path)
    props = root / "item_properties_part2.csv"
    with open(props, "a") as fh:
        fh.write(f"1433221332117,1,description,{'n1 ' * (40 * 1024 * 1024 // 3)}\n")
    raw = read_retailrocket(root)
    assert len(raw.frame) > 0


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_resume_from_a_corrupt_last_pt_is_one_line(tmp_path, capsys, damage):
    run = tmp_path / "run"
    argv = ["train", "-c", "quickstart", "--run-dir", str(run), "train.max_steps=2", "train.epochs=1",
            "data.synthetic.users=60", "data.synthetic.items=40", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    last = run / "train" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x00garbage" * 10)
    assert main(argv + ["--resume"]) == 2
    _one_error_line(capsys, "last.pt")
    assert (run / "config.yaml").exists()  # a resumable run's files stay
