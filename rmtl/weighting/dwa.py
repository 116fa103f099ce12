"""DWA: dynamic weight average (Liu, Johns & Davison, CVPR 2019).

    w_k(t) = K exp(r_k / T) / sum_j exp(r_j / T),  r_k = L_k(t-1) / L_k(t-2)

with L_k(e) the mean train loss of task k in epoch e (given by the training loop via
``epoch_end``). The first two epochs use w = 1. The two-epoch history is kept in
buffers, so it survives a checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rmtl.weighting.common import LossWeighting, check_positive


class DynamicWeightAverage(LossWeighting):
    name = "dwa"

    def __init__(self, num_tasks: int, *, T: float = 2.0, task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, task_names=task_names)
        self.T = check_positive("T", T)
        self.register_buffer("history", torch.ones(2, self.num_tasks, dtype=torch.float64))  # [L(t-2), L(t-1)]
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def epoch_end(self, mean_losses) -> None:
        values = torch.as_tensor(mean_losses, dtype=torch.float64).detach().reshape(-1).cpu()
        if values.numel() != self.num_tasks or not torch.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"dwa.epoch_end expects {self.num_tasks} finite mean losses >= 0, got {values.tolist()}")
        self.history[0] = self.history[1].clone()
        self.history[1] = values.to(self.history.device)
        self.epochs_seen += 1

    def current_weights(self) -> torch.Tensor:
        if int(self.epochs_seen) < 2:
            return torch.ones(self.num_tasks, dtype=torch.float64)
        ratio = self.history[1] / self.history[0].clamp_min(1e-12)
        return self.num_tasks * torch.softmax(ratio / self.T, dim=0)

    def combine(self, task_losses: torch.Tensor, context: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.current_weights().to(task_losses)
        return (weights * task_losses).sum(), weights
