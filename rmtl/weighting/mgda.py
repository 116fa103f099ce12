"""MGDA: multiple-gradient descent as multi-objective optimisation (Sener & Koltun, NeurIPS 2018).

The update is the min-norm point of the convex hull of the task gradients,
    min_w |sum_k w_k g_k|^2  over the K-simplex,
found on the Gram matrix: exactly in closed form for K = 2, by Frank-Wolfe from the
best pair's solution for K > 2 (as in the authors' code). ``normalization`` scales each
g_k before solving ("none", "l2": by |g_k|, "loss": by L_k, "loss+": by L_k |g_k|); the
weights are then divided by the same scale so they apply to the raw gradients. The
weights sum to 1 without normalisation (a convex combination).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rmtl.weighting.common import check_choice, check_int, check_positive
from rmtl.weighting.gradient_strategy import GradientStrategy

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def min_norm_two(v11: float, v12: float, v22: float) -> float:
    """gamma in [0, 1] minimising |gamma v1 + (1 - gamma) v2|^2, from the three dot products."""
    denom = v11 + v22 - 2.0 * v12
    if denom <= 1e-20:
        return 0.5
    return float(np.clip((v22 - v12) / denom, 0.0, 1.0))


def min_norm_weights(gram: np.ndarray, *, max_iter: int = 250, tol: float = 1e-5) -> np.ndarray:
    """w on the simplex minimising w^T gram w (Frank-Wolfe; exact for K <= 2)."""
    num_tasks = gram.shape[0]
    if num_tasks == 1:
        return np.ones(1)
    if num_tasks == 2:
        gamma = min_norm_two(gram[0, 0], gram[0, 1], gram[1, 1])
        return np.array([gamma, 1.0 - gamma])
    # start from the best pair, as Sener & Koltun do
    best, w = np.inf, None
    for i in range(num_tasks):
        for j in range(i + 1, num_tasks):
            gamma = min_norm_two(gram[i, i], gram[i, j], gram[j, j])
            cost = gamma**2 * gram[i, i] + 2 * gamma * (1 - gamma) * gram[i, j] + (1 - gamma) ** 2 * gram[j, j]
            if cost < best:
                best, w = cost, np.zeros(num_tasks)
                w[i], w[j] = gamma, 1.0 - gamma
    for _ in range(max_iter):
        grad = gram @ w
        t = int(np.argmin(grad))
        v11, v12, v22 = w @ grad, grad[t], gram[t, t]
        gamma = min_norm_two(v11, v12, v22)
        new = gamma * w
        new[t] += 1.0 - gamma
        change = np.abs(new - w).sum()
        w = new
        if change < tol:
            break
    return w


class MGDA(GradientStrategy):
    name = "mgda"

    def __init__(self, num_tasks: int, *, normalization: str = "none", max_iter: int = 250, tol: float = 1e-5,
                 on: str = "auto", task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, on=on, task_names=task_names)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.max_iter = check_int("max_iter", max_iter, minimum=1)
        self.tol = check_positive("tol", tol)

    def weights_from_gram(self, gram_matrix, task_losses, context) -> torch.Tensor:
        gram = gram_matrix.cpu().numpy()
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        losses = np.ones(self.num_tasks) if task_losses is None else task_losses.double().cpu().numpy()
        scale = {"none": np.ones(self.num_tasks), "l2": norms, "loss": losses, "loss+": losses * norms}[self.normalization]
        scale = np.maximum(scale, 1e-12)
        w = min_norm_weights(gram / np.outer(scale, scale), max_iter=self.max_iter, tol=self.tol)
        return torch.from_numpy(w / scale).to(gram_matrix.device)
