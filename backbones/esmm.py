"""ESMM (Ma et al., SIGIR 2018): entire-space multi-task model.

Tower 0 predicts CTR = P(click); tower k >= 1 predicts the CONDITIONAL P(task k | task
k-1) (CVR for k = 1), and the model's task k is the product over the chain, e.g.
CTCVR = CTR x CVR, so every task is trained on the entire impression space. The chain
stays in log space: with a_j the tower logits,
    log p_k      = sum_{j<=k} logsigmoid(a_j)
    log(1 - p_k) = logsumexp_{j<=k} (sum_{i<j} logsigmoid(a_i) + logsigmoid(-a_j))
(the telescoping sum 1 - prod p_j = sum_j prod_{i<j} p_i (1 - p_j)), and the returned
logit is log p_k - log(1 - p_k): the same number as log p - log1p(-p), without the
cancellation when p is near 1, finite for any finite tower logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rmtl.backbones import options as opt
from rmtl.backbones.base import MultiTaskBackbone
from rmtl.backbones.layers import MLP, FeatureEmbedding
from rmtl.data.spec import FeatureSpec
from rmtl.errors import ConfigError


def chain_logits(a: torch.Tensor) -> torch.Tensor:
    """Tower logits a [B, K] (a_0: first task, a_k: task k given task k-1) -> logits of
    the products p_k = prod_{j<=k} sigmoid(a_j), [B, K], computed in float32 log space."""
    a = a.float()
    log_p = torch.cumsum(F.logsigmoid(a), dim=1)
    before = torch.cat([torch.zeros_like(log_p[:, :1]), log_p[:, :-1]], dim=1)  # log prod_{i<j} p_i
    log_not = torch.logcumsumexp(before + F.logsigmoid(-a), dim=1)  # log(1 - p_k)
    return log_p - log_not


class ESMM(MultiTaskBackbone):
    """Options: embed_dim, dense_dim, tower_dims, dropout, activation. Needs K >= 2 tasks in
    chain order (e.g. ctr, ctcvr). Shared: the embedding (the cut); task k: tower k (tower 0
    also feeds every later task's product). ``conditional_logits`` gives the towers' a [B, K]."""

    def __init__(self, spec: FeatureSpec, embed_dim: int = 16, dense_dim: int | None = None,
                 tower_dims: Sequence[int] = (128, 64), dropout: float = 0.0, activation: str = "relu"):
        super().__init__(spec)
        if spec.num_tasks < 2:
            raise ConfigError(f"esmm needs at least 2 tasks in chain order (e.g. ctr, ctcvr); the data has "
                              f"{spec.num_tasks}: {spec.tasks}", key="model.name")
        embed_dim, dropout, activation, dense_dim = opt.common(embed_dim, dropout, activation, dense_dim)
        tower_dims = opt.dims("tower_dims", tower_dims, allow_empty=True)
        self.features = FeatureEmbedding(spec, embed_dim, dense_dim)
        self.task_modules = nn.ModuleList(
            MLP(self.features.output_dim, tower_dims, dropout=dropout, activation=activation, out_dim=1)
            for _ in range(self.num_tasks))

    def _towers(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([tower(x) for tower in self.task_modules], dim=1)

    def conditional_logits(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self._towers(self.features(sparse, dense))

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        x = self.features(sparse, dense)
        return chain_logits(self._towers(x)), x
