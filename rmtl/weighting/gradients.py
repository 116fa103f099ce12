"""Per-task gradients, computed ONCE per step for every gradient-level method.

Two places to take them (``on``):

- ``"representation"``: gradients of each task loss w.r.t. the shared representation
  (the CUT that ``forward_with_shared`` returns, flattened [B * H]). One
  ``autograd.grad`` per task reaches only down to the cut, so it is cheap; it also
  yields the task-specific parameters' gradients (summed over tasks, or weighted by
  the method's weights where it asks: Nash-MTL), and one ``cut.backward(combined)``
  finally pushes the combined gradient through the shared trunk. The per-task gradient
  is the flattened [B * H] representation gradient, Sener & Koltun's MGDA-UB bound
  (not a per-sample sum over the batch).
- ``"parameters"``: gradients of each task loss w.r.t. the flattened shared
  parameters; the combined one is written into their ``.grad``. Works for any
  nn.Module (a module without ``shared_parameters`` shares everything).
- ``"auto"`` (default): the representation where the backbone gives a usable cut and
  declares which parameters are shared, the parameters otherwise.

Gradients are ACCUMULATED into ``.grad`` (as ``loss.backward()`` would), so the caller
zeroes them before the step as usual. ``nn.Embedding(sparse=True)`` works: its per-task
gradients are made dense for the Gram matrix (so parameters mode holds K dense copies of
the table), and its combined gradient is written back row-sparse, as the layer makes it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from rmtl.backbones.base import SplitsParameters
from rmtl.backbones.base import shared_parameters as _shared_parameters
from rmtl.errors import ConfigError

MODES = ("auto", "representation", "parameters")


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shared, task-specific) trainable parameters; task-specific = everything not shared."""
    shared = _shared_parameters(model)
    ids = {id(p) for p in shared}
    own = [p for p in _trainable(model) if id(p) not in ids]
    return shared, own


def resolve_mode(on: str, model: nn.Module, shared: torch.Tensor | None) -> str:
    """Where the per-task gradients are taken for this call."""
    usable = isinstance(shared, torch.Tensor) and shared.requires_grad and isinstance(model, SplitsParameters)
    if on == "parameters":
        return "parameters"
    if on == "representation":
        if not usable:
            reason = ("the model returned no shared representation (forward_with_shared gave None or was not "
                      "called with shared=...)") if not isinstance(shared, torch.Tensor) else (
                      "the shared representation does not require grad" if not shared.requires_grad else
                      "the model has no shared_parameters() and task_parameters(k) to tell the trunk from the task heads")
            raise ConfigError(f"on='representation' is not possible: {reason}; use on='parameters' or 'auto'",
                              key="strategy.options.on")
        return "representation"
    return "representation" if usable else "parameters"


def _accumulate(params: list[nn.Parameter], grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g)


def _row_sparse(dense: torch.Tensor) -> torch.Tensor:
    """A dense gradient of an nn.Embedding(sparse=True) table as the layer's own layout:
    COO over the rows that are non-zero (sparse_dim 1), so sparse optimizers accept it."""
    rows = dense.reshape(dense.shape[0], -1).ne(0).any(1).nonzero().reshape(-1)
    return torch.sparse_coo_tensor(rows[None], dense[rows], dense.shape, check_invariants=False).coalesce()


@dataclass
class TaskGradients:
    """Per-task gradients [K, D] and where the combined one goes back."""

    grads: torch.Tensor
    mode: str
    cut: torch.Tensor | None = None
    shared_params: list[nn.Parameter] = field(default_factory=list)
    own_params: list[nn.Parameter] = field(default_factory=list)
    own_grads: list[torch.Tensor | None] = field(default_factory=list)  # summed over tasks
    own_per_task: list[list[torch.Tensor | None]] | None = None  # [K][P], kept when asked for
    sparse_ids: set[int] = field(default_factory=set)  # shared params whose layer makes sparse grads

    def apply(self, combined: torch.Tensor, own_weights: torch.Tensor | None = None) -> None:
        """Write the task-specific gradients (summed, or weighted by ``own_weights`` [K] when
        the per-task ones were kept), then send the combined gradient [D] back: through the
        trunk, or into the shared .grad. Nothing is written before this call."""
        own = self.own_grads
        if own_weights is not None:
            if self.own_per_task is None:
                raise ValueError("task_gradients(..., keep_own_per_task=True) is needed for weighted task heads")
            own = [None] * len(self.own_params)
            for k, grads in enumerate(self.own_per_task):
                for i, g in enumerate(grads):
                    if g is not None:
                        g = g * own_weights[k].to(g.dtype)
                        own[i] = g if own[i] is None else own[i] + g
        _accumulate(self.own_params, own)
        if self.mode == "representation":
            self.cut.backward(combined.reshape(self.cut.shape).to(self.cut.dtype))
            return
        offset = 0
        for p in self.shared_params:
            n = p.numel()
            g = combined[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
            if id(p) in self.sparse_ids:
                g = _row_sparse(g)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)


def task_gradients(task_losses: torch.Tensor, model: nn.Module, shared: torch.Tensor | None,
                   on: str = "auto", *, keep_own_per_task: bool = False) -> TaskGradients:
    """One gradient per task, taken once (nothing is written to .grad until ``apply``).

    ``task_losses`` is [K], attached to the graph. The graph below the cut is kept for
    ``TaskGradients.apply``; in parameters mode it is released after the last task.
    ``keep_own_per_task`` keeps each task's task-specific gradients apart, so ``apply``
    can weight them (one extra copy of the task heads' gradients).
    """
    mode = resolve_mode(on, model, shared)
    shared_params, own = split_parameters(model)
    num_tasks = task_losses.shape[0]
    if mode == "representation":
        targets: list[torch.Tensor] = [shared]
        width = shared.numel()
    else:
        targets = list(shared_params)
        width = sum(p.numel() for p in shared_params)
    inputs = targets + own
    device = task_losses.device
    dtype = shared.dtype if mode == "representation" else (shared_params[0].dtype if shared_params else torch.float32)
    if dtype in (torch.bfloat16, torch.float16):  # under autocast: keep the task gradients (and their Gram) in fp32
        dtype = torch.float32
    grads = torch.empty(num_tasks, width, device=device, dtype=dtype)  # every slice is written below
    own_sum: list[torch.Tensor | None] = [None] * len(own)
    per_task: list[list[torch.Tensor | None]] | None = [] if keep_own_per_task else None
    sparse_ids: set[int] = set()
    for k in range(num_tasks):
        keep = mode == "representation" or k < num_tasks - 1
        if not task_losses[k].requires_grad:  # a task without a path to any parameter contributes nothing
            grads[k].zero_()
            if per_task is not None:
                per_task.append([None] * len(own))
            continue
        got = torch.autograd.grad(task_losses[k], inputs, retain_graph=keep, allow_unused=True)
        offset = 0
        for t, g in zip(targets, got[: len(targets)]):
            n = t.numel()
            if g is None:
                grads[k, offset:offset + n].zero_()
            else:
                if g.is_sparse:  # nn.Embedding(sparse=True)
                    sparse_ids.add(id(t))
                    g = g.to_dense()
                grads[k, offset:offset + n] = g.reshape(-1)
            offset += n
        own_k = list(got[len(targets):])
        if per_task is not None:
            per_task.append(own_k)
        for i, g in enumerate(own_k):
            if g is not None:
                own_sum[i] = g if own_sum[i] is None else own_sum[i] + g
    return TaskGradients(grads=grads, mode=mode, cut=shared if mode == "representation" else None,
                         shared_params=shared_params if mode == "parameters" else [],
                         own_params=own, own_grads=own_sum, own_per_task=per_task, sparse_ids=sparse_ids)


def gram(grads: torch.Tensor) -> torch.Tensor:
    """G G^T in float64 [K, K] (the only thing most combination rules need)."""
    return (grads @ grads.T).double()


def cosines(gram_matrix: torch.Tensor) -> torch.Tensor:
    norms = gram_matrix.diagonal().clamp_min(0).sqrt()
    return gram_matrix / (norms[:, None] * norms[None, :]).clamp_min(1e-20)


def warn_if_untouched(model: nn.Module, before_none: set[int]) -> None:
    """Once per strategy: name trainable parameters that got no gradient at all (a cut
    that is not a cut, or a parameter left out of both shared and task lists)."""
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and id(p) in before_none and p.grad is None]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        warnings.warn(f"gradient strategy left {len(missing)} trainable parameter(s) without a gradient: {shown}. "
                      "If they are used in forward, the shared representation is not a cut of the graph "
                      "(see backbones/base.py) - try on='parameters'.", RuntimeWarning, stacklevel=3)
