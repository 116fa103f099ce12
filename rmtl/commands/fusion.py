"""`rmtl fusion [-c CONFIG] [key=value ...] [--run-dir DIR]`: BatchRL-MTF policies and their evaluation."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fusion", help="train and evaluate multi-task fusion policies (BatchRL-MTF)",
        description="Fit user-response models on KuaiRand-schema logs, log fusion decisions, train fusion "
                    "policies (equal weights, behaviour default, CEM, BCQ, SB3 TD3), save them, and print one table of "
                    "simulator truth, the offline value estimates (doubly robust on slates = the default, with "
                    "bootstrap intervals; importance sampling; slate FQE; optionally FQE on alpha and FQE-CQL), "
                    "MTF-GAUC and simulator reward / depth under a held-out user model, then each estimator's error, "
                    "rank correlation and tie-aware pair check against the truth. "
                    "`rmtl fusion score --run-dir R --policy P --sessions F.npz` values a saved policy on new "
                    "logged sessions without retraining.")
    p.add_argument("-c", "--config", default="fusion",
                   help="a YAML file or a packaged config name (default: the packaged 'fusion')")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. bcq.steps=200")
    p.add_argument("--run-dir", help="output folder (default: the config's run_dir); with score: the run to read")
    p.add_argument("--policy", help="with `rmtl fusion score`: the saved policy to score (e.g. bcq)")
    p.add_argument("--sessions", help="with `rmtl fusion score`: a FusionDataset .npz of logged sessions "
                                      "(with candidates and slate propensities, like RUN_DIR/logged_heldout.npz)")
    p.set_defaults(func=run)


def score(args: argparse.Namespace) -> int:
    """`rmtl fusion score --run-dir R --policy P --sessions F.npz`: a saved policy's value on new sessions."""
    from rmtl.errors import ConfigError
    from rmtl.fusion.score import format_score, score_sessions

    if args.overrides[1:]:
        raise ConfigError(f"`rmtl fusion score` takes no overrides, got {' '.join(args.overrides[1:])}", key="score")
    for opt in ("run_dir", "policy", "sessions"):
        if not getattr(args, opt):
            raise ConfigError(f"`rmtl fusion score` needs --{opt.replace('_', '-')}", key=opt)
    print(format_score(score_sessions(args.run_dir, args.policy, args.sessions)))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.overrides[:1] == ["score"]:
        return score(args)
    if args.policy or args.sessions:
        from rmtl.errors import ConfigError

        raise ConfigError("--policy and --sessions go with `rmtl fusion score`", key="score")
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
