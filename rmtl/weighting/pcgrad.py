"""PCGrad: gradient surgery (Yu et al., NeurIPS 2020).

For each task i, in a random order over the other tasks j: if g_i' . g_j < 0, project
the conflicting component away, g_i' -= (g_i' . g_j) / |g_j|^2 g_j. The update is
sum_i g_i' (the paper's sum; EW's scale). The projections are tracked as coefficients
on the original gradients, so everything runs on the Gram matrix and the effective
weights w (d = sum_k w_k g_k) come out exactly. Orders depend only on (seed, step).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rmtl.weighting.common import check_int
from rmtl.weighting.gradient_strategy import GradientStrategy

EPS = 1e-20


def random_orders(rng: np.random.Generator, num_tasks: int) -> np.ndarray:
    """[K, K-1]: row i is a random order of the tasks other than i."""
    orders = rng.permuted(np.tile(np.arange(num_tasks), (num_tasks, 1)), axis=1)
    return np.stack([row[row != i] for i, row in enumerate(orders)]) if num_tasks > 1 else np.zeros((1, 0), int)


def pcgrad_coefficients(gram: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """C [K, K] with g_i' = sum_k C[i, k] g_k after PCGrad's projections."""
    num_tasks = gram.shape[0]
    coef = np.eye(num_tasks)
    for i in range(num_tasks):
        for j in orders[i]:
            dot = coef[i] @ gram[:, j]
            if dot < 0:
                coef[i, j] -= dot / max(gram[j, j], EPS)
    return coef


class PCGrad(GradientStrategy):
    name = "pcgrad"

    def __init__(self, num_tasks: int, *, seed: int = 0, on: str = "auto", task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, on=on, task_names=task_names)
        self.seed = check_int("seed", seed)

    def weights_from_gram(self, gram_matrix, task_losses, context) -> torch.Tensor:
        orders = random_orders(self.rng(self.seed, context), self.num_tasks)
        coef = pcgrad_coefficients(gram_matrix.cpu().numpy(), orders)
        return torch.from_numpy(coef.sum(axis=0)).to(gram_matrix.device)
