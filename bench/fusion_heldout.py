"""How the default off-policy estimate (DR on slates) ranks the fusion policies as the held-out log grows
(docs/fusion.md "How much held-out log the order needs").

    rmtl fusion seed=S --run-dir runs/wS
    python bench/fusion_heldout.py runs/w0 runs/w1 [--passes 2,10,30,100] [--truth-repeats 100,1000]
        [--steps 2000] [--out heldout.json]

Per run: rebuilds the run's world from its config.yaml, reads its saved policies, rolls each policy out
max(--truth-repeats) passes over the test sessions for the truth (common random numbers, the run's
truth seed) and logs max(--passes) passes of the behaviour policy over the test sessions exactly as the
run logs its held-out data (same seeds: the first ``behaviour.heldout_passes`` passes are the run's own
log). Each held-out size H is the log's first H passes (so the sizes are nested) and each truth scale R
the truth's first R passes. Per H: one slate critic per policy (fqe.steps), the DR estimate with its
paired episode bootstrap (ope.resamples), and per R: Spearman with the truth, the share of the truth's
established pairs ordered right and the tie-aware check (rmtl.fusion.validation). Prints the time of
each part (logging with its propensity Monte Carlo, critic fits, DR + bootstrap, truth) per H.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from rmtl.fusion.config import load_fusion_config
from rmtl.fusion.data import behaviour_policy, collect
from rmtl.fusion.estimators import estimate_all, make_critic
from rmtl.fusion.ope import bootstrap_counts, dr_terms, effective_share
from rmtl.fusion.pipeline import build_world
from rmtl.fusion.policies import load_policy
from rmtl.fusion.slates import SlateSpec
from rmtl.fusion.validation import distinguishable_pairs, resolution, spearman, tie_aware, true_value

ESS_STEPS = (0, 2, 5, 10)


def paired_se(samples: dict, names: list) -> float:
    """Median over policy pairs of the s.e. of a difference (``samples``: {policy: per-sample values})."""
    return float(np.median([np.std(samples[a] - samples[b], ddof=1) for i, a in enumerate(names)
                            for b in names[i + 1:]]))


def rets_r(rets: dict, r: int, n_s: int) -> dict:
    return {n: v[:r * n_s] for n, v in rets.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--passes", default="2,10,30,100", help="held-out log sizes, in passes over the test sessions")
    ap.add_argument("--truth-repeats", default="100,1000", help="truth scales, in passes")
    ap.add_argument("--steps", type=int, default=0, help="slate-critic steps (0: the run's fqe.steps)")
    ap.add_argument("--draws", type=int, default=0, help="propensity Monte Carlo draws (0: the run's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = sorted(int(p) for p in args.passes.split(","))
    scales = sorted(int(r) for r in args.truth_repeats.split(","))
    everything = {}
    for run in map(Path, args.runs):
        cfg = load_fusion_config(run / "config.yaml")
        torch.manual_seed(cfg.seed)
        world = build_world(cfg)
        sim, sessions = world.eval_sim, world.test_sessions
        names = json.loads((run / "results.json").read_text())["table"].keys()
        policies = {n: load_policy(run / "policies" / f"{n}.pt") for n in names}
        names = list(policies)
        n_s = len(sessions)

        t0 = time.perf_counter()
        saved = run / f"truth_returns_{scales[-1]}.npz"  # the truth is the slow part: computed once per run
        if saved.is_file():
            with np.load(saved) as f:
                rets = {n: f[n] for n in names}
        else:
            rets = {n: true_value(sim, act, sessions, gamma=cfg.fqe.gamma, repeats=scales[-1], seed=cfg.seed + 3000)
                    for n, act in policies.items()}
            np.savez(saved, **rets)
        truth_s = time.perf_counter() - t0
        truths = {}
        for r in scales:
            part = {n: v[:r * n_s] for n, v in rets.items()}
            diffs = {n: v.reshape(r, n_s).mean(1) for n, v in part.items()}  # per-pass means: paired s.e.
            truths[r] = {"value": {n: float(v.mean()) for n, v in part.items()}, "pairs": distinguishable_pairs(part),
                         "paired_se": paired_se(diffs, names) / np.sqrt(r)}
        print(f"== {run} (seed {cfg.seed}, {n_s} test sessions): truth {scales[-1]} passes x {len(names)} policies "
              f"{truth_s:.1f} s", flush=True)
        for r, t in truths.items():
            print(f"   truth R={r}: " + "  ".join(f"{n}={t['value'][n]:.3f}" for n in names)
                  + f"  paired s.e. {t['paired_se']:.3f}; established {len(t['pairs'])}: "
                  + ", ".join(f"{a}>{b}" for a, b in t["pairs"]), flush=True)

        low, high = sim.cfg.action_low, sim.cfg.action_high
        sim.rng = np.random.default_rng(cfg.seed + 1)  # the run's held-out log: its simulator's fresh stream
        t0 = time.perf_counter()
        logger = behaviour_policy(world.default_alpha, cfg.behaviour.noise, low, high, seed=cfg.seed + 1,
                                  propensity_draws=args.draws or cfg.behaviour.propensity_draws)
        full = collect(sim, logger, sessions, sizes[-1])
        log_s = time.perf_counter() - t0
        print(f"   logged {sizes[-1]} passes ({len(full):,} decisions, {args.draws or cfg.behaviour.propensity_draws} "
              f"propensity draws) in {log_s:.1f} s", flush=True)
        spec = SlateSpec.of(cfg.env)
        fqe_cfg = dataclasses.replace(cfg.fqe, steps=args.steps or cfg.fqe.steps)
        rows = []
        for h in sizes:
            held = full.subset(np.flatnonzero(full.episode < h * n_s))
            counts = bootstrap_counts(held, cfg.ope.resamples, cfg.seed)
            fit_s = dr_s = 0.0
            point, samples, others, ess, w_point, w_samples = {}, {}, {}, {}, {}, {}
            for n, act in policies.items():
                t0 = time.perf_counter()
                critic = make_critic("sfqe", held, spec, fqe_cfg, cfg.seed).fit(held, act, steps=fqe_cfg.steps)
                fit_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                torch.manual_seed(cfg.seed)  # BCQ samples its proposals: the same actions for every estimator
                values, boot = estimate_all(["dr", "wpdis", "sfqe"], held, act, spec, cfg.fqe.gamma,
                                            {"sfqe": critic}, counts)
                dr_s += time.perf_counter() - t0
                point[n], samples[n] = values["dr"], boot["dr"]
                w_point[n], w_samples[n] = values["wpdis"], boot["wpdis"]
                others[n] = {"wpdis": values["wpdis"], "sfqe": values["sfqe"], "wpdis_se": float(np.std(boot["wpdis"], ddof=1)),
                             "dr_se": float(np.std(boot["dr"], ddof=1))}
                torch.manual_seed(cfg.seed)
                ess[n] = effective_share(dr_terms(held, act, spec, cfg.fqe.gamma)["rho"], ESS_STEPS)
            print(f"   H={h}: per policy DR / WPDIS / slate FQE (+-s.e.), weights' effective share of the episodes at "
                  f"steps {ESS_STEPS}:", flush=True)
            for n in names:
                o = others[n]
                print(f"      {n:10s} {point[n]:6.3f} +-{o['dr_se']:.3f}  {o['wpdis']:6.3f} +-{o['wpdis_se']:.3f}  "
                      f"{o['sfqe']:6.3f}   ess " + " ".join(f"{e:.3f}" for e in ess[n]), flush=True)
            se = paired_se(samples, names)
            for r, t in truths.items():
                tv, pairs = t["value"], t["pairs"]
                ta = tie_aware(point, samples, pairs, cfg.ope.z)
                tw = tie_aware(w_point, w_samples, pairs, cfg.ope.z)
                row = {"passes": h, "decisions": len(held), "truth_repeats": r, "established": len(pairs),
                       "spearman": spearman([point[n] for n in names], [tv[n] for n in names]),
                       "pairs_right": float(np.mean([point[a] > point[b] for a, b in pairs])) if pairs else float("nan"),
                       "pass": ta["pass"], "wrong_way": len(ta["established_wrong_way"]),
                       "claimed_untrue": len(ta["claimed_untrue"]), "claimed": sum(v != "~" for v in ta["verdicts"].values()),
                       "dr_paired_se": se, "truth_paired_se": t["paired_se"],
                       "max_abs_error": max(abs(point[n] - tv[n]) for n in names),
                       "estimate": point, "others": others, "ess": ess,
                       "wpdis_pass": tw["pass"], "wpdis_wrong_way": len(tw["established_wrong_way"]),
                       "wpdis_claimed_untrue": len(tw["claimed_untrue"]),
                       "wpdis_pairs_right": float(np.mean([w_point[a] > w_point[b] for a, b in pairs])) if pairs else float("nan"),
                       "wpdis_spearman": spearman([others[n]["wpdis"] for n in names], [tv[n] for n in names]),
                       "sfqe_spearman": spearman([others[n]["sfqe"] for n in names], [tv[n] for n in names]),
                       "oracle": resolution(rets_r(rets, r, n_s), pairs, sessions=n_s, passes=h),
                       "seconds": {"critics": fit_s, "estimates": dr_s}}
                rows.append(row)
                orc = row["oracle"].get("independent", {})
                print(f"   H={h:4d} ({len(held):7,} decisions) R={r:5d}: rho {row['spearman']:+.2f}  pairs "
                      f"{row['pairs_right']:.0%} of {len(pairs)}  {'PASS' if row['pass'] else 'fail'} (wrong way "
                      f"{row['wrong_way']}, untrue claims {row['claimed_untrue']}, claims {row['claimed']})  "
                      f"DR paired s.e. {se:.3f} vs truth {t['paired_se']:.3f}  max |err| {row['max_abs_error']:.2f}  "
                      f"wpdis rho {row['wpdis_spearman']:+.2f} {'PASS' if tw['pass'] else 'fail'} ({row['wpdis_wrong_way']}, "
                      f"{row['wpdis_claimed_untrue']}) sfqe rho {row['sfqe_spearman']:+.2f}  on-policy "
                      f"rollouts of this size: all pairs right in {orc.get('all_pairs', float('nan')):.0%}  "
                      f"[critics {fit_s:.1f} s, estimates {dr_s:.1f} s]", flush=True)
        everything[str(run)] = {"seed": cfg.seed, "sessions": n_s, "truth_seconds": truth_s, "log_seconds": log_s,
                                "log_passes": sizes[-1], "truths": {r: {**t, "pairs": [list(p) for p in t["pairs"]]}
                                                                   for r, t in truths.items()}, "rows": rows}
        if args.out:
            Path(args.out).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
