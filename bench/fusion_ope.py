"""Every offline estimator of a finished `rmtl fusion` run against its simulator truth (the measurement
behind the default estimator, docs/fusion.md "Measured figures").

    rmtl fusion seed=S --run-dir runs/wS
    python bench/fusion_ope.py runs/w0 runs/w1 runs/w2 [--only dr,wpdis,sfqe,fqe,fqe_ens,sfqe_ens]
        [--steps 2000] [--tau 0.05] [--members 5] [--truth-repeats 0]

Per run: reads the saved policies, the held-out logged data (with its candidates and slate
propensities) and the truth in results.json; refits, per estimator, on the same data, the
estimators of rmtl.fusion.estimators (dr, wpdis, sfqe, fqe, fqe_cql: one critic each, bootstrap
intervals for dr / wpdis), dr_avg (DR with the mean Q of --members slate critics as control variate)
and the critic ensembles fqe_ens / sfqe_ens (--members critics, critic m on
bootstrap resample m of the episodes; the mean is the estimate, the members' spread the interval), and
prints estimate (+- s.e.), Spearman with the truth, the share of the truth's significant pairs ordered
right, and the tie-aware check (rmtl.fusion.validation.tie_aware). --truth-repeats N > 0 recomputes
the truth with N passes (rebuilds the run's world from its config.yaml) to establish more pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from rmtl.fusion.data import FusionDataset
from rmtl.fusion.estimators import ESTIMATORS, estimate_all, make_critic
from rmtl.fusion.ope import bootstrap_counts, dr_with_bootstrap, fqe_ensemble
from rmtl.fusion.policies import load_policy
from rmtl.fusion.slates import SlateSpec
from rmtl.fusion.validation import distinguishable_pairs, spearman, tie_aware


class MeanCritic:
    """The mean Q of several critics (what DR needs of a critic: q_values)."""

    def __init__(self, critics):
        self.critics = critics

    def q_values(self, data, policy=None):
        return np.mean([c.q_values(data, policy) for c in self.critics], axis=0)


def judge(point: dict, samples: dict | None, truth: dict, pairs: list, z: float) -> dict:
    """Spearman and pair share of the point estimates; with bootstrap ``samples`` the tie-aware check."""
    names = list(truth)
    est, t = np.array([point[n] for n in names]), np.array([truth[n] for n in names])
    out = {"spearman": spearman(est, t), "estimate": dict(point),
           "pairs": float(np.mean([point[a] > point[b] for a, b in pairs])) if pairs else float("nan")}
    if samples:
        out["se"] = {n: float(np.std(samples[n], ddof=1)) for n in names}
        out.update(tie_aware(point, samples, pairs, z))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--resamples", type=int, default=200, help="bootstrap resamples of the episodes")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--tau", type=float, default=0.05)
    ap.add_argument("--members", type=int, default=5, help="critics of fqe_ens / sfqe_ens")
    ap.add_argument("--truth-repeats", type=int, default=0)
    ap.add_argument("--only", default="fqe,sfqe,wpdis,dr", help=f"estimators among {','.join(ESTIMATORS)}")
    ap.add_argument("--out", default=None, help="write all figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    only = args.only.split(",")
    everything = {}
    for run in map(Path, args.runs):
        from rmtl.fusion.config import load_fusion_config

        cfg = load_fusion_config(run / "config.yaml")
        res = json.loads((run / "results.json").read_text())
        table, pairs = res["table"], [tuple(p) for p in res["estimators"]["pairs"]]
        names = list(table)
        truth = {n: table[n]["true_value"] for n in names}
        if args.truth_repeats:
            from rmtl.fusion.pipeline import build_world
            from rmtl.fusion.validation import true_value

            t0 = time.time()
            torch.manual_seed(cfg.seed)
            world = build_world(cfg)
            pols = {n: load_policy(run / "policies" / f"{n}.pt") for n in names}
            rets = {n: true_value(world.eval_sim, pols[n], world.test_sessions, gamma=cfg.fqe.gamma,
                                  repeats=args.truth_repeats, seed=cfg.seed + 3000) for n in names}
            truth = {n: float(r.mean()) for n, r in rets.items()}
            pairs = distinguishable_pairs(rets)
            print(f"truth with {args.truth_repeats} passes took {time.time() - t0:.1f} s")
        held = FusionDataset.load(run / "logged_heldout.npz")
        policies = {n: load_policy(run / "policies" / f"{n}.pt") for n in names}
        spec = SlateSpec.of(cfg.env)
        counts = bootstrap_counts(held, args.resamples, cfg.seed)
        print(f"== {run} (seed {cfg.seed}): {len(held)} held-out decisions; truth "
              + "  ".join(f"{n}={truth[n]:.3f}" for n in names))
        print("   established pairs: " + (", ".join(f"{a}>{b}" for a, b in pairs) or "none"))
        out = {}
        fqe_cfg = dataclasses.replace(cfg.fqe, steps=args.steps, tau=args.tau)
        critics: dict = {}
        for key in only:
            t0 = time.time()
            point, samples = {}, {}
            if key == "dr_avg":  # DR whose control variate is the mean Q of --members slate critics (seeds)
                for n, act in policies.items():
                    members = [make_critic("sfqe", held, spec, dataclasses.replace(fqe_cfg), cfg.seed + m)
                               .fit(held, act, steps=args.steps) for m in range(args.members)]
                    point[n], samples[n] = dr_with_bootstrap(held, act, spec, cfg.fqe.gamma, MeanCritic(members),
                                                             counts)
            elif key.endswith("_ens"):  # critic ensembles: the mean is the estimate, the members the samples
                ens, _ = fqe_ensemble(held, policies, members=args.members, seed=cfg.seed, steps=args.steps,
                                      gamma=cfg.fqe.gamma, cql_alpha=0.0, hidden=cfg.fqe.hidden, lr=cfg.fqe.lr,
                                      tau=args.tau, slate=spec.to_dict() if key == "sfqe_ens" else None)
                point, samples = {n: float(v.mean()) for n, v in ens.items()}, ens
            own = key.endswith("_ens") or key == "dr_avg"
            kind = None if own else ESTIMATORS[key].critic
            for n, act in (() if own else policies.items()):
                if kind and (kind, n) not in critics:
                    torch.manual_seed(cfg.seed)
                    critics[kind, n] = make_critic(kind, held, spec, fqe_cfg, cfg.seed).fit(held, act,
                                                                                            steps=args.steps)
                values, boot = estimate_all([key], held, act, spec, cfg.fqe.gamma,
                                            {kind: critics[kind, n]} if kind else {}, counts)
                point[n] = values[key]
                if boot:
                    samples[n] = boot[key]
            j = judge(point, samples or None, truth, pairs, cfg.ope.z)
            j["seconds"] = time.time() - t0
            out[key] = j
            tag = ""
            if samples:
                tag = (f" wrong-way {len(j['established_wrong_way'])} untrue-claims {len(j['claimed_untrue'])}"
                       f" ties-on-established {len(j['established_called_tie'])} {'PASS' if j['pass'] else 'fail'}")
            print(f"   {key:6s} " + "  ".join(f"{n}={point[n]:6.3f}" + (f"+-{j['se'][n]:.2f}" if samples else "")
                                         for n in names)
                  + f" | rho {j['spearman']:+.2f} pairs {j['pairs']:.0%}{tag} ({j['seconds']:.0f} s)", flush=True)
        everything[str(run)] = {"seed": cfg.seed, "truth": truth, "pairs": [list(p) for p in pairs],
                                "estimators": out}
    if args.out:
        Path(args.out).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
