"""AITM (Xi et al., KDD 2021): adaptive information transfer between sequential tasks.

Task k's tower output q_k is combined with information transferred from task k-1,
p_{k-1} = transfer(z_{k-1}), by attention over the pair {p_{k-1}, q_k}:
    w_u = softmax_u(<W_q u, W_k u> / sqrt(d)),  z_k = sum_u w_u W_v u,  logit_k = head(z_k).
The behavioural calibration term penalises a later task's probability exceeding the
earlier one's (a conversion needs a click): alpha * sum_{k>=1} mean(relu(p_k - p_{k-1})).
It is exposed as ``model.auxiliary_loss()`` (from the last forward pass); the training
loop adds it to the weighted task loss when the model has that method.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from rmtl.backbones import options as opt
from rmtl.backbones.base import MultiTaskBackbone
from rmtl.backbones.layers import MLP, ActDropout, FeatureEmbedding
from rmtl.data.spec import FeatureSpec
from rmtl.errors import ConfigError


class TransferAttention(nn.Module):
    """The AIT unit: attention over (transferred info, own tower output), both [B, d]."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, transferred: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        pair = torch.stack([transferred, own], dim=1)  # [B, 2, d]
        q, k, v = self.qkv(pair).chunk(3, dim=-1)
        w = torch.softmax((q * k).sum(-1) * self.scale, dim=1)  # [B, 2]
        return torch.bmm(w.unsqueeze(1).to(v.dtype), v)[:, 0]


class AITMTask(nn.Module):
    """Task k's modules: tower, head and (k >= 1) the transfer from task k-1 and the AIT unit."""

    def __init__(self, in_dim: int, tower_dims, dropout: float, activation: str, receives: bool):
        super().__init__()
        self.tower = MLP(in_dim, tower_dims, dropout=dropout, activation=activation)
        d = self.tower.output_dim
        self.head = nn.Linear(d, 1)
        self.transfer = nn.Sequential(nn.Linear(d, d), ActDropout(activation, dropout)) if receives else None
        self.attention = TransferAttention(d) if receives else None


class AITM(MultiTaskBackbone):
    """Options: embed_dim, dense_dim, tower_dims, dropout, activation, calibration_weight
    (alpha of the calibration term; 0 switches it off). Needs K >= 2 tasks in funnel order.
    Shared: the embedding (the cut); task k: its tower, head, transfer-in and AIT unit."""

    def __init__(self, spec: FeatureSpec, embed_dim: int = 16, dense_dim: int | None = None,
                 tower_dims: Sequence[int] = (128, 64), dropout: float = 0.0, activation: str = "relu",
                 calibration_weight: float = 0.6):
        super().__init__(spec)
        if spec.num_tasks < 2:
            raise ConfigError(f"aitm needs at least 2 tasks in funnel order (e.g. ctr, ctcvr); the data has "
                              f"{spec.num_tasks}: {spec.tasks}", key="model.name")
        embed_dim, dropout, activation, dense_dim = opt.common(embed_dim, dropout, activation, dense_dim)
        tower_dims = opt.dims("tower_dims", tower_dims)
        try:
            self.calibration_weight = float(calibration_weight)
        except (TypeError, ValueError):
            self.calibration_weight = -1.0
        if not self.calibration_weight >= 0:
            raise ConfigError(f"expected a number >= 0, got {calibration_weight!r}", key="calibration_weight")
        self.features = FeatureEmbedding(spec, embed_dim, dense_dim)
        self.task_modules = nn.ModuleList(
            AITMTask(self.features.output_dim, tower_dims, dropout, activation, receives=k > 0)
            for k in range(self.num_tasks))
        self._aux: torch.Tensor | None = None

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        x = self.features(sparse, dense)
        z = None
        logits = []
        for task in self.task_modules:
            own = task.tower(x)
            z = own if task.attention is None else task.attention(task.transfer(z), own)
            logits.append(task.head(z))
        logits = torch.cat(logits, dim=1)
        probs = torch.sigmoid(logits.float())
        self._aux = self.calibration_weight * torch.relu(probs[:, 1:] - probs[:, :-1]).mean(0).sum()
        return logits, x

    def auxiliary_loss(self) -> torch.Tensor:
        """The calibration penalty of the last forward pass (a scalar in its graph)."""
        if self._aux is None:
            return torch.zeros(())
        return self._aux
