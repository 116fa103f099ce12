"""The strategy contract: one call per training step.

``strategy.backward(losses, model, shared=..., context=...)`` receives the per-sample,
per-task losses [B, K] (still attached to the graph), performs the backward pass
(filling ``.grad`` of the model's parameters, and of the strategy's own parameters if
it has any, e.g. UW's log-variances) and returns the weights it used, detached:
shape [K] for task-level weights or [B, K] for per-sample weights. The training loop
then steps the optimizer (which also holds ``strategy.parameters()``).

- Loss-level strategies (EW, fixed, UW, DWA, GradNorm, RLW, RMTL critic) combine the
  losses into one scalar and call backward once.
- Gradient-level strategies (PCGrad, GradVac, CAGrad, MGDA, IMTL, Nash-MTL) compute one
  gradient per task on the shared parameters, or on the shared representation
  ``shared`` when the backbone returns one (``on="representation"``, the cheap default),
  combine them, and write the combined gradient back.
- Routing (DRGrad) works on per-task towers of the split-tower backbone.

``context`` is a dict with at least: 'step' (int), 'batch' (the Batch), 'logits' [B, K];
strategies take what they need and ignore the rest. ``last_logs()`` returns extra
scalars for TensorBoard (e.g. pairwise gradient cosines), and ``epoch_end(mean_losses)``
is called with the epoch's mean train loss per task (DWA needs it).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


# Optional hooks: ``Strategy`` has both, but a duck-typed strategy object handed to
# ``fit(strategy=...)`` need only have ``backward``; the loop tests for these with isinstance.

@runtime_checkable
class EpochAware(Protocol):
    def epoch_end(self, mean_losses: torch.Tensor) -> None: ...


@runtime_checkable
class LogsScalars(Protocol):
    def last_logs(self) -> dict[str, float]: ...


class Strategy(nn.Module):
    name: str = "base"

    def __init__(self, num_tasks: int):
        super().__init__()
        self.num_tasks = num_tasks
        self._logs: dict[str, float] = {}

    def backward(self, losses: torch.Tensor, model: nn.Module, *, shared: torch.Tensor | None = None,
                 context: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def epoch_end(self, mean_losses: torch.Tensor) -> None:
        """Called once per epoch with the mean train loss per task [K]."""

    def last_logs(self) -> dict[str, float]:
        return dict(self._logs)
