"""Twin per-task critics Q_k(s, a_k) <= 0, all 2K heads evaluated as one batched module."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from rmtl.backbones.layers import BatchedLinear, FeatureEmbedding
from rmtl.data.spec import FeatureSpec


class TwinTaskCritics(nn.Module):
    """Q[b, j, k] for twin j in {0, 1} and task k, over the backbone's feature layout.

    The state goes through one FeatureEmbedding (one table for all sparse fields, as in
    the backbones); each of the 2K heads is an MLP over [state, a_k]. The heads' first
    layer is split into a state part (one batched matmul shared by all heads) and an
    action part (a per-head vector times a_k), so nothing is copied 2K times. Outputs pass
    through -softplus, so every Q is <= 0 like the rewards (negative BCE).
    """

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, hidden: Sequence[int] = (64, 32)):
        super().__init__()
        self.num_tasks = spec.num_tasks
        heads = 2 * self.num_tasks
        self.features = FeatureEmbedding(spec, embed_dim)
        dims = [int(h) for h in hidden]
        self.state_in = BatchedLinear(heads, self.features.output_dim, dims[0])
        self.action_in = nn.Parameter(torch.randn(heads, 1, dims[0]) * 0.1)
        self.layers = nn.ModuleList(BatchedLinear(heads, a, b) for a, b in zip(dims, dims[1:] + [1]))

    def state_features(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.features(sparse, dense)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """actions [B, K] in [0, 1] -> Q [B, 2, K] (twin, task)."""
        return self.from_features(self.state_features(sparse, dense), actions)

    def from_features(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        a = actions.to(x.dtype).repeat(1, 2)  # [B, 2K]: head j*K + k reads a_k
        h = self.state_in(x) + a.unsqueeze(-1) * self.action_in.transpose(0, 1)  # [B, 2K, H]
        for layer in self.layers:
            h = layer(F.relu(h))
        return -F.softplus(h.view(b, 2, self.num_tasks))
