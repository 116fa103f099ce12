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
    logged draw itself is one hit). Chunked over requests, vectorised over draws."""
    rng = np.random.default_rng(seed)
    n, k = len(logged), len(default_alpha)
    if noise == 0:
        return np.ones(n)
    hits = np.zeros(n)
    for lo in range(0, n, chunk):  # memory bound: chunk x draws x candidates
        hi = min(lo + chunk, n)
        alpha = np.clip(default_alpha + noise * rng.standard_normal((hi - lo, draws, k)), low, high)
        o = np.broadcast_to(cand_o[lo:hi, None], (hi - lo, draws, *cand_o.shape[1:]))
        m = np.broadcast_to(cand_mask[lo:hi, None], (hi - lo, draws, cand_mask.shape[1]))
        _, idx = fuse_and_rank(o, alpha[:, :, None, :].astype(np.float32), m, beta=spec.beta, kind=spec.kind,
                               top=spec.top)
        hits[lo:hi] = same_slate(np.sort(idx, -1), logged[lo:hi, None]).sum(1)
    return (1.0 + hits) / (1.0 + draws)
