"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022).

The update d = sum_k a_k g_k uses the Nash bargaining solution, a > 0 with
    (G G^T a)_k = 1 / a_k   for every k.
The authors solve it with cvxpy (a sequence of convex problems). Here, without scipy or
cvxpy: the equation is exactly the stationarity condition of the strictly convex
    f(a) = 1/2 a^T A a - sum_k log a_k,   A = G G^T  (grad f = A a - 1/a),
so a damped Newton method (Hessian A + diag(1/a^2), backtracking that keeps a > 0)
finds it to machine precision in a handful of K x K solves. A tiny ridge (1e-12 of the
mean diagonal) keeps the problem bounded when the gradients are linearly dependent.

As in the reference implementation the weights solve the equation on the RAW Gram
matrix (a_k = 1/|g_k| for orthogonal gradients): the reference divides G G^T by its
Frobenius norm N but multiplies a by N inside its constraint, which undoes the scaling.
Here the solve runs on A / N for conditioning and a is rescaled by 1/sqrt(N).
``normalize=True`` (not the reference) returns the solution on A / N instead, a times
sqrt(N). A task whose gradient vanishes (|g_k|^2 <= 1e-12 max_j |g_j|^2) has no finite
bargaining weight (a_k -> inf); it keeps its previous weight (1 before any solve) and the
others are solved among themselves. Task-specific parameters get sum_k a_k dL_k/dtheta on
every step, as backpropagating the reference's sum_k a_k L_k does.
``update_weights_every`` re-solves only every n steps and otherwise backpropagates
sum_k a_k L_k with the last a (cheap steps); ``max_norm`` > 0 clips the combined
gradient's norm.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from rmtl.weighting.common import check_int, check_positive, reduce_losses
from rmtl.weighting.gradient_strategy import GradientStrategy


def nash_bargaining_weights(gram: np.ndarray, *, max_iter: int = 100, tol: float = 1e-26,
                            ridge: float = 1e-12) -> np.ndarray:
    """a > 0 solving (gram a)_k = 1 / a_k, by damped Newton on 1/2 a^T A a - sum log a.

    Stops when the Newton decrement lambda^2 / 2 <= tol (the error in a is ~ lambda, so
    tol 1e-26 is machine precision); near the solution the full Newton step is taken
    (quadratic convergence, where an Armijo test could not see the decrease in float64)."""
    num_tasks = gram.shape[0]
    diag_mean = max(float(np.mean(np.diag(gram))), 1e-30)
    a_mat = gram + ridge * diag_mean * np.eye(num_tasks)

    def objective(x: np.ndarray) -> float:
        return 0.5 * x @ a_mat @ x - np.log(x).sum()

    x = 1.0 / np.sqrt(np.diag(a_mat))  # exact when the gradients are orthogonal
    for _ in range(max_iter):
        grad = a_mat @ x - 1.0 / x
        hess = a_mat + np.diag(1.0 / x**2)
        step = np.linalg.solve(hess, grad)
        decrement = grad @ step  # Newton decrement squared
        if decrement / 2.0 <= tol:
            break
        t = 1.0
        while np.any(x - t * step <= 0):  # stay in the domain a > 0
            t *= 0.5
        if decrement > 1e-8:  # far from the solution: Armijo backtracking
            f0 = objective(x)
            while objective(x - t * step) > f0 - 1e-4 * t * decrement and t > 1e-12:
                t *= 0.5
        x = x - t * step
    return x


VANISHED = 1e-12  # |g_k|^2 below this fraction of the largest: no bargaining weight for task k


class NashMTL(GradientStrategy):
    name = "nash_mtl"
    weights_task_heads = True

    def __init__(self, num_tasks: int, *, normalize: bool = False, update_weights_every: int = 1,
                 max_norm: float = 0.0, max_iter: int = 100, on: str = "auto",
                 task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, on=on, task_names=task_names)
        self.normalize = bool(normalize)
        self.update_weights_every = check_int("update_weights_every", update_weights_every, minimum=1)
        self.max_norm = check_positive("max_norm", max_norm, allow_zero=True)
        self.max_iter = check_int("max_iter", max_iter, minimum=1)
        self.register_buffer("alpha", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("has_alpha", torch.zeros((), dtype=torch.bool))

    def weights_from_gram(self, gram_matrix, task_losses, context) -> torch.Tensor:
        gram = gram_matrix.cpu().numpy()
        alpha = self.alpha.cpu().numpy().copy() if bool(self.has_alpha) else np.ones(self.num_tasks)
        diag = np.diag(gram)
        live = diag > VANISHED * max(float(diag.max()), 0.0)
        if live.any():  # else all gradients vanished: nothing to balance, keep the weights
            sub = gram[np.ix_(live, live)]
            scale = float(np.linalg.norm(sub))
            solved = nash_bargaining_weights(sub / scale, max_iter=self.max_iter)
            alpha[live] = solved if self.normalize else solved / np.sqrt(scale)
        result = torch.from_numpy(alpha).to(gram_matrix.device)
        self.alpha.copy_(result)
        self.has_alpha.fill_(True)
        return result

    def postprocess(self, combined: torch.Tensor) -> torch.Tensor:
        if self.max_norm > 0:
            norm = combined.norm()
            if norm > self.max_norm:
                combined = combined * (self.max_norm / norm)
        return combined

    def backward(self, losses: torch.Tensor, model: nn.Module, *, shared: torch.Tensor | None = None,
                 context: dict | None = None) -> torch.Tensor:
        if bool(self.has_alpha) and self.step_of(context) % self.update_weights_every != 0:
            # a cheap step with the last bargaining weights (loss level, one backward)
            self.check_losses(losses)
            self._logs = {}
            weights = self.alpha.to(losses.dtype)
            (weights * reduce_losses(losses)).sum().backward()
            self.log_weights(self.names_for(model), weights)
            self.finish_call()
            return weights.detach().clone()
        return super().backward(losses, model, shared=shared, context=context)
