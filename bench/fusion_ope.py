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
the truth with N passes (rebuilds the run's world from its config.yaml) to establish more pairs, and
prints the held-out log's resolution (rmtl.fusion.validation.resolution) at --resolution-passes.
More keys: dr_clip<C> / dr_switch<C> (DR with the cumulative slate weights clipped at C, or switched to the
critic above C: rmtl.fusion.ope.capped), dr_xfit (DR whose slate critic for each half of the held-out
episodes is fitted on the other half: cross-fitting), mtf_gauc (with its user bootstrap; a ranking, no value),
model_train (the policies rolled out in the run's *training* simulator on the test sessions, --model-repeats
passes: model-based evaluation with the learned user model, and the world the logged train data comes from).
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
from rmtl.fusion.ope import (bootstrap_counts, capped, dr_terms, dr_with_bootstrap, episode_grid, fqe_ensemble,
                             weighted_dr, weighted_dr_many)
from rmtl.fusion.policies import load_policy
from rmtl.fusion.slates import SlateSpec
from rmtl.fusion.validation import distinguishable_pairs, resolution, spearman, tie_aware


class MeanCritic:
    """The mean Q of several critics (what DR needs of a critic: q_values)."""

    def __init__(self, critics):
        self.critics = critics

    def q_values(self, data, policy=None):
        return np.mean([c.q_values(data, policy) for c in self.critics], axis=0)


class FixedCritic:
    """Q at the logged rows and V = Q(s, pi(s)) computed beforehand (what DR needs of a critic: q_values)."""

    def __init__(self, q, v):
        self.q, self.v = q, v

    def q_values(self, data, policy=None):
        return self.v if policy is not None else self.q


def saved_critic(run: Path, policy: str):
    from rmtl.fusion.fqe import ConservativeFQE

    return ConservativeFQE.load(run / "fqe" / f"{policy}_sfqe.pt")


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
    ap.add_argument("--resolution-passes", default="", help="comma-separated held-out sizes in passes (default: the run's)")
    ap.add_argument("--model-repeats", type=int, default=100, help="passes of model_train")
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
        world = None
        if args.truth_repeats or {"mtf_gauc", "model_train"} & set(args.only.split(",")):
            from rmtl.fusion.pipeline import build_world

            torch.manual_seed(cfg.seed)
            world = build_world(cfg)
        if args.truth_repeats:
            from rmtl.fusion.validation import true_value

            t0 = time.time()
            pols = {n: load_policy(run / "policies" / f"{n}.pt") for n in names}
            rets = {n: true_value(world.eval_sim, pols[n], world.test_sessions, gamma=cfg.fqe.gamma,
                                  repeats=args.truth_repeats, seed=cfg.seed + 3000) for n in names}
            truth = {n: float(r.mean()) for n, r in rets.items()}
            pairs = distinguishable_pairs(rets)
            print(f"truth with {args.truth_repeats} passes took {time.time() - t0:.1f} s")
            for passes in [int(p) for p in args.resolution_passes.split(",") if p] or [cfg.behaviour.heldout_passes]:
                r = resolution(rets, pairs, sessions=len(world.test_sessions), passes=passes)
                print(f"   resolution at {r['episodes']} sessions ({r['samples']} samples): "
                      + "; ".join(f"{m} pairs {r[m]['pairs']:.0%} all {r[m]['all_pairs']:.0%} rho {r[m]['spearman']:+.2f}"
                                  for m in ("paired", "independent") if m in r))
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
            elif key.startswith(("dr_clip", "dr_switch")):  # capped cumulative weights, the run's slate critic
                mode, cap = ("clip", key[7:]) if key.startswith("dr_clip") else ("switch", key[9:])
                for n, act in policies.items():
                    torch.manual_seed(cfg.seed)  # BCQ samples its proposals
                    g = capped(dr_terms(held, act, spec, cfg.fqe.gamma, saved_critic(run, n)), float(cap), mode)
                    point[n], samples[n] = weighted_dr(g), weighted_dr_many(g, counts)
            elif key == "dr_xfit":  # each half's critic is fitted on the other half of the episodes
                ep, _, n_ep = episode_grid(held)
                half = np.random.default_rng(cfg.seed).permutation(n_ep) < n_ep // 2
                for n, act in policies.items():
                    q, v = np.zeros(len(held)), np.zeros(len(held))
                    for side in (True, False):
                        fit_on, use = held.subset(np.flatnonzero(half[ep] != side)), half[ep] == side
                        torch.manual_seed(cfg.seed)
                        c = make_critic("sfqe", fit_on, spec, fqe_cfg, cfg.seed).fit(fit_on, act, steps=args.steps)
                        torch.manual_seed(cfg.seed)
                        q[use], v[use] = c.q_values(held)[use], c.q_values(held, act)[use]
                    torch.manual_seed(cfg.seed)
                    g = dr_terms(held, act, spec, cfg.fqe.gamma, FixedCritic(q, v))
                    point[n], samples[n] = weighted_dr(g), weighted_dr_many(g, counts)
            elif key == "mtf_gauc":  # a ranking criterion with its paired user bootstrap
                from rmtl.fusion.fqe import gauc_mean, gauc_resampled, mtf_gauc_groups, user_bootstrap

                users, ucounts = user_bootstrap(held, args.resamples, cfg.seed)
                for n, act in policies.items():
                    torch.manual_seed(cfg.seed)
                    parts = mtf_gauc_groups(held, act, world.log.labels, world.eval_sim.reward_w,
                                            label_index=world.tasks.index(cfg.eval.label), beta=spec.beta,
                                            kind=spec.kind)
                    point[n], samples[n] = gauc_mean(parts), gauc_resampled(parts, users, ucounts)
            elif key == "model_train":  # model-based: the learned (training) user model's simulator
                from rmtl.fusion.validation import true_value

                for n, act in policies.items():
                    torch.manual_seed(cfg.seed)
                    point[n] = float(true_value(world.train_sim, act, world.test_sessions, gamma=cfg.fqe.gamma,
                                                repeats=args.model_repeats, seed=cfg.seed + 3000).mean())
            own = key.endswith("_ens") or key.startswith(("dr_avg", "dr_clip", "dr_switch", "dr_xfit")) or \
                key in ("mtf_gauc", "model_train")
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
