"""Runs a person can find: --run-dir and config.yaml for every run command, default run
names, one TensorBoard axis across the pipeline, no duplicate weight tags, report labels
and seed groups."""

import json
import re
from pathlib import Path

import pytest
import torch

from rmtl.cli import main
from rmtl.config import load_config, save_config
from rmtl.report import collect_metrics, format_table, group_seeds, read_scalars
from rmtl.train import fit

from test_pipeline import FAST
from test_train import small_cfg, tiny_log


@pytest.fixture(scope="module")
def log():
    return tiny_log()


def test_default_run_names_say_model_strategy_and_time():
    cfg = load_config(None, ["model.name=ple", "strategy.name=pcgrad"])
    assert re.fullmatch(r"runs/ple-pcgrad-\d{8}-\d{6}", cfg.run_dir), cfg.run_dir
    cfg = load_config("quickstart", ["strategy.name=uw"])
    assert re.fullmatch(r"runs/quickstart-mmoe-uw-\d{8}-\d{6}", cfg.run_dir), cfg.run_dir


def test_quickstart_logs_more_than_8_points_per_run():
    cfg = load_config("quickstart")
    assert cfg.train.log_every <= 10  # 160 steps of the quickstart -> at least 16 points


def test_pipeline_takes_run_dir_and_writes_config_yaml(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("data:\n  source: retailrocket\n  synthetic: {users: 60, items: 40}\n"
                   f"  cache_dir: {tmp_path / 'cache'}\nmodel:\n  name: mmoe\n")
    run = tmp_path / "mine"
    assert main(["pipeline", "-c", str(cfg), "--run-dir", str(run), *FAST, "train.log_every=2"]) == 0
    saved = load_config(run / "config.yaml")
    assert saved.run_dir == str(run) and saved.strategy.name == "rmtl" and saved.agent.steps == 40
    # one step axis: fine-tuning continues where pretraining ended, the control beside it
    pre = read_scalars(run / "pretrain", prefix="train/loss/")["train/loss/ctr"][0]
    ft = read_scalars(run / "finetune", prefix="train/loss/")["train/loss/ctr"][0]
    pre_steps = json.loads((run / "pretrain" / "metrics.json").read_text())["steps"]
    assert ft[:len(pre)] == [pre_steps + s for s in pre[:len(ft)]] and min(ft) > max(pre)
    # no second copy of the weights under strategy/weight/*
    assert not read_scalars(run / "finetune", prefix="strategy/weight/")
    assert read_scalars(run / "finetune", prefix="weights/")
    # a failed validation writes nothing
    bad = tmp_path / "bad"
    assert main(["pipeline", "-c", str(cfg), "--run-dir", str(bad), "model.name=nosuch"]) == 2
    assert not bad.exists()


def test_agent_takes_run_dir(tmp_path, log, capsys):
    cfg = small_cfg(tmp_path / "train", "train.max_steps=6", "train.eval_every=3")
    result = fit(cfg, prepared=log)
    yaml = tmp_path / "cfg.yaml"
    save_config(cfg, yaml)
    from rmtl.commands import agent as agent_cmd
    from rmtl import train as train_mod

    # the agent command loads data from the config; hand it the tiny log instead
    orig = train_mod.load_data
    train_mod.load_data = lambda *a, **k: log
    try:
        code = main(["agent", "-c", str(yaml), "--backbone", str(result.best_checkpoint), "--run-dir",
                     str(tmp_path / "agent_run"), "agent.steps=5", "agent.batch_size=32", "agent.device=cpu"])
    finally:
        train_mod.load_data = orig
    assert code == 0
    assert (tmp_path / "agent_run" / "config.yaml").is_file()
    assert (tmp_path / "agent_run" / "agent" / "agent.pt").is_file()


def test_report_labels_by_model_strategy_seed_and_groups_seeds(log, tmp_path):
    runs = []
    for strategy in ("ew", "uw"):
        for seed in (0, 1):
            run = tmp_path / f"{strategy}{seed}"
            cfg = small_cfg(run, "train.max_steps=6", "train.eval_every=3", f"strategy.name={strategy}",
                            f"seed={seed}")
            save_config(cfg, run / "config.yaml")
            fit(cfg, prepared=log)
            runs.append(run)
    labels = list(collect_metrics(runs))
    assert labels == ["mmoe/ew/s0", "mmoe/ew/s1", "mmoe/uw/s0", "mmoe/uw/s1"]
    grouped = group_seeds(runs)
    assert list(grouped) == ["mmoe/ew (n=2)", "mmoe/uw (n=2)"]
    mean, sd, n = grouped["mmoe/ew (n=2)"]["ctr"]["auc"]
    a, b = (collect_metrics(runs)[f"mmoe/ew/s{s}"]["ctr"]["auc"] for s in (0, 1))
    assert n == 2 and mean == pytest.approx((a + b) / 2) and sd == pytest.approx(abs(a - b) / 2 ** 0.5)
    table = format_table(grouped)
    assert "+-" in table and "mmoe/uw (n=2)" in table.splitlines()[0]
    # a different setting with the same model/strategy is not pooled with these
    other = tmp_path / "ew_lr"
    cfg = small_cfg(other, "train.max_steps=6", "train.eval_every=3", "train.lr=0.002")
    save_config(cfg, other / "config.yaml")
    fit(cfg, prepared=log)
    grouped = group_seeds([*runs, other])
    assert len(grouped) == 3 and any(k.startswith("mmoe/ew [") for k in grouped)


def test_compare_takes_run_dir_and_a_rejected_start_leaves_nothing(tmp_path, capsys):
    bad = tmp_path / "cmp"
    assert main(["compare", "--run-dir", str(bad), "--seeds", "1", "model.name=nosuch"]) == 2
    assert "model.name" in capsys.readouterr().err and not bad.exists()
    from rmtl.cli import build_parser

    args = build_parser().parse_args(["compare", "--run-dir", "x"])
    assert args.out == "x"  # --run-dir and the older --out name the same folder
