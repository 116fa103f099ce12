"""Off-policy value estimates with their uncertainty: FQE ensembles and doubly robust estimates.

``fqe_ensemble`` fits ``members`` critics per policy, member m on the m-th bootstrap resample of
the held-out episodes (the same resample for every policy, so differences between policies
are paired), and returns each member's estimate. The mean is the estimate; the members'
spread is its bootstrap standard error; ``verdicts`` tells, pair by pair, whether the
estimator can order two policies at all (paired difference beyond ``z`` standard errors) or
cannot distinguish them.

``doubly_robust`` is the weighted per-decision doubly robust estimate (Thomas & Brunskill 2016)
on the slate as the action (rmtl.fusion.slates): a deterministic target policy's weight at a
request is 1[its slate = the logged slate] / the logged propensity of that slate, the
cumulative weights are self-normalised over episodes per step, and a critic's Q and V = Q(s, pi(s))
are the control variate. ``critic=None`` gives weighted per-decision importance sampling.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from rmtl.errors import DataError
from rmtl.fusion.data import FusionDataset
from rmtl.fusion.fqe import ConservativeFQE
from rmtl.fusion.slates import SlateSpec, same_slate, shown

Policy = Callable[[np.ndarray], np.ndarray]


def bootstrap_weights(data: FusionDataset, members: int, seed: int) -> np.ndarray:
    """float64 [members, N]: row weights = how often each row's episode is drawn in resample m
    (episodes drawn with replacement; one member = the data itself, all ones)."""
    if members == 1:
        return np.ones((1, len(data)))
    episode, _, _ = episode_grid(data)
    return bootstrap_counts(data, members, seed)[:, episode]


def fqe_ensemble(data: FusionDataset, policies: dict[str, Policy], *, members: int, seed: int = 0,
                 steps: int = 1000, batch_size: int = 256, on_fit: Callable | None = None,
                 **fqe_options) -> tuple[dict[str, np.ndarray], dict[str, list[ConservativeFQE]]]:
    """({policy: estimates [members]}, {policy: the fitted critics}). Member m: FQE seed ``seed + m`` on
    bootstrap resample m of the episodes; ``on_fit(policy, m, critic)`` after each fit."""
    weights = bootstrap_weights(data, members, seed)
    estimates: dict[str, np.ndarray] = {}
    critics: dict[str, list[ConservativeFQE]] = {}
    for name, act in policies.items():
        vals, fitted = [], []
        for m in range(members):
            fqe = ConservativeFQE(data.obs.shape[1], data.action.shape[1], seed=seed + m, **fqe_options)
            fqe.fit(data, act, steps=steps, batch_size=batch_size, weights=weights[m])
            vals.append(fqe.estimate(data, act, weights[m]))
            fitted.append(fqe)
            if on_fit is not None:
                on_fit(name, m, fqe)
        estimates[name], critics[name] = np.asarray(vals), fitted
    return estimates, critics


def episode_grid(data: FusionDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(episode index [N] in 0..E-1, step [N] within the episode, E): rows on an episode x step grid."""
    _, ep = np.unique(data.episode, return_inverse=True)
    order = np.argsort(ep, kind="stable")  # rows of an episode are in step order
    start = np.r_[0, np.flatnonzero(np.diff(ep[order])) + 1]
    step = np.empty(len(ep), np.int64)
    step[order] = np.arange(len(ep)) - np.repeat(start, np.diff(np.r_[start, len(ep)]))
    return ep, step, int(ep.max()) + 1


def slate_ratios(data: FusionDataset, policy: Policy, spec: SlateSpec) -> np.ndarray:
    """float64 [N]: 1[pi's slate = the logged slate] / logged propensity, per request."""
    if data.propensity is None or not data.has_candidates():
        raise DataError("importance weights need the logged candidates and slate propensities (cand_o, "
                        "cand_mask, propensity): log the data with a behaviour policy", column="propensity")
    logged = shown(data.cand_o, data.cand_mask, data.action, spec)
    target = shown(data.cand_o, data.cand_mask, policy(data.obs), spec)
    return same_slate(logged, target) / np.asarray(data.propensity, np.float64)


def doubly_robust(data: FusionDataset, policy: Policy, spec: SlateSpec, gamma: float,
                  critic: ConservativeFQE | None = None, episode_weights: np.ndarray | None = None) -> float:
    """Weighted per-decision doubly robust value of ``policy`` (WPDIS when ``critic`` is None).
    ``episode_weights`` [N] (rows of an episode alike): a bootstrap resample's episode counts."""
    grids = dr_terms(data, policy, spec, gamma, critic)
    count = None
    if episode_weights is not None:
        ep, _, n_ep = episode_grid(data)
        count = np.ones(n_ep)
        count[ep] = np.asarray(episode_weights, np.float64)
    return weighted_dr(grids, count)


def dr_terms(data: FusionDataset, policy: Policy, spec: SlateSpec, gamma: float,
             critic: ConservativeFQE | None = None) -> dict:
    """The episode x step grids the estimate is made of: ratios, rewards, Q(s, a_logged), V(s) = Q(s, pi(s))
    (zeros without a critic) and the discounts. After an episode ends: reward 0, ratio 1 (absorbing)."""
    ep, step, n_ep = episode_grid(data)
    horizon = int(step.max()) + 1

    def grid(values, fill):
        out = np.full((n_ep, horizon), fill, np.float64)
        out[ep, step] = values
        return out

    q = critic.q_values(data) if critic is not None else np.zeros(len(data))
    v = critic.q_values(data, policy) if critic is not None else np.zeros(len(data))
    return {"rho": grid(slate_ratios(data, policy, spec), 1.0), "reward": grid(data.reward, 0.0),
            "q": grid(q, 0.0), "v": grid(v, 0.0), "disc": gamma ** np.arange(horizon)}


def weighted_dr(g: dict, count: np.ndarray | None = None) -> float:
    """The weighted per-decision DR estimate from ``dr_terms`` grids; ``count`` [E] weights episodes
    (a bootstrap resample)."""
    n_ep = g["rho"].shape[0]
    return float(weighted_dr_many(g, (np.ones(n_ep) if count is None else np.asarray(count, np.float64))[None])[0])


def weighted_dr_many(g: dict, counts: np.ndarray) -> np.ndarray:
    """float64 [B]: the weighted per-decision DR estimate under each row of episode ``counts`` [B, E]
    (bootstrap resamples), as matrix products: every term is linear in the counts up to the
    per-step self-normalisation, so B resamples cost three [B, E] x [E, T] products, no loop."""
    counts = np.asarray(counts, np.float64)
    w = np.cumprod(g["rho"], axis=1)  # cumulative weights [E, T]
    w_prev = np.concatenate([np.ones((len(w), 1)), w[:, :-1]], axis=1)
    total = counts @ w  # self-normaliser per step [B, T]
    total_prev = np.concatenate([counts.sum(1, keepdims=True), total[:, :-1]], axis=1)
    direct = counts @ (w * (g["reward"] - g["q"]))  # sum_e c_e W_et (r_et - Q_et)
    control = counts @ (w_prev * g["v"])  # sum_e c_e W_e,t-1 V_et
    terms = np.divide(direct, total, out=np.zeros_like(direct), where=total > 0) + \
        np.divide(control, total_prev, out=np.zeros_like(control), where=total_prev > 0)
    return terms @ g["disc"]


def capped(g: dict, cap: float, mode: str = "clip") -> dict:
    """``dr_terms`` grids whose cumulative weights are capped at ``cap``: "clip" = min(W, cap); "switch" = 0 where
    W > cap, so from there the critic's V carries the episode (SWITCH-DR, Wang et al. 2017, per decision). With an
    exact critic the DR estimate stays exact (only the critic's error is weighted); without one it is biased."""
    if mode not in ("clip", "switch"):
        raise ValueError(f"cap mode {mode!r}: expected clip or switch")
    w = np.cumprod(g["rho"], axis=1)
    w = np.minimum(w, cap) if mode == "clip" else np.where(w > cap, 0.0, w)
    prev = np.concatenate([np.ones((len(w), 1)), w[:, :-1]], axis=1)
    rho = np.divide(w, prev, out=np.ones_like(w), where=prev > 0)  # cumprod(rho) == w again
    return {**g, "rho": rho}


def weight_support(data: FusionDataset, policy: Policy, spec: SlateSpec, step: int = 5) -> dict:
    """How much of the held-out log the slate weights of ``policy`` can use. "coverage": the mean weight at the
    sessions' first requests, whose expectation is the behaviour's probability of showing the policy's slate
    somewhere (1 when the log covers every slate the policy shows; 0.26 = three quarters of them never logged,
    so importance sampling knows nothing of them and DR leans on its critic). "effective": the Kish effective
    sample size of the cumulative weights at ``step``, as a share of the sessions: beyond the step where it is a
    few percent, a handful of sessions (and the critic) carry the estimate, and more log barely helps."""
    rho = dr_terms(data, policy, spec, 1.0)["rho"]
    return {"coverage": float(rho[:, 0].mean()), "effective": effective_share(rho, [step])[0], "step": int(step)}


def effective_share(rho: np.ndarray, steps) -> list[float]:
    """Kish effective sample size (sum W)^2 / sum W^2 of the cumulative weights of ``rho`` [E, T] at each of
    ``steps``, as a share of the E episodes (1: all count alike; 1/E: one episode carries the step)."""
    w = np.cumprod(rho, axis=1)
    cols = w[:, np.minimum(np.asarray(steps, np.int64), w.shape[1] - 1)]  # [E, len(steps)]
    return [float(c.sum() ** 2 / max((c ** 2).sum(), 1e-300) / len(c)) for c in cols.T]


def bootstrap_counts(data: FusionDataset, resamples: int, seed: int) -> np.ndarray:
    """float64 [resamples, E]: episode counts of ``resamples`` bootstrap resamples (the same for every
    policy under one seed, so differences between policies are paired)."""
    _, _, n_ep = episode_grid(data)
    draws = np.random.default_rng(seed).integers(0, n_ep, size=(resamples, n_ep))
    flat = (draws + n_ep * np.arange(resamples)[:, None]).ravel()  # resample b's draws land in row b
    return np.bincount(flat, minlength=resamples * n_ep).reshape(resamples, n_ep).astype(np.float64)


def dr_with_bootstrap(data: FusionDataset, policy: Policy, spec: SlateSpec, gamma: float,
                      critic: ConservativeFQE | None, counts: np.ndarray) -> tuple[float, np.ndarray]:
    """(the estimate on the data, its value on each bootstrap resample ``counts`` [B, E]) with the
    critic held fixed (the interval covers the data's sampling noise, not the critic's fit)."""
    g = dr_terms(data, policy, spec, gamma, critic)
    return weighted_dr(g), weighted_dr_many(g, counts)


def verdicts(estimates: dict[str, np.ndarray], z: float = 2.0) -> dict[tuple[str, str], str]:
    """Per pair (a, b): ">" or "<" when the paired member differences put the mean beyond ``z``
    standard deviations of the members (a bootstrap standard error), else "~" (cannot distinguish)."""
    names = list(estimates)
    out = {}
    for i, a in enumerate(names):  # a handful of policies: pairs, not samples
        for b in names[i + 1:]:
            diff = np.asarray(estimates[a]) - np.asarray(estimates[b])
            se = diff.std(ddof=1) if len(diff) > 1 else np.inf
            out[(a, b)] = "~" if abs(diff.mean()) <= z * se else (">" if diff.mean() > 0 else "<")
    return out
