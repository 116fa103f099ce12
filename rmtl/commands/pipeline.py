"""`rmtl pipeline`: pretrain with EW -> train the critics -> fine-tune with their weights -> compare."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pipeline", help="the RMTL method end to end: EW pretraining, critics, weighted fine-tuning, comparison",
        description="prepare -> pretrain the backbone with EW -> build transitions from its train predictions -> "
                    "train the per-task critics (and optionally the actor) -> fine-tune with weights "
                    "w = 1 - lam * Q -> print one table of test metrics before and after.",
    )
    p.add_argument("-c", "--config", metavar="CONFIG",
                   help="YAML file or packaged config name (default: quickstart; with --resume, RUN_DIR/config.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.name=ple agent.steps=3000 agent.ew_control=true")
    p.add_argument("--run-dir", help="output folder (default: the config's run_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR: each fit from its last.pt, the agent from agent/agent.pt when saved")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rmtl import distributed
    from rmtl.commands import resume_config, started_run
    from rmtl.pipeline import run_pipeline

    config = args.config or (resume_config(args.run_dir) if args.resume else None) or "quickstart"
    overrides = list(args.overrides)
    if not any(o.split("=", 1)[0].strip() == "strategy.name" for o in overrides):
        # the pipeline pretrains with EW and fine-tunes with the critics' weights: its
        # strategy (in the run name and config.yaml) is rmtl
        overrides.append("strategy.name=rmtl")
    with started_run(config, overrides, args.run_dir, reads_shards=True, pins_streams=True) as cfg:
        result = run_pipeline(cfg, run_dir=cfg.run_dir, resume=args.resume)
    if not distributed.is_main():  # under torchrun: rank 0 reports
        return 0
    print()
    print(result.table)
    total = sum(result.seconds.values())
    print(f"\nrun dir: {result.run_dir}   critics: {result.agent_path}   total {total:.0f}s")
    return 0
