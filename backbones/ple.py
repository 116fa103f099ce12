"""PLE (Tang et al., RecSys 2020): progressive layered extraction.

Each extraction level has shared experts and, per task, specific experts. Task k's gate
mixes its own experts with the shared ones; below the last level a shared gate mixes
ALL experts into the input of the next level's shared experts. ``levels=1`` is CGC.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rmtl.backbones import options as opt
from rmtl.backbones.base import MultiTaskBackbone
from rmtl.backbones.layers import MLP, Experts, FeatureEmbedding, cut_slices, mix_experts
from rmtl.data.spec import FeatureSpec


class TaskExtraction(nn.Module):
    """Task k's part of one level: its specific experts and its gate."""

    def __init__(self, in_dim: int, num_specific: int, num_shared: int, expert_dims, dropout, activation):
        super().__init__()
        self.experts = Experts(num_specific, in_dim, expert_dims, dropout=dropout, activation=activation)
        self.gate = nn.Linear(in_dim, num_specific + num_shared)


class ExtractionLevel(nn.Module):
    def __init__(self, num_tasks: int, in_dim: int, num_shared: int, num_specific: int, expert_dims, dropout,
                 activation, last: bool):
        super().__init__()
        self.num_specific = num_specific
        self.shared_experts = Experts(num_shared, in_dim, expert_dims, dropout=dropout, activation=activation)
        self.tasks = nn.ModuleList(
            TaskExtraction(in_dim, num_specific, num_shared, expert_dims, dropout, activation)
            for _ in range(num_tasks))
        self.shared_gate = None if last else nn.Linear(in_dim, num_tasks * num_specific + num_shared)

    def task_output(self, k: int, task_in: torch.Tensor, own: torch.Tensor, shared: torch.Tensor):
        """(mixture [B, H], gate [B, P+S]) of task k: two bmm, no concatenation of experts."""
        gate = torch.softmax(self.tasks[k].gate(task_in), dim=-1).unsqueeze(1)  # [B, 1, P+S]
        P = self.num_specific
        mixed = mix_experts(own, gate[:, :, :P]) + mix_experts(shared, gate[:, :, P:])
        return mixed[:, 0], gate[:, 0]

    def shared_output(self, shared_in: torch.Tensor, owns: list[torch.Tensor], shared: torch.Tensor):
        gate = torch.softmax(self.shared_gate(shared_in), dim=-1).unsqueeze(1)  # [B, 1, K*P+S]
        P = self.num_specific
        mixed = mix_experts(shared, gate[:, :, len(owns) * P:])
        for k, own in enumerate(owns):
            mixed = mixed + mix_experts(own, gate[:, :, k * P:(k + 1) * P])
        return mixed[:, 0]


class PLE(MultiTaskBackbone):
    """Options: embed_dim, dense_dim, levels, shared_experts, specific_experts (per task),
    expert_dims, tower_dims, dropout, activation.

    Task k owns the LAST level's specific experts and gate, and its tower. Below the last
    level, task-specific experts feed the shared gate and so every task: they count as
    shared. The cut is cat[inputs of the last level's task modules, last-level shared
    expert outputs]. ``last_gate_usage`` is the last level's task gates, [K, P+S].
    """

    def __init__(self, spec: FeatureSpec, embed_dim: int = 16, dense_dim: int | None = None, levels: int = 2,
                 shared_experts: int = 2, specific_experts: int = 2, expert_dims: Sequence[int] = (256, 128),
                 tower_dims: Sequence[int] = (64,), dropout: float = 0.0, activation: str = "relu"):
        super().__init__(spec)
        embed_dim, dropout, activation, dense_dim = opt.common(embed_dim, dropout, activation, dense_dim)
        levels = opt.positive_int("levels", levels)
        shared_experts = opt.positive_int("shared_experts", shared_experts)
        specific_experts = opt.positive_int("specific_experts", specific_experts)
        expert_dims = opt.dims("expert_dims", expert_dims)
        tower_dims = opt.dims("tower_dims", tower_dims, allow_empty=True)
        self.features = FeatureEmbedding(spec, embed_dim, dense_dim)
        K = self.num_tasks
        hidden = expert_dims[-1]
        self.levels = nn.ModuleList(
            ExtractionLevel(K, self.features.output_dim if i == 0 else hidden, shared_experts, specific_experts,
                            expert_dims, dropout, activation, last=i == levels - 1)
            for i in range(levels))
        self.towers = nn.ModuleList(
            MLP(hidden, tower_dims, dropout=dropout, activation=activation, out_dim=1) for _ in range(K))
        last = self.levels[-1]
        self.task_modules = nn.ModuleList(nn.ModuleList([last.tasks[k], self.towers[k]]) for k in range(K))
        self.register_buffer("last_gate_usage", torch.zeros(K, shared_experts + specific_experts), persistent=False)

    def _run(self, sparse: torch.Tensor, dense: torch.Tensor, with_cut: bool):
        x = self.features(sparse, dense)
        K = self.num_tasks
        task_in, shared_in = [x] * K, x
        for level in self.levels[:-1]:
            owns = [level.tasks[k].experts(task_in[k]) for k in range(K)]
            shared = level.shared_experts(shared_in)
            task_in = [level.task_output(k, task_in[k], owns[k], shared)[0] for k in range(K)]
            shared_in = level.shared_output(shared_in, owns, shared)
        last = self.levels[-1]
        shared = last.shared_experts(shared_in)  # [B, S, H]
        cut = None
        if with_cut:  # everything the last level's task modules read, as one tensor
            inputs = [x] if len(self.levels) == 1 else task_in
            cut = torch.cat([*inputs, shared.flatten(1)], dim=1)
            *inputs, shared = cut_slices(cut, *[t.shape[1:] for t in inputs], shared.shape[1:])
            task_in = inputs * K if len(self.levels) == 1 else inputs
        logits, gates = [], []
        for k in range(K):
            mixed, gate = last.task_output(k, task_in[k], last.tasks[k].experts(task_in[k]), shared)
            logits.append(self.towers[k](mixed))
            gates.append(gate.detach().float().mean(0))
        self.last_gate_usage = torch.stack(gates)
        return torch.cat(logits, dim=1), cut

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self._run(sparse, dense, with_cut=False)[0]

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        return self._run(sparse, dense, with_cut=True)
