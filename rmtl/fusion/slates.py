"""What a fusion action does: the slate it shows, the slate's features, and its propensity.

The fusion world depends on the weights alpha only through the slate they pick: the top
``slate`` candidates by the fused score of the ranker's predictions (rmtl.fusion.simulator).
Two weightings that show the same items lead to the same reward and next state. The offline
estimators use this known, logged mechanism (the ranking function is part of the system, not
of the unknown user):

- ``slate_features``: the action as what it shows, the sum of the ranker's predictions over the
  shown items [K] and the number of shown items that were logged in the request [1]. A Q
  function on these features can value a weighting the log never used (equal weights with hate
  at +0.5) whenever it picks slates like the logged ones.
- ``same_slate`` / ``slate_propensity``: the slate as a discrete action, so importance sampling
  needs no kernel over the continuous alpha: a deterministic target policy has weight
  1[its slate = the logged slate] / P_behaviour(logged slate | state). The logger knows its own
  distribution (default weighting + Gaussian noise, clipped) and logs that probability,
  estimated by Monte Carlo with the logged draw counted in ((1 + hits) / (1 + draws), never 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rmtl.fusion.functions import fuse_and_rank


@dataclass(frozen=True)
class SlateSpec:
    """How the simulator turns alpha into a slate (its env options)."""

    window: int  # the first ``window`` candidates are the request's logged items
    top: int  # slate size
    beta: float = 1e-3
    kind: str = "log_sum"

    @classmethod
    def of(cls, env_cfg) -> "SlateSpec":
        return cls(int(env_cfg.window), int(env_cfg.slate), float(env_cfg.beta), str(env_cfg.fusion))

    def to_dict(self) -> dict:
        return asdict(self)


def shown(cand_o: np.ndarray, cand_mask: np.ndarray, alpha: np.ndarray, spec: SlateSpec) -> np.ndarray:
    """int64 [N, top]: candidate indices of the slate ``alpha`` [N, K] shows, sorted (a set)."""
    _, idx = fuse_and_rank(cand_o, np.asarray(alpha, np.float32), cand_mask, beta=spec.beta, kind=spec.kind,
                           top=spec.top)
    return np.sort(np.asarray(idx, np.int64), axis=1)


def slate_features(cand_o: np.ndarray, idx: np.ndarray, spec: SlateSpec) -> np.ndarray:
    """float32 [N, 2K+1]: summed predictions over the shown logged items [K] and over the shown
    sampled ones [K], and the number of shown logged items. Kept apart because the two are answered
    differently (logged labels vs the user model), so equal predictions need not mean equal rewards."""
    o = np.take_along_axis(cand_o, idx[:, :, None], 1)
    logged = (idx < spec.window)[:, :, None]
    return np.concatenate([(o * logged).sum(1), (o * ~logged).sum(1), logged.sum(1)], 1).astype(np.float32)


def slate_feature_dim(num_tasks: int) -> int:
    return 2 * num_tasks + 1


def same_slate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool [N]: the two (sorted) slates hold the same candidates."""
    return (a == b).all(-1)


def slate_propensity(cand_o: np.ndarray, cand_mask: np.ndarray, logged: np.ndarray, default_alpha: np.ndarray,
                     noise: float, low: float, high: float, spec: SlateSpec, draws: int = 256, seed: int = 0,
                     chunk: int = 1024) -> np.ndarray:
    """float64 [N]: P(the behaviour policy shows the ``logged`` slate [N, top] | the request), by Monte
    Carlo over ``draws`` alphas clip(default + N(0, noise^2)) per request ((1 + hits) / (1 + draws): the
    logged draw itself is one hit). Chunked over requests; per chunk one batched matrix product scores
    every candidate under every draw (the fused score is linear in alpha), and a draw is a hit when the
    weakest logged-slate member still outranks every other candidate."""
    rng = np.random.default_rng(seed)
    n, k = len(logged), len(default_alpha)
    if noise == 0:
        return np.ones(n)
    logged = np.asarray(logged, np.int64)
    base = _score_basis(np.asarray(cand_o, np.float32), spec)  # [N, C, K], once per candidate
    first_copy = _first_copy(base)  # identical candidates get identical scores (their ties are exact)
    pad = np.where(np.asarray(cand_mask, bool), 0.0, -np.inf).astype(np.float32)  # padded ones rank last
    hits = np.zeros(n)
    for lo in range(0, n, chunk):  # memory bound: chunk x draws x candidates
        hi = min(lo + chunk, n)
        alpha = np.clip(default_alpha + noise * rng.standard_normal((hi - lo, draws, k)), low, high)
        scores = np.matmul(alpha.astype(np.float32), base[lo:hi].transpose(0, 2, 1))  # [n, draws, C]
        if spec.kind == "product":
            scores = np.exp(scores)
        scores = np.take_along_axis(scores, first_copy[lo:hi, None, :], 2) + pad[lo:hi, None, :]
        hits[lo:hi] = _shows(scores, logged[lo:hi]).sum(1)
    return (1.0 + hits) / (1.0 + draws)


def _score_basis(cand_o: np.ndarray, spec: SlateSpec) -> np.ndarray:
    """float32 [N, C, K]: the per-task terms the fused score is linear in (log(o + beta), or o)."""
    if spec.kind in ("log_sum", "product"):
        return np.log(cand_o + np.asarray(spec.beta, np.float32))
    if spec.kind == "weighted_sum":
        return cand_o
    raise ValueError(f"unknown fusion '{spec.kind}'")


def _first_copy(base: np.ndarray) -> np.ndarray:
    """int64 [N, C]: for each candidate the first candidate of its request with the same score terms
    (itself when unique): a popular video can be sampled twice, and the copies must tie exactly."""
    same = (base[:, :, None, :] == base[:, None, :, :]).all(-1)  # [N, C, C]
    return same.argmax(2)


def _shows(scores: np.ndarray, logged: np.ndarray) -> np.ndarray:
    """bool [n, D]: the ``logged`` slate [n, top] is exactly the top of ``scores`` [n, D, C] as
    rank_candidates orders them (descending, ties by candidate index): its weakest member outranks
    the strongest candidate outside it. Ties (exact copies) are settled by index, for those draws only."""
    at = np.broadcast_to(logged[:, None, :], (*scores.shape[:2], logged.shape[1]))
    inside = np.take_along_axis(scores, at, 2)
    weakest = inside.min(2)
    outside = scores.copy()
    np.put_along_axis(outside, at, -np.inf, 2)
    strongest = outside.max(2)
    hit = weakest > strongest
    r, d = np.nonzero(weakest == strongest)
    if len(r):  # a tie: the slate member must come first in candidate order
        index = np.arange(scores.shape[2])
        weakest_at = np.where(inside[r, d] == weakest[r, d, None], logged[r], -1).max(1)
        is_out = np.ones((len(r), scores.shape[2]), bool)
        np.put_along_axis(is_out, logged[r], False, 1)
        strongest_at = np.where(is_out & (scores[r, d] == strongest[r, d, None]), index, scores.shape[2]).min(1)
        hit[r, d] = weakest_at < strongest_at
    return hit
