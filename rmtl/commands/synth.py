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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kw = {"seed": args.seed}
    for name in ("users", "items", "task_correlation"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    paths = synthetic.write_synthetic(args.schema, args.out, **kw)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0
