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

    ``context_dim`` extra state columns (session context, rmtl.envs.context) join the
    embedded features; ``drop_fields`` (indices) are read as "unknown" (index 0), so ids
    can be kept out of the state; ``dropout`` acts between hidden layers in train mode.
    """

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, hidden: Sequence[int] = (64, 32),
                 context_dim: int = 0, drop_fields: Sequence[int] = (), dropout: float = 0.0):
        super().__init__()
        self.num_tasks = spec.num_tasks
        heads = 2 * self.num_tasks
        self.features = FeatureEmbedding(spec, embed_dim)
        self.context_dim = int(context_dim)
        self.dropout = float(dropout)
        keep = torch.ones(spec.num_sparse, dtype=torch.int64)
        keep[list(drop_fields)] = 0
        self.register_buffer("keep", keep, persistent=False)
        self.drops = bool(len(drop_fields))
        dims = [int(h) for h in hidden]
        self.state_in = BatchedLinear(heads, self.features.output_dim + self.context_dim, dims[0])
        self.action_in = nn.Parameter(torch.randn(heads, 1, dims[0]) * 0.1)
        self.layers = nn.ModuleList(BatchedLinear(heads, a, b) for a, b in zip(dims, dims[1:] + [1]))

    def state_features(self, sparse: torch.Tensor, dense: torch.Tensor,
                       context: torch.Tensor | None = None) -> torch.Tensor:
        if self.drops:
            sparse = sparse * self.keep
        x = self.features(sparse, dense)
        if self.context_dim:
            if context is None or context.shape[-1] != self.context_dim:
                raise ValueError(f"these critics read {self.context_dim} session-context columns; "
                                 f"got {None if context is None else context.shape[-1]}")
            x = torch.cat([x, context.to(x.dtype)], dim=1)
        return x

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, actions: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """actions [B, K] in [0, 1] (and context [B, C]) -> Q [B, 2, K] (twin, task)."""
        return self.from_features(self.state_features(sparse, dense, context), actions)

    def from_features(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        a = actions.to(x.dtype).repeat(1, 2)  # [B, 2K]: head j*K + k reads a_k
        h = self.state_in(x) + a.unsqueeze(-1) * self.action_in.transpose(0, 1)  # [B, 2K, H]
        for i, layer in enumerate(self.layers):
            h = F.relu(h)
            if self.dropout:
                h = F.dropout(h, self.dropout, self.training)
            h = layer(h)
        return -F.softplus(h.view(b, 2, self.num_tasks))
