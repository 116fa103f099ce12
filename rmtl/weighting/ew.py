"""EW: equal weighting, the baseline - minimise sum_k L_k."""

from __future__ import annotations

import torch

from rmtl.weighting.common import LossWeighting


class EqualWeighting(LossWeighting):
    name = "ew"

    def combine(self, task_losses: torch.Tensor, context: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.ones_like(task_losses)
        return task_losses.sum(), weights
