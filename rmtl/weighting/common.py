"""What every built-in strategy shares: task names, option checks, loss reduction,
seeded draws and the loss-level base class.

Conventions (see docs/weighting.md):
- the per-task loss is the mean over the batch, ``L_k = mean_i losses[i, k]``
  (per-sample weights [B, K], e.g. from the RMTL critic, multiply before the mean);
- loss-level strategies minimise ``sum_k w_k L_k`` (EW uses w_k = 1);
- the weights returned are detached, shape [K].
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from rmtl.errors import ConfigError
from rmtl.weighting.base import Strategy


def option_error(option: str, message: str) -> ConfigError:
    """The error for a bad strategy option value, keyed as in the run config."""
    return ConfigError(message, key=f"strategy.options.{option}")


def check_positive(option: str, value: float, *, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise option_error(option, f"expected a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise option_error(option, f"expected a finite number {bound}, got {value!r}")
    return value


def check_int(option: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise option_error(option, f"expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(option: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise option_error(option, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def reduce_losses(losses: torch.Tensor, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-task losses [K] from per-sample losses [B, K]: mean over samples, after
    multiplying by per-sample weights [B, K] (or [K]) when given."""
    if sample_weights is not None:
        losses = losses * sample_weights
    return losses.mean(dim=0)


def pair_keys(names: Sequence[str]) -> list[tuple[int, int, str]]:
    """(i, j, 'a~b') for every unordered task pair i < j."""
    return [(i, j, f"{names[i]}~{names[j]}") for i in range(len(names)) for j in range(i + 1, len(names))]


class WeightingStrategy(Strategy):
    """Strategy plus the bookkeeping every built-in needs.

    ``task_names`` label the logs ("weight/ctr", "cos/ctr~ctcvr"); when not given they
    are taken from ``model.spec.tasks`` (every built-in backbone has it), else "task0", ...
    A persisted call counter stands in for ``context['step']`` when the caller gives none,
    so seeded draws stay reproducible across a checkpoint resume either way.
    """

    def __init__(self, num_tasks: int, *, task_names: Sequence[str] | None = None):
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
            raise ConfigError(f"num_tasks must be a positive integer, got {num_tasks!r}", key="num_tasks")
        super().__init__(int(num_tasks))
        if task_names is not None:
            task_names = [str(n) for n in task_names]
            if len(task_names) != self.num_tasks:
                raise option_error("task_names", f"expected {self.num_tasks} names, got {len(task_names)}: {task_names}")
        self.task_names: list[str] | None = task_names
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    # -- helpers for subclasses -------------------------------------------------------
    def names_for(self, model: nn.Module | None) -> list[str]:
        if self.task_names is not None:
            return self.task_names
        spec = getattr(model, "spec", None)
        tasks = getattr(spec, "tasks", None)
        if tasks is not None and len(tasks) == self.num_tasks:
            return [str(t) for t in tasks]
        return [f"task{k}" for k in range(self.num_tasks)]

    def check_losses(self, losses: torch.Tensor) -> None:
        if not isinstance(losses, torch.Tensor) or losses.dim() != 2 or losses.shape[1] != self.num_tasks:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"strategy '{self.name}' expects per-sample, per-task losses of shape [batch, {self.num_tasks}], got {shape}"
            )
        if not losses.requires_grad:
            raise ValueError(f"strategy '{self.name}': the losses are not attached to a graph (requires_grad is False)")

    def step_of(self, context: dict | None) -> int:
        if context is not None and context.get("step") is not None:
            return int(context["step"])
        return int(self.calls.item())

    def rng(self, seed: int, context: dict | None) -> np.random.Generator:
        """A generator that depends only on (seed, step): reproducible after a resume."""
        return np.random.default_rng([int(seed), self.step_of(context)])

    def finish_call(self) -> None:
        self.calls += 1

    def log_weights(self, names: Sequence[str], weights: torch.Tensor) -> None:
        values = weights.detach().float().cpu().tolist()
        for name, value in zip(names, values):
            self._logs[f"weight/{name}"] = float(value)


class LossWeighting(WeightingStrategy):
    """Loss-level strategies: one scalar ``sum_k w_k L_k (+ extra)``, one backward.

    Subclasses implement ``combine(task_losses, context) -> (total, weights)``.
    """

    def combine(self, task_losses: torch.Tensor, context: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, model: nn.Module, *, shared: torch.Tensor | None = None,
                 context: dict | None = None) -> torch.Tensor:
        self.check_losses(losses)
        self._logs = {}
        task_losses = reduce_losses(losses)
        total, weights = self.combine(task_losses, context)
        total.backward()
        weights = weights.detach()
        self.log_weights(self.names_for(model), weights)
        self.finish_call()
        return weights
