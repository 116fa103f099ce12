"""STEM (Su et al., KDD 2024, "Ads Recommendation in a Collapsed and Entangled World"):
shared and task-specific embeddings, with "all forward, task-specific backward" gating.

There are K + 1 embedding tables: a shared one feeding the shared experts, and one per
task feeding that task's experts. Task k's gate mixes the shared experts, its own
experts and the OTHER tasks' experts, the latter through a stop-gradient: task k reads
their outputs but its loss never trains them, so each task's embeddings learn from that
task alone (no embedding collapse onto the dominant task).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rmtl.backbones import options as opt
from rmtl.backbones.base import MultiTaskBackbone
from rmtl.backbones.layers import MLP, Experts, FeatureEmbedding, cut_slices, mix_experts
from rmtl.data.spec import FeatureSpec


class STEMTask(nn.Module):
    """Task k's modules: its embedding table, experts, gate and tower."""

    def __init__(self, spec, embed_dim, dense_dim, num_specific, num_gated, expert_dims, tower_dims, dropout,
                 activation):
        super().__init__()
        self.features = FeatureEmbedding(spec, embed_dim, dense_dim)
        d_in = self.features.output_dim
        self.experts = Experts(num_specific, d_in, expert_dims, dropout=dropout, activation=activation)
        self.gate = nn.Linear(2 * d_in, num_gated)  # reads [shared embedding, own embedding]
        self.tower = MLP(self.experts.output_dim, tower_dims, dropout=dropout, activation=activation, out_dim=1)


class STEM(MultiTaskBackbone):
    """Options: embed_dim, dense_dim, shared_experts, specific_experts (per task),
    expert_dims, tower_dims, dropout, activation, stop_gradient (False = plain gating over
    all experts, for ablation).

    Shared: the shared embedding and shared experts; the cut is cat[shared embedding,
    shared expert outputs]. Task k: its embedding, experts, gate and tower.
    ``last_gate_usage`` is [K, S + K*P] (shared experts first, then each task's).
    """

    def __init__(self, spec: FeatureSpec, embed_dim: int = 16, dense_dim: int | None = None, shared_experts: int = 2,
                 specific_experts: int = 2, expert_dims: Sequence[int] = (256, 128), tower_dims: Sequence[int] = (64,),
                 dropout: float = 0.0, activation: str = "relu", stop_gradient: bool = True):
        super().__init__(spec)
        embed_dim, dropout, activation, dense_dim = opt.common(embed_dim, dropout, activation, dense_dim)
        S = opt.positive_int("shared_experts", shared_experts)
        P = opt.positive_int("specific_experts", specific_experts)
        expert_dims = opt.dims("expert_dims", expert_dims)
        tower_dims = opt.dims("tower_dims", tower_dims, allow_empty=True)
        self.stop_gradient = bool(stop_gradient)
        self.num_shared, self.num_specific = S, P
        self.features = FeatureEmbedding(spec, embed_dim, dense_dim)
        self.shared_experts = Experts(S, self.features.output_dim, expert_dims, dropout=dropout, activation=activation)
        self.task_modules = nn.ModuleList(
            STEMTask(spec, embed_dim, dense_dim, P, S + self.num_tasks * P, expert_dims, tower_dims, dropout,
                     activation)
            for _ in range(self.num_tasks))
        self.register_buffer("last_gate_usage", torch.zeros(self.num_tasks, S + self.num_tasks * P),
                             persistent=False)

    def _run(self, sparse: torch.Tensor, dense: torch.Tensor, with_cut: bool):
        x_s = self.features(sparse, dense)
        shared = self.shared_experts(x_s)  # [B, S, H]
        cut = None
        if with_cut:
            cut = torch.cat([x_s, shared.flatten(1)], dim=1)
            x_s, shared = cut_slices(cut, x_s.shape[1:], shared.shape[1:])
        own_x = [task.features(sparse, dense) for task in self.task_modules]
        own = [task.experts(x) for task, x in zip(self.task_modules, own_x)]
        seen = [o.detach() for o in own] if self.stop_gradient else own
        S, P = self.num_shared, self.num_specific
        logits, usage = [], []
        for k, task in enumerate(self.task_modules):
            gate = torch.softmax(task.gate(torch.cat([x_s, own_x[k]], dim=1)), dim=-1).unsqueeze(1)
            mixed = mix_experts(shared, gate[:, :, :S])
            for j in range(self.num_tasks):  # own experts with gradient, the others' without
                mixed = mixed + mix_experts(own[j] if j == k else seen[j], gate[:, :, S + j * P:S + (j + 1) * P])
            logits.append(task.tower(mixed[:, 0]))
            usage.append(gate[:, 0].detach().float().mean(0))
        self.last_gate_usage = torch.stack(usage)
        return torch.cat(logits, dim=1), cut

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self._run(sparse, dense, with_cut=False)[0]

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        return self._run(sparse, dense, with_cut=True)
