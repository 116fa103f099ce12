"""FQE on alpha (and its CQL-penalised lower bound) of a finished `rmtl fusion` run against its simulator
truth, over a grid of CQL penalties and FQE seeds (bench/fusion_ope.py measures every estimator, the default
DR among them; docs/fusion.md).

    rmtl fusion --run-dir runs/mtf
    python bench/fusion_estimators.py runs/mtf [--alphas 0,0.01,0.03,0.1] [--seeds 0,1,2] [--steps 1000]

Reads the run's saved policies (policies/*.pt), its held-out logged data and the truth in
results.json; refits FQE per (penalty, seed, policy) and prints the mean estimate, the
error against the truth, the Spearman rank correlation with the truth and the share of
the truth's significant pairs ordered right. No retraining of any policy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rmtl.fusion.data import FusionDataset
from rmtl.fusion.fqe import ConservativeFQE
from rmtl.fusion.policies import load_policy
from rmtl.fusion.validation import spearman


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--alphas", default="0,0.01,0.03,0.1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    results = json.loads((run / "results.json").read_text())
    cfg_text = (run / "config.yaml").read_text()
    table, pairs = results["table"], results.get("estimators", {}).get("pairs", [])
    held = FusionDataset.load(run / "logged_heldout.npz")
    names = list(table)
    policies = {n: load_policy(run / "policies" / f"{n}.pt") for n in names}
    truth = np.array([table[n]["true_value"] for n in names])
    gamma = float([ln.split(":")[1] for ln in cfg_text.splitlines() if ln.strip().startswith("gamma")][-1])
    print(f"truth (discounted, gamma {gamma}): " + "  ".join(f"{n}={v:.3f}" for n, v in zip(names, truth)))
    print("significant pairs: " + (", ".join(f"{a}>{b}" for a, b in pairs) or "none"))
    print(f"{'cql_alpha':>9} {'seed':>4}  " + "  ".join(f"{n:>9}" for n in names) + "   spearman  pairs  max|err|")
    for alpha in [float(a) for a in args.alphas.split(",")]:
        per_seed = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            est = []
            for n in names:
                fqe = ConservativeFQE(held.obs.shape[1], held.action.shape[1], gamma=gamma, cql_alpha=alpha,
                                      hidden=64, lr=1e-3, seed=seed)
                fqe.fit(held, policies[n], steps=args.steps, batch_size=256)
                est.append(fqe.value(held.initial_obs, policies[n]))
            est = np.array(est)
            per_seed.append(est)
            conc = np.mean([est[names.index(a)] > est[names.index(b)] for a, b in pairs]) if pairs else float("nan")
            print(f"{alpha:9.3f} {seed:4d}  " + "  ".join(f"{v:9.3f}" for v in est)
                  + f"   {spearman(est, truth):+.3f}  {conc:5.0%}  {np.abs(est - truth).max():8.3f}", flush=True)
        mean = np.mean(per_seed, 0)
        conc = np.mean([mean[names.index(a)] > mean[names.index(b)] for a, b in pairs]) if pairs else float("nan")
        print(f"{alpha:9.3f} mean  " + "  ".join(f"{v:9.3f}" for v in mean)
              + f"   {spearman(mean, truth):+.3f}  {conc:5.0%}  {np.abs(mean - truth).max():8.3f}")


if __name__ == "__main__":
    main()
