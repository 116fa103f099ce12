"""The backbone contract.

A backbone is an ``nn.Module`` built from a FeatureSpec and keyword options whose
``forward(sparse, dense)`` returns LOGITS [B, K] (one column per task, in spec.tasks
order; probabilities are the caller's choice). It also tells which parameters are
shared and which belong to task k, so gradient methods and DRGrad work on any backbone.

``MultiTaskBackbone`` gives the default bookkeeping: subclasses put each task's own
modules in ``self.task_modules[k]`` (an nn.ModuleList of length K) and everything else
counts as shared. Where the architecture has one tensor that every task head reads
(the "shared representation"), ``forward_with_shared`` returns it so that gradient
methods can work on the representation instead of the shared parameters. That tensor
must be a CUT of the graph: every path from a shared parameter to the logits passes
through it. Where task modules read more than one shared tensor (MMoE gates read the
embeddings, towers read the experts), build the cut as ``torch.cat`` of those tensors
(flattened) and let the task modules read slices of it.

A user's own module need not subclass this: ``shared_parameters`` / ``task_parameters``
/ ``forward_with_shared`` below fall back to sensible defaults for any nn.Module.
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch
from torch import nn

from rmtl.data.spec import FeatureSpec


class MultiTaskBackbone(nn.Module):
    spec: FeatureSpec
    task_modules: nn.ModuleList

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.spec = spec
        self.num_tasks = spec.num_tasks

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:  # [B, K]
        logits, _ = self.forward_with_shared(sparse, dense)
        return logits

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        """(logits [B, K], shared representation or None)."""
        raise NotImplementedError

    def task_parameters(self, k: int) -> list[nn.Parameter]:
        return list(self.task_modules[k].parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for k in range(self.num_tasks) for p in self.task_parameters(k)}
        return [p for p in self.parameters() if id(p) not in own]


# ----------------------------------------------------------------------------- optional hooks
# A backbone may declare any of these; the loop and the strategies test for them with
# isinstance (typed, checked once) instead of probing attribute names.

@runtime_checkable
class SplitsParameters(Protocol):
    """Says which parameters are shared and which belong to task k (gradient methods, DRGrad)."""

    def shared_parameters(self) -> list[nn.Parameter]: ...

    def task_parameters(self, k: int) -> list[nn.Parameter]: ...


@runtime_checkable
class SharesRepresentation(Protocol):
    """Returns its shared representation cut next to the logits (see the module docstring)."""

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor) -> tuple: ...


@runtime_checkable
class HasAuxiliaryLoss(Protocol):
    """Adds a scalar (or None) to the training loss, spread over the task columns (AITM's calibration)."""

    def auxiliary_loss(self) -> torch.Tensor | None: ...


@runtime_checkable
class ReportsGateUsage(Protocol):
    """MoE backbones: mean gate weight per task and expert [K, E] of the last forward (TensorBoard)."""

    last_gate_usage: torch.Tensor


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Shared parameters of any backbone; a module without the method shares everything."""
    if isinstance(model, SplitsParameters):
        return [p for p in model.shared_parameters() if p.requires_grad]
    return [p for p in model.parameters() if p.requires_grad]


def task_parameters(model: nn.Module, k: int) -> list[nn.Parameter]:
    if isinstance(model, SplitsParameters):
        return [p for p in model.task_parameters(k) if p.requires_grad]
    return []


def forward_with_shared(model: nn.Module, sparse: torch.Tensor, dense: torch.Tensor):
    """(logits, shared representation or None) for any backbone."""
    if isinstance(model, SharesRepresentation):
        return model.forward_with_shared(sparse, dense)
    return model(sparse, dense), None


def check_logits(logits: torch.Tensor, batch_size: int, num_tasks: int, where: str = "backbone") -> None:
    if logits.dim() != 2 or logits.shape != (batch_size, num_tasks):
        raise ValueError(
            f"{where} returned shape {tuple(logits.shape)}; the backbone contract expects "
            f"logits of shape [batch, tasks] = [{batch_size}, {num_tasks}]"
        )


def parameters_of(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]
