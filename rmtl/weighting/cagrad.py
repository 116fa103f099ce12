"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021).

The update d maximises the worst task's improvement within a ball around the mean
gradient g0: max_d min_k g_k . d  s.t. |d - g0| <= c |g0|. Its dual is a problem on the
K-simplex,
    min_w  g_w . g0 + c |g0| |g_w|,   g_w = sum_k w_k g_k,
and then d = g0 + (c |g0| / |g_w|) g_w, divided by (1 + c^2) (rescale=1, the paper's
default; rescale=0 keeps d, rescale=2 divides by 1 + c). The dual is solved on the
Gram matrix scaled by the mean squared task-gradient norm (so step sizes are scale-free).
Default ``solver="projected"``: projected gradient descent on the simplex with Armijo
backtracking, monotone, stopping when it converges. ``solver="paper"``: the authors'
few steps of SGD with momentum on softmax logits of w (gradient in closed form), keeping
the best iterate; it can stall in a corner (docs/weighting.md has the comparison).
c = 0 gives the mean gradient exactly. Effective weights: w_eff = (1/K + lambda w) / rescale.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rmtl.weighting.common import check_choice, check_int, check_positive
from rmtl.weighting.gradient_strategy import GradientStrategy


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (sort-based, Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    idx = np.arange(1, len(v) + 1)
    rho = idx[u - cumulative / idx > 0][-1]
    return np.maximum(v - cumulative[rho - 1] / rho, 0.0)


def _dual_paper(a: np.ndarray, b: np.ndarray, c_g0: float, steps: int, lr: float, momentum: float) -> np.ndarray:
    """The authors' solver: SGD with momentum on softmax logits, best iterate kept."""
    num_tasks = len(b)
    z = np.zeros(num_tasks)
    velocity = np.zeros(num_tasks)
    best_z, best_obj = z.copy(), np.inf
    for _ in range(steps + 1):
        w = np.exp(z - z.max())
        w /= w.sum()
        gw_norm = np.sqrt(max(w @ a @ w, 0.0) + 1e-8)
        obj = w @ b + c_g0 * gw_norm
        if obj < best_obj:
            best_obj, best_z = obj, z.copy()
        grad_w = b + c_g0 * (a @ w) / gw_norm
        grad_z = w * (grad_w - w @ grad_w)  # softmax Jacobian
        velocity = momentum * velocity + grad_z  # torch.optim.SGD's momentum rule
        z = z - lr * velocity
    w = np.exp(best_z - best_z.max())
    return w / w.sum()


def _dual_projected(a: np.ndarray, b: np.ndarray, c_g0: float, steps: int, tol: float = 1e-12) -> np.ndarray:
    """Projected gradient on the simplex with a backtracking (Armijo) step: monotone, so it
    cannot stall in a softmax corner the way large SGD steps on logits can."""
    num_tasks = len(b)

    def objective(w: np.ndarray) -> float:
        return w @ b + c_g0 * np.sqrt(max(w @ a @ w, 0.0) + 1e-12)

    w = np.full(num_tasks, 1.0 / num_tasks)
    value, step = objective(w), 1.0
    for _ in range(steps):
        grad = b + c_g0 * (a @ w) / np.sqrt(max(w @ a @ w, 0.0) + 1e-12)
        step = min(step * 2.0, 1e6)
        while True:
            new = project_to_simplex(w - step * grad)
            new_value = objective(new)
            if new_value <= value - 1e-4 * (grad @ (w - new)) or step < 1e-12:
                break
            step *= 0.5
        if value - new_value <= tol * max(abs(value), 1e-12):
            if new_value < value:
                w = new
            break
        w, value = new, new_value
    return w


def cagrad_weights(gram: np.ndarray, c: float, *, rescale: int = 1, solver: str = "projected", steps: int = 100,
                   lr: float = 25.0, momentum: float = 0.5) -> np.ndarray:
    """Effective task weights [K] of CAGrad's update for the Gram matrix G G^T."""
    num_tasks = gram.shape[0]
    mean_weights = np.full(num_tasks, 1.0 / num_tasks)
    if c == 0 or num_tasks == 1:
        lam, w = 0.0, mean_weights
    else:
        scale = max(np.mean(np.diag(gram)), 1e-20)  # work scale-free: mean squared task-gradient norm = 1
        a = gram / scale
        b = a.mean(axis=1)  # g_w . g0 = w . b
        c_g0 = c * np.sqrt(max(a.mean(), 0.0))  # c |g0|
        if solver == "paper":
            w = _dual_paper(a, b, c_g0, steps, lr, momentum)
        else:
            w = _dual_projected(a, b, c_g0, steps)
        lam = c_g0 / (np.sqrt(max(w @ a @ w, 0.0)) + 1e-8)
    weights = mean_weights + lam * w
    divisor = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
    return weights / divisor


class CAGrad(GradientStrategy):
    name = "cagrad"

    def __init__(self, num_tasks: int, *, c: float = 0.4, rescale: int = 1, solver: str = "projected",
                 steps: int = 100, lr: float = 25.0, momentum: float = 0.5, on: str = "auto",
                 task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, on=on, task_names=task_names)
        self.c = check_positive("c", c, allow_zero=True)
        self.rescale = int(check_choice("rescale", rescale, (0, 1, 2)))
        self.solver = check_choice("solver", solver, ("projected", "paper"))
        self.steps = check_int("steps", steps, minimum=1)
        self.lr = check_positive("lr", lr)
        self.momentum = check_positive("momentum", momentum, allow_zero=True)

    def weights_from_gram(self, gram_matrix, task_losses, context) -> torch.Tensor:
        weights = cagrad_weights(gram_matrix.cpu().numpy(), self.c, rescale=self.rescale, solver=self.solver,
                                 steps=self.steps,
                                 lr=self.lr, momentum=self.momentum)
        return torch.from_numpy(weights).to(gram_matrix.device)
