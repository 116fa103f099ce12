"""`rmtl synth`: write synthetic raw logs in a real schema (RetailRocket or KuaiRand)."""

from __future__ import annotations

import argparse

from rmtl.data import synthetic


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="write synthetic raw logs in a real schema",
        description="Write synthetic raw files in exactly the RetailRocket or KuaiRand schema, "
                    "with planted click / conversion structure, deterministic per seed.",
    )
    p.add_argument("--schema", required=True, choices=synthetic.schemas(), help="raw schema to write")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the raw files into")
    p.add_argument("--users", type=int, default=None, metavar="N", help="number of users / visitors (schema default if omitted)")
    p.add_argument("--items", type=int, default=None, metavar="M", help="number of items / videos (schema default if omitted)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--task-correlation", type=float, default=None, metavar="R",
                   help="correlation in [-1, 1] of the click factor and the conversion factor")
    p.add_argument("--dynamics", type=float, default=None, metavar="S",
                   help="strength in [0, 3] of the session dynamics (intent, fatigue, leaving); 0 = independent "
                        "draws; default 1")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kw = {"seed": args.seed}
    if args.dynamics is not None:  # checked before anything is written
        from rmtl.data.session_dynamics import check_strength

        kw["dynamics"] = check_strength(args.dynamics)
    for name in ("users", "items", "task_correlation"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    paths = synthetic.write_synthetic(args.schema, args.out, **kw)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    print(dynamics_summary(args.schema, args.out))
    return 0


def dynamics_summary(schema: str, out_dir) -> str:
    """Lag-1 label correlation within sessions and the rate by position, measured on the
    files as the real reader reads them back (first task)."""
    from rmtl.data import sources
    from rmtl.data.session_dynamics import raw_summary

    raw = sources.reader(schema)(out_dir)
    s = raw_summary(raw)
    rates = " ".join(f"{r:.3f}" for r in s["ctr_by_position"])
    return (f"{raw.tasks[0]}: lag-1 correlation within sessions {s['lag1']:+.3f}; rate by position "
            f"0..{len(s['ctr_by_position']) - 1}: {rates}")
