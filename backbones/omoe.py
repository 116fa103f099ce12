"""OMoE (one-gate mixture of experts): shared experts, ONE gate shared by all tasks."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rmtl.backbones import options as opt
from rmtl.backbones.base import MultiTaskBackbone
from rmtl.backbones.layers import MLP, Experts, FeatureEmbedding, mix_experts
from rmtl.data.spec import FeatureSpec


class OMoE(MultiTaskBackbone):
    """Options: embed_dim, dense_dim, num_experts, expert_dims, tower_dims, dropout, activation.

    Shared: embedding, experts, the gate; task k: its tower. Every task reads the same
    gated mixture, which is the cut. ``last_gate_usage`` is [K, E] (identical rows).
    """

    def __init__(self, spec: FeatureSpec, embed_dim: int = 16, dense_dim: int | None = None, num_experts: int = 4,
                 expert_dims: Sequence[int] = (256, 128), tower_dims: Sequence[int] = (64,), dropout: float = 0.0,
                 activation: str = "relu"):
        super().__init__(spec)
        embed_dim, dropout, activation, dense_dim = opt.common(embed_dim, dropout, activation, dense_dim)
        num_experts = opt.positive_int("num_experts", num_experts)
        expert_dims = opt.dims("expert_dims", expert_dims)
        tower_dims = opt.dims("tower_dims", tower_dims, allow_empty=True)
        self.features = FeatureEmbedding(spec, embed_dim, dense_dim)
        d_in = self.features.output_dim
        self.experts = Experts(num_experts, d_in, expert_dims, dropout=dropout, activation=activation)
        self.gate = nn.Linear(d_in, num_experts)
        self.task_modules = nn.ModuleList(
            MLP(self.experts.output_dim, tower_dims, dropout=dropout, activation=activation, out_dim=1)
            for _ in range(self.num_tasks))
        self.register_buffer("last_gate_usage", torch.zeros(self.num_tasks, num_experts), persistent=False)

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        x = self.features(sparse, dense)
        gate = torch.softmax(self.gate(x), dim=-1)  # [B, E]
        self.last_gate_usage = gate.detach().float().mean(0).expand(self.num_tasks, -1).clone()
        mixed = mix_experts(self.experts(x), gate.unsqueeze(1))[:, 0]  # [B, H]
        return torch.cat([tower(mixed) for tower in self.task_modules], dim=1), mixed
