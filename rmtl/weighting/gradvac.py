"""GradVac: gradient vaccine (Wang et al., ICLR 2021).

Like PCGrad, but each ordered pair (i, j) has a target cosine phi_hat_ij, an EMA
(rate beta) of the observed cosines. When cos(g_i', g_j) = phi < phi_hat, g_j is
added to g_i' so that the cosine rises to the target:
    g_i' += |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2)) g_j
then phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi. With phi_hat = 0 this is PCGrad's
projection. Targets are a buffer (they survive a checkpoint); orders depend only on
(seed, step). Whole-gradient granularity (one target per task pair).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rmtl.weighting.common import check_int, option_error
from rmtl.weighting.gradient_strategy import GradientStrategy
from rmtl.weighting.pcgrad import random_orders

EPS = 1e-20


def gradvac_coefficients(gram: np.ndarray, orders: np.ndarray, targets: np.ndarray, beta: float) -> np.ndarray:
    """C [K, K] with g_i' = sum_k C[i, k] g_k; updates ``targets`` in place."""
    num_tasks = gram.shape[0]
    coef = np.eye(num_tasks)
    for i in range(num_tasks):
        for j in orders[i]:
            norm_i = np.sqrt(max(coef[i] @ gram @ coef[i], 0.0))
            norm_j = np.sqrt(max(gram[j, j], 0.0))
            phi = (coef[i] @ gram[:, j]) / max(norm_i * norm_j, EPS)
            target = targets[i, j]
            if phi < target:
                root_t = np.sqrt(max(1.0 - target**2, 0.0))
                root_p = np.sqrt(max(1.0 - phi**2, 0.0))
                coef[i, j] += norm_i * (target * root_p - phi * root_t) / max(norm_j * root_t, EPS)
            targets[i, j] = (1.0 - beta) * target + beta * phi
    return coef


class GradVac(GradientStrategy):
    name = "gradvac"

    def __init__(self, num_tasks: int, *, beta: float = 0.01, seed: int = 0, on: str = "auto",
                 task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, on=on, task_names=task_names)
        try:
            beta = float(beta)
        except (TypeError, ValueError):
            raise option_error("beta", f"expected a number in [0, 1], got {beta!r}") from None
        if not 0.0 <= beta <= 1.0:
            raise option_error("beta", f"expected a number in [0, 1], got {beta!r}")
        self.beta = beta
        self.seed = check_int("seed", seed)
        self.register_buffer("targets", torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64))

    def weights_from_gram(self, gram_matrix, task_losses, context) -> torch.Tensor:
        orders = random_orders(self.rng(self.seed, context), self.num_tasks)
        targets = self.targets.cpu().numpy().copy()
        coef = gradvac_coefficients(gram_matrix.cpu().numpy(), orders, targets, self.beta)
        self.targets.copy_(torch.from_numpy(targets))
        return torch.from_numpy(coef.sum(axis=0)).to(gram_matrix.device)
