"""Shared-Bottom (Caruana 1997): one shared MLP over the embeddings, one tower per task."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rmtl.backbones import options as opt
from rmtl.backbones.base import MultiTaskBackbone
from rmtl.backbones.layers import MLP, FeatureEmbedding
from rmtl.data.spec import FeatureSpec


class SharedBottom(MultiTaskBackbone):
    """Options: embed_dim, dense_dim, bottom_dims, tower_dims, dropout, activation.

    Shared: embedding + bottom MLP; task k: its tower. The cut is the bottom output.
    """

    def __init__(self, spec: FeatureSpec, embed_dim: int = 16, dense_dim: int | None = None,
                 bottom_dims: Sequence[int] = (256, 128), tower_dims: Sequence[int] = (64,), dropout: float = 0.0,
                 activation: str = "relu"):
        super().__init__(spec)
        embed_dim, dropout, activation, dense_dim = opt.common(embed_dim, dropout, activation, dense_dim)
        bottom_dims = opt.dims("bottom_dims", bottom_dims)
        tower_dims = opt.dims("tower_dims", tower_dims, allow_empty=True)
        self.features = FeatureEmbedding(spec, embed_dim, dense_dim)
        self.bottom = MLP(self.features.output_dim, bottom_dims, dropout=dropout, activation=activation)
        self.task_modules = nn.ModuleList(
            MLP(self.bottom.output_dim, tower_dims, dropout=dropout, activation=activation, out_dim=1)
            for _ in range(self.num_tasks))

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        shared = self.bottom(self.features(sparse, dense))
        return torch.cat([tower(shared) for tower in self.task_modules], dim=1), shared
