"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021).

Find d = sum_k a_k g_k with sum_k a_k = 1 whose projections on every task's unit
gradient u_k = g_k / |g_k| are equal (d . u_1 = d . u_k). Closed form:
    a_{2:K} = g_1 U^T (D U^T)^{-1},  a_1 = 1 - sum a_{2:K},
with U rows u_1 - u_k and D rows g_1 - g_k (k = 2..K). Everything is a dot product, so
it is solved on the Gram matrix (least squares where D U^T is singular, e.g. equal
gradients).
"""

from __future__ import annotations

import numpy as np
import torch

from rmtl.weighting.gradient_strategy import GradientStrategy


def imtl_weights(gram: np.ndarray) -> np.ndarray:
    num_tasks = gram.shape[0]
    if num_tasks == 1:
        return np.ones(1)
    norms = np.sqrt(np.maximum(np.diag(gram), 1e-20))
    gu = gram / norms[None, :]  # gu[a, b] = g_a . u_b
    # D U^T [i, j] = (g_1 - g_i) . (u_1 - u_j), and g_1 U^T [j] = g_1 . (u_1 - u_j), for i, j >= 2
    m = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]
    b = gu[0, 0] - gu[0, 1:]
    rest = np.linalg.lstsq(m.T, b, rcond=None)[0]  # a^T M = b^T
    return np.concatenate([[1.0 - rest.sum()], rest])


class IMTL(GradientStrategy):
    name = "imtl"

    def weights_from_gram(self, gram_matrix, task_losses, context) -> torch.Tensor:
        return torch.from_numpy(imtl_weights(gram_matrix.cpu().numpy())).to(gram_matrix.device)
