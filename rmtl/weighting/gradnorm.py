"""GradNorm (Chen et al., ICML 2018): learn loss weights that balance gradient norms.

With W the last shared layer (or the shared representation, the cut, where the
backbone gives one) and n_k = |dL_k/dW|:
    G_k = w_k n_k,   Gbar = mean_k G_k,
    r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))      (relative inverse training rate)
    L_grad = sum_k |G_k - Gbar * r_k^alpha|           (Gbar * r^alpha held constant)
The weights w (an nn.Parameter of the strategy, stepped by the training loop's
optimizer) get dL_grad/dw; the model gets the gradient of sum_k w_k L_k. At the start
of each call w is renormalised to sum to K (the paper renormalises after each step),
so the weights used and returned always sum to K. L_k(0) is the first call's loss.

W on a model that does not declare ``shared_parameters()`` (a user's plain nn.Module):
on the first call every task's loss is differentiated once w.r.t. all parameters, and
W is the last registered weight matrix with an entry that EVERY task's gradient reaches
(non-zero): the last truly shared layer, not a task head (nor a [K, H] output layer
holding all heads, whose rows each belong to one task). If no parameter is reached by all tasks,
a ConfigError says to declare ``shared_parameters()`` or name ``layer``. The name found is
kept in ``found_layer``, a plain attribute that checkpoints carry (rmtl.checkpoint.module_state),
so a resumed run measures the same W instead of rediscovering it on another batch; under
torch.distributed it is found from the GLOBAL batch's per-task gradients, so every process
(and one process) picks the same W.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rmtl.backbones.base import SplitsParameters
from rmtl.distributed import all_reduce_gradients, share_weighted_sum
from rmtl.errors import ConfigError
from rmtl.weighting.common import LossWeighting, check_choice, check_positive, reduce_losses
from rmtl.weighting.gradients import MODES, resolve_mode, split_parameters


class GradNorm(LossWeighting):
    name = "gradnorm"

    def __init__(self, num_tasks: int, *, alpha: float = 1.5, on: str = "auto", layer: str | None = None,
                 task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, task_names=task_names)
        self.alpha = check_positive("alpha", alpha, allow_zero=True)
        self.on = check_choice("on", on, MODES)
        self.layer = layer
        self.task_weights = nn.Parameter(torch.ones(self.num_tasks))
        self.register_buffer("initial_losses", torch.zeros(self.num_tasks))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))
        self.found_layer: str | None = None  # W found from task ownership (plain nn.Module); saved in last.pt

    def _norm_target(self, model: nn.Module, shared: torch.Tensor | None,
                     task_losses: torch.Tensor) -> list[torch.Tensor]:
        """What the gradient norms are taken on: the cut, a named layer, or the last shared weight."""
        if self.layer is not None:
            params = dict(model.named_parameters())
            if self.layer not in params:
                raise ConfigError(f"no parameter named '{self.layer}' in the model; known: {', '.join(params)}",
                                  key="strategy.options.layer")
            return [params[self.layer]]
        if resolve_mode(self.on, model, shared) == "representation":
            return [shared]
        if not isinstance(model, SplitsParameters):
            return [self._owned_by_every_task(model, task_losses)]
        shared_params, _ = split_parameters(model)
        if not shared_params:
            raise ConfigError("the model has no trainable shared parameter to measure gradient norms on",
                              key="strategy.options.layer")
        matrices = [p for p in shared_params if p.dim() >= 2]
        return [(matrices or shared_params)[-1]]

    def _owned_by_every_task(self, model: nn.Module, task_losses: torch.Tensor) -> torch.Tensor:
        """The last registered parameter (weight matrices first) with a non-zero gradient from
        every task: found once, from the first call's per-task gradients, then remembered."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.found_layer is None:
            # element-wise: a [K, H] output layer holds every task's head, but no entry of it
            # gets a gradient from two tasks; a shared layer's entries get one from all of them
            common: list[torch.Tensor | None] = [torch.ones_like(p, dtype=torch.bool) for _, p in named]
            for k in range(self.num_tasks):
                got = torch.autograd.grad(task_losses[k], [p for _, p in named], retain_graph=True,
                                          allow_unused=True)
                got = all_reduce_gradients(got, [p for _, p in named])  # the global batch's (no-op in one process)
                common = [None if c is None or g is None else c & (g.to_dense() if g.is_sparse else g).ne(0)
                          for c, g in zip(common, got)]
            shared = [(n, p) for (n, p), c in zip(named, common) if c is not None and bool(c.any())]
            if not shared:
                raise ConfigError("gradnorm: no parameter of the model gets a gradient from every task, so there "
                                  "is no shared layer to measure gradient norms on; declare shared_parameters() "
                                  "(and task_parameters(k)) on the model, or name a parameter with "
                                  "strategy.options.layer", key="strategy.options.layer")
            matrices = [n for n, p in shared if p.dim() >= 2]
            self.found_layer = (matrices or [n for n, _ in shared])[-1]
        return dict(named)[self.found_layer]

    def backward(self, losses: torch.Tensor, model: nn.Module, *, shared: torch.Tensor | None = None,
                 context: dict | None = None) -> torch.Tensor:
        self.check_losses(losses)
        self._logs = {}
        task_losses = reduce_losses(losses)
        global_losses = share_weighted_sum(task_losses.detach())  # under torch.distributed: the global batch's
        with torch.no_grad():  # the paper's renormalisation, done before use
            w = self.task_weights
            w.clamp_(min=1e-6)
            w.mul_(self.num_tasks / w.sum())
            if not bool(self.has_initial):
                self.initial_losses.copy_(global_losses.clamp_min(1e-12))
                self.has_initial.fill_(True)
        target = self._norm_target(model, shared, task_losses)
        on_cut = shared is not None and len(target) == 1 and target[0] is shared
        squared = torch.zeros(self.num_tasks, dtype=torch.float64)
        for k in range(self.num_tasks):
            got = torch.autograd.grad(task_losses[k], target, retain_graph=True, allow_unused=True)
            if not on_cut:  # a parameter: its global gradient first (rmtl.distributed; no-op in one process)
                got = all_reduce_gradients(got, target)
            squares = [g.detach().double().pow(2).sum().cpu() for g in got if g is not None]
            squared[k] = torch.stack(squares).sum() if squares else 0.0
        norms = (share_weighted_sum(squared, power=2) if on_cut else squared).sqrt()
        w = self.task_weights.detach().double().cpu()
        g_norms = w * norms
        ratio = global_losses.double().cpu() / self.initial_losses.double().cpu()
        inverse_rate = ratio / ratio.mean()
        goal = g_norms.mean() * inverse_rate.pow(self.alpha)
        grad_w = torch.sign(g_norms - goal) * norms  # d/dw_k sum_j |w_j n_j - goal_j|
        grad_w = grad_w.to(self.task_weights)
        if self.task_weights.grad is None:
            self.task_weights.grad = grad_w
        else:
            self.task_weights.grad.add_(grad_w)
        weights = self.task_weights.detach().to(task_losses.dtype)
        (weights * task_losses).sum().backward()
        names = self.names_for(model)
        self.log_weights(names, weights)
        for name, value in zip(names, norms.tolist()):
            self._logs[f"grad_norm/{name}"] = float(value)
        self.finish_call()
        return weights.clone()
