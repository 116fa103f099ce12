"""`rmtl compare`: paired multi-seed comparison of fine-tuning arms against EW (rmtl.compare)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="paired multi-seed comparison of loss weightings (RMTL, sanity arms, any strategy) against EW",
        description="Per seed: pretrain with EW, train cross-fitted critics, then fine-tune copies of the same "
                    "backbone with the same batch order under every arm, early-stopped on val. Prints mean +- sd "
                    "of each arm's test difference to EW, paired t-test and Wilcoxon p-values; writes "
                    "compare.json (with session-level bootstrap CIs per seed), compare.txt and compare.png.",
    )
    p.add_argument("-c", "--config", default="quickstart", metavar="CONFIG",
                   help="YAML file or packaged config name (default: quickstart)")
    p.add_argument("--seeds", type=int, default=10, metavar="N", help="number of seeds (default 10; >= 1)")
    p.add_argument("--arms", default="ew,rmtl,lam0,shuffled,label", metavar="A,B,...",
                   help="arms: ew, rmtl, lam0, shuffled, label, or any strategy name (e.g. uw,pcgrad); "
                        "ew (the control) is always run")
    p.add_argument("--jobs", type=int, default=None, metavar="J",
                   help="parallel processes (default: one per core, at most one per seed)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="B",
                   help="session-level bootstrap draws per seed (0 = none; default 200)")
    p.add_argument("--run-dir", "--out", dest="out", default=None, metavar="DIR",
                   help="output folder (default: the config's run_dir); gets config.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. agent.lam=0.5")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rmtl.commands import started_run
    from rmtl.compare import check_arms, check_counts, run_compare

    check_counts(args.seeds, args.jobs, args.bootstrap)  # bad counts and arms fail before any data is read
    arms = check_arms(args.arms.split(","))
    with started_run(args.config, args.overrides, args.out, need_strategy=False, reads_shards=True,
                     pins_streams=True) as cfg:
        result = run_compare(cfg, seeds=args.seeds, arms=arms, jobs=args.jobs, out_dir=cfg.run_dir,
                             bootstrap=args.bootstrap)
    print()
    print(result["table"])
    out = cfg.run_dir
    print(f"\n{out}/compare.json, compare.png; {result['seconds']:.0f}s with {result['jobs']} process(es)")
    return 0
