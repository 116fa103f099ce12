"""Offline estimators checked against the simulator's truth, inside the fusion run.

Every estimator of a policy's value (FQE, conservative FQE) targets the expected
discounted return from the held-out sessions' initial states. The evaluation simulator
(test sessions, held-out user model) can measure that directly by rolling the policy
out; ``true_value`` does so. ``estimator_report`` puts each estimate next to the truth
(error per policy) and gives each estimator's Spearman rank correlation with the truth
across policies: an evaluator whose ranking disagrees with the truth should not pick a
policy. MTF-GAUC is no value estimate, so it enters the rank correlation only.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from rmtl.fusion.data import rollout
from rmtl.fusion.simulator import FusionSimulator
from rmtl.tables import text_table

Policy = Callable[[np.ndarray], np.ndarray]


TRUTH_BATCH = 32768  # sessions per batched truth rollout (memory: ~1 kB of simulator state each)


def true_value(sim: FusionSimulator, act: Policy, sessions: np.ndarray, *, gamma: float, repeats: int = 1,
               seed: int = 0, batch: int = TRUTH_BATCH) -> np.ndarray:
    """Discounted returns sum_t gamma^t r_t of ``act`` from ``sessions``, ``repeats`` passes
    ([repeats * len(sessions)], pass by pass); the simulator's random stream is reset to
    ``seed`` first, so every policy meets the same draws (common random numbers: differences
    between policies are paired, and far less noisy than each value). The passes run as few
    batched rollouts of the sessions repeated (``batch`` sessions at most), not one per pass."""
    sim.rng = np.random.default_rng(seed)
    sessions = np.asarray(sessions, np.int64)
    per = max(1, int(batch) // len(sessions))  # passes per rollout
    return np.concatenate([rollout(sim, act, np.tile(sessions, min(per, int(repeats) - done)), gamma=gamma)[0]
                           for done in range(0, int(repeats), per)])


def distinguishable_pairs(returns: dict[str, np.ndarray], z: float = 2.0) -> list[tuple[str, str]]:
    """Pairs (better, worse) of policies whose paired mean difference in true value exceeds
    ``z`` standard errors: the order the truth actually establishes."""
    names = list(returns)
    out = []
    for i, a in enumerate(names):  # a handful of policies: pairs, not samples
        for b in names[i + 1:]:
            diff = returns[a] - returns[b]
            se = diff.std() / np.sqrt(len(diff))
            if abs(diff.mean()) > z * max(se, 1e-12):
                out.append((a, b) if diff.mean() > 0 else (b, a))
    return out


def resolution(returns: dict[str, np.ndarray], pairs: list, *, sessions: int, passes: int) -> dict:
    """How well policies can be ordered from as many sessions as the held-out log has, by on-policy rollouts.

    The truth's ``returns`` (R passes over ``sessions`` per policy, under common random numbers) are cut
    into R // ``passes`` disjoint samples of ``passes`` passes (the held-out log's size); each sample's
    means are ordered against the full truth. "paired" keeps the common random numbers (sample b of
    every policy); "independent" gives policy i sample b + i. No unbiased estimator from the same number
    of behaviour sessions has a lower variance for a deterministic policy's value than on-policy rollouts
    of that policy (Cramer-Rao bound of Jiang & Li 2016: with slate weights 1/propensity >= 1 on the target's
    support each of its terms is at least the on-policy one), so "independent" is what an ideal off-policy
    estimator's single values can do at best; "paired" is the best case for differences (an off-policy
    estimator pairs its policies only through the shared log). Returns {"samples", "episodes",
    <mode>: {"spearman": mean, "pairs": mean share of the established ``pairs`` ordered right,
    "all_pairs": share of samples ordering every one of them right}}, modes missing with too few samples."""
    names = list(returns)
    total = len(next(iter(returns.values()))) // sessions
    n = total // passes
    out: dict = {"samples": n, "episodes": passes * sessions}
    if n < 2 or not pairs:
        return out
    means = {p: np.asarray(r[:n * passes * sessions], np.float64).reshape(n, passes * sessions).mean(1)
             for p, r in returns.items()}  # [n] per policy
    truth = np.array([np.mean(returns[p]) for p in names])
    for mode, shift in (("paired", 0), ("independent", 1)):
        if mode == "independent" and n < len(names):
            continue
        est = np.stack([np.roll(means[p], -shift * i) for i, p in enumerate(names)], 1)  # [n, policies]
        col = {p: i for i, p in enumerate(names)}
        right = np.stack([est[:, col[a]] > est[:, col[b]] for a, b in pairs], 1)  # [n, pairs]
        out[mode] = {"spearman": float(np.nanmean([spearman(e, truth) for e in est])),
                     "pairs": float(right.mean()), "all_pairs": float(right.all(1).mean())}
    return out


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank."""
    from scipy.stats import rankdata

    return rankdata(np.asarray(values, np.float64), method="average")


def spearman(x, y) -> float:
    """Spearman rank correlation (NaN with fewer than 2 policies or a constant side)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return float("nan")
    rx, ry = rank(x), rank(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def tie_aware(point: dict, samples: dict, pairs: list, z: float = 2.0) -> dict:
    """The tie-aware check of one estimator: its verdict per pair from paired bootstrap ``samples``
    (rmtl.fusion.ope.verdicts: ">", "<" or "~" cannot distinguish) against the truth's established
    ``pairs`` (better, worse). Passes when every established pair is ordered right by the point
    estimates and no pair the truth does not establish is claimed either way."""
    from rmtl.fusion.ope import verdicts

    v = verdicts(samples, z)
    established = {tuple(p) for p in pairs}
    claimed = [[a, b] if s == ">" else [b, a] for (a, b), s in v.items()
               if s != "~" and (a, b) not in established and (b, a) not in established]
    wrong_way = [[a, b] for a, b in pairs if not point[a] > point[b]]
    ties = [[a, b] for a, b in pairs if v.get((a, b), v.get((b, a))) == "~"]
    return {"verdicts": {f"{a} {s} {b}": s for (a, b), s in v.items()}, "established_wrong_way": wrong_way,
            "claimed_untrue": claimed, "established_called_tie": ties, "pass": not wrong_way and not claimed}


def estimator_report(table: dict, estimators: dict[str, str], *, truth: str = "true_value",
                     rank_only: tuple[str, ...] = ("mtf_gauc",), pairs: list[tuple[str, str]] | None = None,
                     samples: dict | None = None, z: float = 2.0) -> dict:
    """For the value ``estimators`` (column -> label) and the ``rank_only`` columns over the
    policies of ``table``: {"errors": {col: {policy: estimate - truth}}, "rank_corr": {col: rho},
    "same_order": {col: bool}, "pairs": [[better, worse], ...] (the truth's significant order),
    "concordant": {col: share of those pairs the estimator orders the same way},
    "tie_aware": {col: tie_aware(...)} for the columns with bootstrap ``samples`` {col: {policy: [B]}}}."""
    names = list(table)
    t = np.asarray([table[p][truth] for p in names], np.float64)
    pairs = list(pairs or [])
    report: dict = {"errors": {}, "rank_corr": {}, "same_order": {}, "pairs": [list(x) for x in pairs],
                    "concordant": {}, "tie_aware": {}}
    for col in [*estimators, *rank_only]:
        est = np.asarray([table[p].get(col, np.nan) for p in names], np.float64)
        if not np.isfinite(est).all():
            continue
        if col in estimators:
            report["errors"][col] = {p: float(e - v) for p, e, v in zip(names, est, t)}
        report["rank_corr"][col] = spearman(est, t)
        report["same_order"][col] = bool(np.array_equal(rank(est), rank(t)))
        if pairs:
            report["concordant"][col] = float(np.mean([table[a][col] > table[b][col] for a, b in pairs]))
        if samples and col in samples:
            report["tie_aware"][col] = tie_aware({p: table[p][col] for p in names}, samples[col], pairs, z)
    return report


def format_report(table: dict, report: dict, estimators: dict[str, str], truth: str = "true_value") -> str:
    """Per policy: the truth, then estimate, +-2 s.e. (bootstrap, where there is one) and error of each
    value estimator; then each estimator's rank correlation with the truth, share of the truth's
    pairs, the tie-aware check, and the first (default) estimator's verdicts."""
    cols = [c for c in estimators if c in report["errors"]]
    head = ["policy", truth]
    for c in cols:
        head += [estimators[c], "+-2se", "error"] if f"{c}_se" in next(iter(table.values())) else \
            [estimators[c], "error"]
    rows = [head]
    for p, r in table.items():
        row = [p, f"{r[truth]:.3f}"]
        for c in cols:
            row += [f"{r[c]:.3f}"] + ([f"{2 * r[c + '_se']:.3f}"] if f"{c}_se" in r else []) + \
                   [f"{report['errors'][c][p]:+.3f}"]
        rows.append(row)
    pairs = report.get("pairs", [])
    shown = ", ".join(f"{a} > {b}" for a, b in pairs) or "none"
    lines = [text_table(rows, label_columns=1),
             f"order the truth establishes (paired difference > 2 s.e.): {shown}",
             "rank correlation with the simulator truth (Spearman), share of those pairs ordered right, tie-aware check:"]
    for c, rho in report["rank_corr"].items():
        label = estimators.get(c, f"{c} (ranks, no value)")
        same = "  same order" if report["same_order"][c] else ""
        conc = f"  pairs {report['concordant'][c]:.0%}" if c in report.get("concordant", {}) else ""
        ta = report.get("tie_aware", {}).get(c)
        check = ""
        if ta is not None:
            check = (f"  tie-aware {'PASS' if ta['pass'] else 'fail'} (wrong way {len(ta['established_wrong_way'])},"
                     f" claimed without the truth {len(ta['claimed_untrue'])})")
        lines.append(f"  {label:32s} {rho:+.3f}{conc}{same}{check}")
    res = report.get("resolution", {})
    if "paired" in res:
        p, i = res["paired"], res.get("independent")
        lines.append(f"resolution of the held-out log ({res['episodes']} sessions): on-policy rollouts of that many sessions "
                     f"per policy ({res['samples']} disjoint samples of the truth) order {p['pairs']:.0%} of those pairs "
                     f"right, all of them in {p['all_pairs']:.0%} of the samples (Spearman {p['spearman']:+.2f}) with "
                     f"common random numbers" + (f"; {i['pairs']:.0%}, all in {i['all_pairs']:.0%} (Spearman "
                                                 f"{i['spearman']:+.2f}) without" if i else ""))
    weights = report.get("weights") or {}
    if weights:
        step = next(iter(weights.values()))["step"]
        lines.append("slate weights on the held-out log (coverage: mean first-request weight, 1 = every slate the policy "
                     f"shows is logged; effective share of the sessions at step {step}): "
                     + ", ".join(f"{p} {w['coverage']:.2f} / {w['effective']:.1%}" for p, w in weights.items()))
    first = cols[0] if cols else None
    ta = report.get("tie_aware", {}).get(first)
    if ta is not None:
        ties = [k for k, s in ta["verdicts"].items() if s == "~"]
        sure = [k for k, s in ta["verdicts"].items() if s != "~"]
        lines.append(f"{estimators[first]} verdicts (paired bootstrap, z = {report.get('z', 2.0)}): "
                     f"distinguishes {', '.join(sure) or 'no pair'}; cannot distinguish {', '.join(ties) or 'none'}")
    return "\n".join(lines)
