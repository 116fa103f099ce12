"""MMoE (Ma et al., KDD 2018): shared experts, one softmax gate per task, one tower per task."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rmtl.backbones import options as opt
from rmtl.backbones.base import MultiTaskBackbone
from rmtl.backbones.layers import MLP, Experts, FeatureEmbedding, cut_slices, mix_experts
from rmtl.data.spec import FeatureSpec


class TaskHead(nn.Module):
    """A task's own modules in a gated model: its gate and its tower."""

    def __init__(self, gate_in: int, num_gated: int, tower_in: int, tower_dims: Sequence[int], dropout: float,
                 activation: str):
        super().__init__()
        self.gate = nn.Linear(gate_in, num_gated)
        self.tower = MLP(tower_in, tower_dims, dropout=dropout, activation=activation, out_dim=1)


class MMoE(MultiTaskBackbone):
    """Options: embed_dim, dense_dim, num_experts, expert_dims, tower_dims, dropout, activation.

    Shared: the embedding and the experts. Task k: its gate (over the embedding) and tower.
    The shared cut is cat[embedding, expert outputs]; ``last_gate_usage`` is [K, E].
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
        self.task_modules = nn.ModuleList(
            TaskHead(d_in, num_experts, self.experts.output_dim, tower_dims, dropout, activation)
            for _ in range(self.num_tasks))
        self.register_buffer("last_gate_usage", torch.zeros(self.num_tasks, num_experts), persistent=False)

    def _heads(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        gates = torch.stack([torch.softmax(m.gate(x), dim=-1) for m in self.task_modules], dim=1)  # [B, K, E]
        self.last_gate_usage = gates.detach().float().mean(0)
        mixed = mix_experts(experts, gates)  # [B, K, H]
        return torch.cat([m.tower(mixed[:, k]) for k, m in enumerate(self.task_modules)], dim=1)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = self.features(sparse, dense)
        return self._heads(x, self.experts(x))

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        x = self.features(sparse, dense)
        experts = self.experts(x)  # [B, E, H]
        cut = torch.cat([x, experts.flatten(1)], dim=1)  # the task modules read only slices of it
        x_c, experts_c = cut_slices(cut, x.shape[1:], experts.shape[1:])
        return self._heads(x_c, experts_c), cut
