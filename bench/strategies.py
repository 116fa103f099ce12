"""Every weighting strategy trained with the same backbone, data and seed; prints test AUC
per task and the training time. A sanity figure (does each strategy train as well as EW
on the embedded synthetic log?), not a ranking: one seed, a small synthetic log.

Plain script:  python bench/strategies.py [--epochs 2] [--model mmoe] [--strategies ew,pcgrad]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from rmtl.config import load_config
from rmtl.data.prepare import as_session_log
from rmtl.train import fit, load_data

DEFAULT = "ew,uw,dwa,gradnorm,rlw,pcgrad,gradvac,cagrad,mgda,imtl,nash_mtl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="mmoe")
    parser.add_argument("--strategies", default=DEFAULT)
    parser.add_argument("--on", default="auto", help="for gradient methods: auto, representation or parameters")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override, e.g. data.synthetic.task_correlation=-0.8 (repeatable)")
    args = parser.parse_args()
    gradient = {"pcgrad", "gradvac", "cagrad", "mgda", "imtl", "nash_mtl"}
    common = [f"train.epochs={args.epochs}", f"model.name={args.model}", "train.progress=false", *args.set]
    base = load_config(args.config, common)
    prepared = load_data(base.data, base.seed)
    tasks = list(as_session_log(prepared).spec.tasks)
    print(f"{args.config} {' '.join(args.set)}, {args.model}, {args.epochs} epochs, seed {base.seed}; test AUC per task")
    print(f"{'strategy':<10} " + " ".join(f"{t:>8}" for t in tasks) + f" {'mean':>8} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies.split(","):
            overrides = [*common, f"strategy.name={name}", f"run_dir={tmp}/{name}"]
            if name in gradient and args.on != "auto":
                overrides.append(f"strategy.options.on={args.on}")
            cfg = load_config(args.config, overrides)
            start = time.perf_counter()
            result = fit(cfg, prepared=prepared)
            seconds = time.perf_counter() - start
            aucs = [result.metrics["test"][t]["auc"] for t in tasks]
            print(f"{name:<10} " + " ".join(f"{a:>8.4f}" for a in aucs) + f" {sum(aucs) / len(aucs):>8.4f} "
                  f"{seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
