"""Base class of the gradient-level methods (PCGrad, GradVac, CAGrad, MGDA, IMTL, Nash-MTL).

Every one of them here expresses its combined gradient as ``d = sum_k w_k g_k``
(PCGrad and GradVac too: their projections are tracked as coefficients), and every
rule only needs the Gram matrix ``G G^T`` [K, K] of the task gradients. So a method
implements ``weights_from_gram(gram, task_losses, context) -> w [K]`` on a tiny
float64 matrix, and this class does the rest: per-task gradients once
(rmtl.weighting.gradients), ``d = w @ G``, write-back, logs of pairwise cosines
("cos/a~b"), gradient norms ("grad_norm/a") and effective weights ("weight/a").
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rmtl.distributed import reduce_task_gradients
from rmtl.weighting.common import WeightingStrategy, check_choice, pair_keys, reduce_losses
from rmtl.weighting.gradients import MODES, cosines, gram, task_gradients, warn_if_untouched


class GradientStrategy(WeightingStrategy):
    # True: task-specific parameters get sum_k w_k dL_k/dtheta (as backpropagating sum_k w_k L_k
    # would; Nash-MTL's reference), False: the plain sum over tasks (LibMTL's convention)
    weights_task_heads = False

    def __init__(self, num_tasks: int, *, on: str = "auto", task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, task_names=task_names)
        self.on = check_choice("on", on, MODES)
        self._checked_untouched = False
        self.last_mode: str | None = None

    def weights_from_gram(self, gram_matrix: torch.Tensor, task_losses: torch.Tensor | None,
                          context: dict | None) -> torch.Tensor:
        """Effective task weights [K] (float64) from G G^T [K, K] (float64)."""
        raise NotImplementedError

    def check_finite(self, gram_matrix: torch.Tensor, names: list[str] | None = None) -> None:
        """Non-finite task gradients would send the small solvers astray: stop with a clear message."""
        bad = ~torch.isfinite(gram_matrix.diagonal())
        if bool(bad.any()):
            names = names or [f"task{k}" for k in range(self.num_tasks)]
            which = ", ".join(n for n, b in zip(names, bad.tolist()) if b)
            raise FloatingPointError(f"strategy '{self.name}': the gradient of task(s) {which} is not finite "
                                     "(NaN or inf loss, or a diverged model); lower the learning rate or clip")

    def combine(self, grads: torch.Tensor, task_losses: torch.Tensor | None = None,
                context: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(combined gradient [D], weights [K]) for per-task gradients [K, D]."""
        gram_matrix = gram(grads)
        self.check_finite(gram_matrix)
        weights = self.weights_from_gram(gram_matrix, task_losses, context)
        return weights.to(grads.dtype) @ grads, weights

    def backward(self, losses: torch.Tensor, model: nn.Module, *, shared: torch.Tensor | None = None,
                 context: dict | None = None) -> torch.Tensor:
        self.check_losses(losses)
        self._logs = {}
        before_none = set()
        if not self._checked_untouched:
            before_none = {id(p) for p in model.parameters() if p.requires_grad and p.grad is None}
        task_losses = reduce_losses(losses)
        tg = task_gradients(task_losses, model, shared, self.on, keep_own_per_task=self.weights_task_heads)
        self.last_mode = tg.mode
        # under torch.distributed: the global batch's Gram matrix and losses (rmtl.distributed)
        gram_matrix, global_losses = reduce_task_gradients(tg, task_losses.detach())
        self.check_finite(gram_matrix, self.names_for(model))
        weights = self.weights_from_gram(gram_matrix, global_losses, context)
        combined = weights.to(tg.grads.dtype) @ tg.grads
        tg.apply(self.postprocess(combined), weights if self.weights_task_heads else None)
        if not self._checked_untouched:
            self._checked_untouched = True
            warn_if_untouched(model, before_none)
        self._log_gradients(self.names_for(model), gram_matrix, weights)
        self.finish_call()
        return weights.to(losses.dtype).detach()

    def postprocess(self, combined: torch.Tensor) -> torch.Tensor:
        """Hook for a last touch on the combined gradient (Nash-MTL's max_norm)."""
        return combined

    def _log_gradients(self, names: list[str], gram_matrix: torch.Tensor, weights: torch.Tensor) -> None:
        cos = cosines(gram_matrix).cpu()
        for i, j, key in pair_keys(names):
            self._logs[f"cos/{key}"] = float(cos[i, j])
        norms = gram_matrix.diagonal().clamp_min(0).sqrt().cpu().tolist()
        for name, value in zip(names, norms):
            self._logs[f"grad_norm/{name}"] = float(value)
        self.log_weights(names, weights)
