import json

import numpy as np
import pytest
import torch
from torch import nn

from rmtl.agents.rmtl_agent import RMTLAgent
from rmtl.cli import main
from rmtl.config import load_config
from rmtl.envs.synthetic_log import random_session_log
from rmtl.pipeline import comparison_table, run_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


FAST = ["train.epochs=1", "train.batch_size=128", "train.device=cpu", "train.progress=false",
        "agent.steps=40", "agent.batch_size=64", "agent.device=cpu", "agent.log_every=10"]


class TinyBackbone(nn.Module):
    """A user's own module: only forward(sparse, dense) -> logits [B, K]."""

    def __init__(self, spec):
        super().__init__()
        from rmtl.backbones.layers import MLP, FeatureEmbedding

        self.features = FeatureEmbedding(spec, 8)
        self.head = MLP(self.features.output_dim, [16], out_dim=spec.num_tasks)

    def forward(self, sparse, dense):
        return self.head(self.features(sparse, dense))


def tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"]) | set(acc.Tags()["histograms"])


def test_pipeline_end_to_end_with_a_users_module(tmp_path):
    log = random_session_log(200, seed=0)
    cfg = load_config(None, FAST + ["agent.ew_control=true", "agent.actor_update=true", "train.log_every=2"])
    result = run_pipeline(cfg, prepared=log, model=TinyBackbone(log.spec), run_dir=tmp_path, say=lambda s: None)
    assert set(result.before) == set(result.after) == {"ctr", "ctcvr"}
    for task in ("ctr", "ctcvr"):
        for metric in ("auc", "logloss", "session_logloss"):
            assert np.isfinite(result.after[task][metric]) and np.isfinite(result.before[task][metric])
    lines = result.table.splitlines()
    assert "EW pretrained" in lines[0] and "RMTL fine-tuned" in lines[0] and "EW fine-tuned" in lines[0]
    assert sum(line.startswith(("ctr ", "ctcvr ")) for line in lines) == 12  # 6 metrics x 2 tasks
    saved = json.loads((tmp_path / "pipeline.json").read_text())
    assert saved["after"]["ctr"]["auc"] == pytest.approx(result.after["ctr"]["auc"])
    assert (tmp_path / "comparison.txt").read_text().strip() == result.table.strip()
    # the critics are saved and reload into a working strategy
    agent = RMTLAgent.load(result.agent_path)
    assert agent.spec.tasks == ["ctr", "ctcvr"]
    # TensorBoard: critic TD losses and Q histograms; actor BC term; weights during fine-tuning
    agent_tags = tags(tmp_path / "agent")
    assert {"agent/td_loss/ctr", "agent/td_loss/ctcvr", "agent/actor_bc"} <= agent_tags
    assert any(t.startswith("agent/q/") for t in agent_tags)
    ft_tags = tags(tmp_path / "finetune")
    assert {"weights/ctr", "weights_hist/ctcvr"} <= ft_tags


def test_comparison_table_differences():
    before = {"ctr": {"auc": 0.70, "logloss": 0.50, "session_logloss": 0.52}}
    after = {"ctr": {"auc": 0.71, "logloss": 0.49, "session_logloss": 0.515}}
    table = comparison_table(before, after)
    row = [line for line in table.splitlines() if line.startswith("ctr") and " auc " in line][0]
    assert row.split()[-1] == "+0.0100"


def test_cli_pipeline_then_agent_alone(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "data:\n  source: retailrocket\n  synthetic: {users: 60, items: 40}\n"
        f"  cache_dir: {tmp_path / 'cache'}\n"
        "model:\n  name: mmoe\n"
        f"run_dir: {tmp_path / 'run'}\n"
    )
    assert main(["pipeline", "-c", str(cfg), *FAST, "agent.ew_control=false"]) == 0
    out = capsys.readouterr().out
    assert "RMTL fine-tuned" in out and "session_logloss" in out and "EW fine-tuned" not in out
    best = tmp_path / "run" / "pretrain" / "best.pt"
    assert best.is_file()
    critics = tmp_path / "critics.pt"
    assert main(["agent", "-c", str(cfg), "--backbone", str(best), "--out", str(critics), *FAST]) == 0
    assert critics.is_file()
    assert "critics saved" in capsys.readouterr().out
    # the saved critics drive the rmtl strategy from a config alone
    from rmtl.weighting import build_strategy

    strategy = build_strategy("rmtl", 2, checkpoint=str(critics), lam=0.5)
    assert strategy.lam == 0.5
    # a bad backbone file is one clear error, exit status 2
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"nope": torch.zeros(1)}}, bad)
    assert main(["agent", "-c", str(cfg), "--backbone", str(bad), *FAST]) == 2
    assert "bad.pt" in capsys.readouterr().err
