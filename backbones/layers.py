"""Building blocks shared by every backbone (and by the critics of the RMTL agent)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from rmtl.data.spec import FeatureSpec

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "prelu": nn.PReLU}


class FeatureEmbedding(nn.Module):
    """All sparse fields through ONE embedding table (per-field offsets), dense fields
    through a linear projection; output is the flat concatenation [B, output_dim].

    One table means one gather for all fields instead of a Python loop over fields.
    """

    def __init__(self, spec: FeatureSpec, embed_dim: int, dense_dim: int | None = None):
        super().__init__()
        self.num_fields = spec.num_sparse
        self.embed_dim = int(embed_dim)
        cards = torch.as_tensor([max(int(c), 1) for c in spec.cardinalities], dtype=torch.long)
        offsets = torch.zeros(len(cards), dtype=torch.long)
        if len(cards) > 1:
            offsets[1:] = torch.cumsum(cards, 0)[:-1]
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(int(cards.sum()) if len(cards) else 1, self.embed_dim)
        nn.init.normal_(self.table.weight, std=0.01)
        self.num_dense = spec.num_dense
        self.dense_dim = 0
        if self.num_dense:
            self.dense_dim = int(dense_dim) if dense_dim is not None else self.embed_dim
            self.dense_proj = nn.Linear(self.num_dense, self.dense_dim)
        self.output_dim = self.num_fields * self.embed_dim + self.dense_dim

    def field_embeddings(self, sparse: torch.Tensor) -> torch.Tensor:
        """[B, F, E] embeddings of the sparse fields."""
        return self.table(sparse + self.offsets)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.num_fields:
            parts.append(self.field_embeddings(sparse).flatten(1))
        if self.num_dense:
            parts.append(self.dense_proj(dense))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class MLP(nn.Sequential):
    """Linear -> activation -> dropout blocks, optionally followed by a linear output."""

    def __init__(self, in_dim: int, hidden: Sequence[int], *, dropout: float = 0.0, activation: str = "relu",
                 out_dim: int | None = None, batch_norm: bool = False):
        layers: list[nn.Module] = []
        dim = int(in_dim)
        for width in hidden:
            layers.append(nn.Linear(dim, int(width)))
            if batch_norm:
                layers.append(nn.BatchNorm1d(int(width)))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            dim = int(width)
        if out_dim is not None:
            layers.append(nn.Linear(dim, int(out_dim)))
            dim = int(out_dim)
        super().__init__(*layers)
        self.output_dim = dim


class BatchedLinear(nn.Module):
    """E independent linear layers applied as one batched matmul: [B, in] or [B, E, in] -> [B, E, out]."""

    def __init__(self, num: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(num, 1, out_dim))
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # same input for every expert: one [B, in] x [E, in, out] product
            return torch.matmul(x.unsqueeze(0), self.weight).add_(self.bias).transpose(0, 1)
        return torch.baddbmm(self.bias, x.transpose(0, 1), self.weight).transpose(0, 1)


class Experts(nn.Module):
    """E expert MLPs of identical shape evaluated together: [B, in] -> [B, E, out]."""

    def __init__(self, num: int, in_dim: int, hidden: Sequence[int], *, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        if not hidden:
            raise ValueError("experts need at least one hidden width")
        dims = [int(in_dim), *map(int, hidden)]
        self.layers = nn.ModuleList(BatchedLinear(num, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.num = int(num)
        self.output_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.dropout(self.act(layer(x)))
        return x
