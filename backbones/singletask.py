"""Single-task baseline: K independent networks (nothing shared), or one network for
one chosen task. It is the reference for "MTL gain" (a multi-task model's metric over
the single-task one's)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from rmtl.backbones import options as opt
from rmtl.backbones.base import MultiTaskBackbone
from rmtl.backbones.layers import MLP, FeatureEmbedding
from rmtl.data.spec import FeatureSpec


class TaskNetwork(nn.Module):
    """Embedding + MLP + one logit: one task's whole model."""

    def __init__(self, spec: FeatureSpec, embed_dim: int, dense_dim: int | None, hidden: Sequence[int],
                 dropout: float, activation: str):
        super().__init__()
        self.features = FeatureEmbedding(spec, embed_dim, dense_dim)
        self.mlp = MLP(self.features.output_dim, hidden, dropout=dropout, activation=activation, out_dim=1)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(sparse, dense))


class SingleTask(MultiTaskBackbone):
    """Options: task (None = all tasks, each with its own network; a task name or index
    = one network for that task only), embed_dim, dense_dim, bottom_dims, tower_dims,
    dropout, activation. Each network is bottom_dims + tower_dims wide.

    With ``task`` set, the model outputs ONE column: ``num_tasks == 1``, ``tasks`` is
    [that task] and ``task_columns`` [its column in the spec]; a training loop selects
    ``labels[:, model.task_columns]``. Nothing is shared: shared_parameters() is empty
    and forward_with_shared returns no cut.
    """

    def __init__(self, spec: FeatureSpec, task: Any = None, embed_dim: int = 16, dense_dim: int | None = None,
                 bottom_dims: Sequence[int] = (256, 128), tower_dims: Sequence[int] = (64,), dropout: float = 0.0,
                 activation: str = "relu"):
        super().__init__(spec)
        embed_dim, dropout, activation, dense_dim = opt.common(embed_dim, dropout, activation, dense_dim)
        hidden = opt.dims("bottom_dims", bottom_dims, allow_empty=True) + opt.dims("tower_dims", tower_dims,
                                                                                 allow_empty=True)
        self.task_columns = list(range(spec.num_tasks)) if task is None else [opt.task_index(spec.tasks, task)]
        self.tasks = [spec.tasks[c] for c in self.task_columns]
        self.num_tasks = len(self.task_columns)
        self.task_modules = nn.ModuleList(
            TaskNetwork(spec, embed_dim, dense_dim, hidden, dropout, activation) for _ in self.task_columns)

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        return torch.cat([net(sparse, dense) for net in self.task_modules], dim=1), None
