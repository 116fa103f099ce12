"""`rmtl train -c CONFIG [key=value ...] [--run-dir DIR] [--resume]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rmtl.errors import ConfigError
from rmtl.tables import text_table


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a multi-task backbone with a weighting strategy",
        description="Train a backbone with a loss-weighting strategy; writes checkpoints, TensorBoard "
                    "events and metrics.json under RUN_DIR/train/ and the resolved config as RUN_DIR/config.yaml.")
    p.add_argument("-c", "--config", help="a YAML file or a packaged config name (quickstart, retailrocket, "
                   "kuairand, census); with --resume, defaults to RUN_DIR/config.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.01")
    p.add_argument("--run-dir", help="output folder (default: the config's run_dir)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/train/last.pt")
    p.add_argument("--shards", metavar="DIR", help="train from a sharded prepare's entry folder (`rmtl prepare "
                   "--shards`), each process streaming its own shards: the same as data.shards=DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def format_metrics(metrics: dict) -> str:
    """A plain table: one row per split and task."""
    names = ["auc", "logloss", "session_logloss", "gauc"]
    rows = [["split", "task", *names]]
    for split, per_task in metrics.items():
        for task, mets in per_task.items():
            rows.append([split, task, *(f"{mets[n]:.4f}" for n in names)])
    return text_table(rows, label_columns=2)


def run(args: argparse.Namespace) -> int:
    from rmtl import distributed
    from rmtl.commands import resume_config, started_run
    from rmtl.train import fit

    config = args.config or (resume_config(args.run_dir) if args.resume else None)
    if config is None:
        raise ConfigError("give a config with -c (a YAML file or one of the packaged names), or "
                          "--resume --run-dir DIR for a run dir holding config.yaml")
    overrides = list(args.overrides) + (["train.progress=false"] if args.no_progress else [])
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    with started_run(config, overrides, args.run_dir, reads_shards=True) as cfg:
        result = fit(cfg, run_dir=Path(cfg.run_dir), resume=args.resume)
    if not distributed.is_main():  # under torchrun: rank 0 reports
        return 0
    print(f"{result.steps} steps, {result.epochs} epochs, best at step {result.best_step}"
          + (" (stopped early)" if result.stopped_early else ""))
    print(format_metrics(result.metrics))
    if result.mtl_gain is not None:
        print(f"MTL gain over {cfg.baseline_run} (test, mean relative): {result.mtl_gain['mean']:+.4%}")
    return 0
