"""RLW: random loss weighting (Lin et al., TMLR 2022).

Each step w = softmax(z), z ~ N(0, I_K); the draw depends only on (seed, step), so a
resumed run draws the same weights. Weights sum to 1 (the paper's scale).
"""

from __future__ import annotations

from typing import Sequence

import torch

from rmtl.weighting.common import LossWeighting, check_int


class RandomLossWeighting(LossWeighting):
    name = "rlw"

    def __init__(self, num_tasks: int, *, seed: int = 0, task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, task_names=task_names)
        self.seed = check_int("seed", seed)

    def combine(self, task_losses: torch.Tensor, context: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.from_numpy(self.rng(self.seed, context).standard_normal(self.num_tasks))
        weights = torch.softmax(z, dim=0).to(task_losses)
        return (weights * task_losses).sum(), weights
