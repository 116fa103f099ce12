"""Multi-task score fusion: one ranking score from a backbone's K task predictions.

All functions take predictions ``o`` of shape [..., K] (probabilities in [0, 1]) and
weights ``alpha`` broadcastable to it (one weighting per request: [B, 1, K] against
candidates [B, C, K]), and work on numpy arrays or torch tensors alike.

- ``log_sum``:  f = sum_k alpha_k log(o_k + beta_k)   (BatchRL-MTF; monotone in the product form)
- ``product``:  f = prod_k (o_k + beta_k) ** alpha_k  (= exp(log_sum); same ranking)
- ``weighted_sum``: f = sum_k alpha_k o_k

``beta`` (scalar or [K]) keeps log(o + beta) finite and flattens a task's influence
when the prediction is tiny: a larger beta_k makes ranking less sensitive to o_k.
``rank_candidates`` orders each request's candidates by the fused score, with padded
candidates (mask False) always last.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from rmtl.errors import ConfigError

Array = np.ndarray | torch.Tensor
DEFAULT_BETA = 1e-3


def _lib(x: Array):
    return torch if isinstance(x, torch.Tensor) else np


def _as_like(value, like: Array):
    """``value`` (scalar, list, array or tensor) in the library and dtype of ``like``."""
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return np.asarray(value, dtype=like.dtype)


def log_sum(o: Array, alpha: Array, beta: float | Array = DEFAULT_BETA) -> Array:
    """f = sum_k alpha_k * log(o_k + beta_k) over the last axis."""
    lib = _lib(o)
    return (_as_like(alpha, o) * lib.log(o + _as_like(beta, o))).sum(-1)


def product(o: Array, alpha: Array, beta: float | Array = DEFAULT_BETA) -> Array:
    """f = prod_k (o_k + beta_k) ** alpha_k over the last axis (exp of ``log_sum``)."""
    lib = _lib(o)
    return lib.exp(log_sum(o, alpha, beta))


def weighted_sum(o: Array, alpha: Array, beta: float | Array = 0.0) -> Array:
    """f = sum_k alpha_k * o_k over the last axis (``beta`` is accepted and ignored)."""
    return (_as_like(alpha, o) * o).sum(-1)


FUSIONS: dict[str, Callable] = {"log_sum": log_sum, "product": product, "weighted_sum": weighted_sum}


def get_fusion(name: str) -> Callable:
    if name not in FUSIONS:
        raise ConfigError(f"unknown fusion '{name}'; known: {', '.join(sorted(FUSIONS))}", key="fusion")
    return FUSIONS[name]


def fuse(o: Array, alpha: Array, beta: float | Array = DEFAULT_BETA, kind: str = "log_sum") -> Array:
    """Fused score [...] of predictions [..., K] with the fusion ``kind``."""
    return get_fusion(kind)(o, alpha, beta)


def rank_candidates(scores: Array, mask: Array | None = None, top: int | None = None) -> Array:
    """Candidate indices of each request [B, C] ordered by descending score.

    Padded candidates (``mask`` False) sort after every real one; ties keep the
    candidate order (stable sort). ``top`` keeps only the first ``top`` columns.
    """
    lib = _lib(scores)
    if mask is not None:
        neg_inf = -torch.inf if lib is torch else -np.inf
        keep = torch.as_tensor(mask, dtype=torch.bool, device=scores.device) if lib is torch else np.asarray(mask, bool)
        scores = lib.where(keep, scores, neg_inf)
    if lib is torch:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    else:
        order = np.argsort(-scores, axis=-1, kind="stable")
    return order if top is None else order[..., :top]


def fuse_and_rank(o: Array, alpha: Array, mask: Array | None = None, *, beta: float | Array = DEFAULT_BETA,
                  kind: str = "log_sum", top: int | None = None) -> tuple[Array, Array]:
    """(fused scores [B, C], ranked candidate indices [B, top]) for predictions [B, C, K] and
    one weighting per request ``alpha`` [B, K] (or [K] for all requests)."""
    alpha = _as_like(alpha, o)
    if alpha.ndim == 2:
        alpha = alpha[:, None, :]
    scores = fuse(o, alpha, beta, kind)
    return scores, rank_candidates(scores, mask, top)
