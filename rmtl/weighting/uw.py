"""UW: Kendall, Gal & Cipolla (CVPR 2018), homoscedastic uncertainty weighting.

Learnable log-variances s_k (nn.Parameters of the strategy: the optimizer must hold
``strategy.parameters()``). The loss is the classification form of the paper,
    sum_k exp(-s_k) L_k + s_k / 2,
so dTotal/ds_k = -exp(-s_k) L_k + 1/2 and at the optimum exp(-s_k) = 1 / (2 L_k).
The weights returned are exp(-s_k).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rmtl.weighting.common import LossWeighting, option_error


class UncertaintyWeighting(LossWeighting):
    name = "uw"

    def __init__(self, num_tasks: int, *, init_log_var: float = 0.0, task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, task_names=task_names)
        try:
            init = float(init_log_var)
        except (TypeError, ValueError):
            raise option_error("init_log_var", f"expected a number, got {init_log_var!r}") from None
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), init))

    def combine(self, task_losses: torch.Tensor, context: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.log_vars.to(task_losses.dtype)
        precision = torch.exp(-s)
        total = (precision * task_losses).sum() + 0.5 * s.sum()
        return total, precision
