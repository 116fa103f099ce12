"""Fixed: user-given constant weights - minimise sum_k w_k L_k."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from rmtl.weighting.common import LossWeighting, option_error


class FixedWeighting(LossWeighting):
    name = "fixed"

    def __init__(self, num_tasks: int, *, weights: Sequence[float] | None = None,
                 task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, task_names=task_names)
        if weights is None:
            raise option_error("weights", f"the 'fixed' strategy needs weights: a list of {num_tasks} numbers >= 0")
        try:
            values = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise option_error("weights", f"expected a list of {num_tasks} numbers, got {weights!r}") from None
        if len(values) != self.num_tasks or not all(math.isfinite(v) and v >= 0 for v in values):
            raise option_error("weights", f"expected {self.num_tasks} finite numbers >= 0, got {list(weights)!r}")
        self.register_buffer("weights", torch.tensor(values, dtype=torch.float32))

    def combine(self, task_losses: torch.Tensor, context: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.weights.to(task_losses)
        return (weights * task_losses).sum(), weights
