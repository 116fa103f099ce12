"""EW vs RMTL-weighted fine-tuning for MMoE, PLE and ESMM over several seeds.

    python bench/rmtl_gain.py                      # full: default synthetic logs, 3 seeds
    python bench/rmtl_gain.py --reduced            # smaller logs and fewer steps (labelled REDUCED)

For every (source, model, seed): pretrain the backbone with EW, train the critics on its
train predictions, then fine-tune from the SAME pretrained weights twice for the same
number of epochs - once with EW (the control) and once with the critics' weights
w = 1 - lam * Q (RMTL). Test AUC and session logloss per task are printed as mean +- std
over seeds, with the paired difference RMTL - EW. Sources are the embedded synthetic
RetailRocket and KuaiRand logs (written in the real raw schemas).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from rmtl.config import load_config
from rmtl.pipeline import run_pipeline
from rmtl.train import load_data


def overrides_for(args, source: str, model: str, seed: int) -> list[str]:
    out = [f"data.source={source}", f"model.name={model}", f"seed={seed}", "data.seed=0",
           f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.progress=false",
           f"agent.steps={args.agent_steps}", f"agent.finetune_epochs={args.finetune_epochs}",
           f"agent.finetune_lr={args.finetune_lr}", "train.num_threads=1",
           "agent.ew_control=true", f"agent.lam={args.lam}"]
    if args.reduced:
        out += [f"data.synthetic={{users: {args.users}, items: {args.items}}}"]
    return out


def summarise(results: list[dict], metrics=("auc", "session_logloss")) -> str:
    lines = []
    keys = sorted({(r["source"], r["model"]) for r in results})
    for source, model in keys:
        runs = [r for r in results if r["source"] == source and r["model"] == model]
        tasks = list(runs[0]["before"])
        lines.append(f"\n{source} / {model}  ({len(runs)} seeds)")
        lines.append(f"  {'task':6s} {'metric':16s} {'pretrained':>17s} {'EW fine-tune':>17s} {'RMTL fine-tune':>17s} {'RMTL - EW':>17s}")
        for task in tasks:
            for m in metrics:
                b = np.array([r["before"][task][m] for r in runs])
                c = np.array([r["control"][task][m] for r in runs])
                a = np.array([r["after"][task][m] for r in runs])
                d = a - c
                fmt = lambda x: f"{x.mean():.4f} +- {x.std():.4f}"
                lines.append(f"  {task:6s} {m:16s} {fmt(b):>17s} {fmt(c):>17s} {fmt(a):>17s} "
                             f"{d.mean():+.4f} +- {d.std():.4f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=["retailrocket", "kuairand"])
    ap.add_argument("--models", nargs="+", default=["mmoe", "ple", "esmm"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="EW pretraining epochs")
    ap.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs (EW control and RMTL)")
    ap.add_argument("--finetune-lr", type=float, default=1e-4, help="fine-tuning learning rate (both arms)")
    ap.add_argument("--agent-steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lam", type=float, default=0.7)
    ap.add_argument("--reduced", action="store_true", help="smaller synthetic logs (--users/--items)")
    ap.add_argument("--users", type=int, default=1500)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--out", default=None, help="JSON file for the raw results")
    args = ap.parse_args()

    setting = "REDUCED" if args.reduced else "full"
    print(f"setting: {setting}; seeds {args.seeds}; pretrain {args.epochs} ep, fine-tune {args.finetune_epochs} ep, "
          f"lr {args.finetune_lr}, agent {args.agent_steps} updates, lam {args.lam}; shared 2-core machine (times are noisy)")
    results = []
    with tempfile.TemporaryDirectory(prefix="rmtl-gain-") as tmp:
        for source in args.sources:
            prepared_cache: dict = {}
            for model in args.models:
                for seed in range(args.seeds):
                    cfg = load_config(None, overrides_for(args, source, model, seed))
                    key = (source,)
                    if key not in prepared_cache:  # one log per source (data seed fixed), shared by all runs
                        prepared_cache[key] = load_data(cfg.data, cfg.seed)
                    t0 = time.perf_counter()
                    res = run_pipeline(cfg, prepared=prepared_cache[key], run_dir=Path(tmp) / f"{source}-{model}-{seed}",
                                       say=lambda s: None)
                    secs = time.perf_counter() - t0
                    results.append({"source": source, "model": model, "seed": seed, "before": res.before,
                                    "after": res.after, "control": res.control, "seconds": secs})
                    ctr = list(res.after)[0]
                    print(f"  {source:12s} {model:5s} seed {seed}: {ctr} AUC pretrained {res.before[ctr]['auc']:.4f} "
                          f"EW-ft {res.control[ctr]['auc']:.4f} RMTL-ft {res.after[ctr]['auc']:.4f}  ({secs:.0f}s)",
                          flush=True)
    print(summarise(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"setting": setting, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
