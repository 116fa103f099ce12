"""`rmtl fusion [-c CONFIG] [key=value ...] [--run-dir DIR]`: BatchRL-MTF policies and their evaluation."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fusion", help="train and evaluate multi-task fusion policies (BatchRL-MTF)",
        description="Fit user-response models on KuaiRand-schema logs, log fusion decisions, train fusion "
                    "policies (equal weights, behaviour default, CEM, BCQ, SB3 TD3), save them, and print one table of "
                    "simulator truth, FQE (the default estimate), conservative FQE (a lower bound), "
                    "MTF-GAUC and simulator reward / "
                    "depth under a held-out user model, then each estimator's error and rank correlation with the truth.")
    p.add_argument("-c", "--config", default="fusion",
                   help="a YAML file or a packaged config name (default: the packaged 'fusion')")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. bcq.steps=200")
    p.add_argument("--run-dir", help="output folder (default: the config's run_dir)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rmtl.fusion.config import load_fusion_config
    from rmtl.fusion.pipeline import format_estimators, format_table, run_fusion

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = load_fusion_config(args.config, overrides)
    print(f"run dir: {cfg.run_dir}")
    result = run_fusion(cfg)
    print(format_table(result.table))
    print("offline estimators against the held-out simulator's true discounted value:")
    print(format_estimators(result))
    print("mean alpha on held-out initial states:")
    for name, alpha in result.alphas.items():
        print(f"  {name:10s} " + "  ".join(f"{t}={v:+.2f}" for t, v in alpha.items()))
    print(f"timings (s): {result.timings}")
    print(f"results: {result.run_dir / 'results.json'}; policies: {result.run_dir / 'policies'}")
    return 0
