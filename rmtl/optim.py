"""The training optimiser: dense Adam for the network, row-sparse Adam for embedding tables.

Why: an embedding table is most of a recommender's parameters (7 x 10k x 128 = 9 M of
14 M in bench/backbones.py), but one batch touches only the rows of its ids. A dense
gradient costs a zeroed [rows, dim] tensor per step, and dense Adam then reads and writes
the whole table plus two moment tensors: non-GEMM time that grows with the vocabulary.
With row-sparse updates the table's gradient is the touched rows only (``RowSparseEmbedding``,
coalesced: one row per distinct id) and ``RowSparseAdam`` updates those rows.

Semantics ("lazy Adam", as torch.optim.SparseAdam): a row's moments decay only on steps
that touch it; untouched rows do not move. Bias correction uses the global step count.
Weight decay is not lazy-compatible, so ``train.weight_decay > 0`` keeps dense Adam.

``make_optimizer`` builds one ``Optimizer`` (fused dense Adam / AdamW for everything else,
RowSparseAdam for the tables), whose state_dict round-trips exactly, so resume stays
bit-exact. ``clip_grad_norm_`` handles sparse gradients (torch's does not).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

if TYPE_CHECKING:  # backbones import this module; keep it free of the config layer
    from rmtl.config import TrainConfig


class _SparseRows(torch.autograd.Function):
    """Row gather whose weight gradient is a COALESCED sparse tensor (one row per distinct id)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.shape = weight.shape
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        flat = ids.reshape(-1)
        rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        values = torch.zeros(rows.numel(), ctx.shape[1], dtype=grad.dtype, device=grad.device)
        values.index_add_(0, inverse, grad.reshape(-1, ctx.shape[1]))
        g = torch.sparse_coo_tensor(rows.unsqueeze(0), values, ctx.shape, is_coalesced=True,
                                    check_invariants=False)  # unique + sorted rows by construction
        return None, g


def sparse_rows(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` with a row-sparse gradient for ``weight``."""
    return _SparseRows.apply(ids, weight)


def row_sparse_tables(model: nn.Module) -> list[nn.Parameter]:
    """The embedding tables that can produce row-sparse gradients (``row_sparse_parameters``)."""
    seen, out = set(), []
    for module in model.modules():
        if hasattr(module, "row_sparse_parameters"):
            for p in module.row_sparse_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


@contextmanager
def row_sparse_gradients(model: nn.Module, enabled: bool = True):
    """Within the block, the model's tables give row-sparse gradients (their ``sparse_grad``);
    afterwards dense again, so code that trains the model with a plain optimiser still works."""
    modules = [m for m in model.modules() if hasattr(m, "row_sparse_parameters")]
    for m in modules:
        m.sparse_grad = bool(enabled)
    try:
        yield
    finally:
        for m in modules:
            m.sparse_grad = False


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam: only the rows present in the gradient are updated (sparse COO gradient,
    or a dense one, whose nonzero rows count as present). No weight decay."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    g = g.coalesce()
                    rows, values = g.indices()[0], g.values()
                else:
                    g2 = g.reshape(g.shape[0], -1)
                    rows = g2.ne(0).any(1).nonzero().squeeze(1)
                    values = g2.index_select(0, rows).view(-1, *g.shape[1:])
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                if rows.numel() == 0:
                    continue
                step = float(state["step"])
                m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(values, alpha=1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                denom = v.sqrt_().div_(math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                p.index_add_(0, rows, m.div_(denom), alpha=-group["lr"] / (1 - beta1 ** step))
        return loss


class Optimizers:
    """Several torch optimisers stepped as one (zero_grad / step / state_dict / param_groups)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = [o for o in optimizers if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        parts = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise ValueError(f"optimizer state holds {len(parts) if isinstance(parts, list) else 'no'} parts, "
                             f"this run has {len(self.optimizers)} (row-sparse embeddings on/off changed?)")
        for o, s in zip(self.optimizers, parts):
            o.load_state_dict(s)


def row_sparse_enabled(tc: "TrainConfig") -> bool:
    """Row-sparse tables unless switched off, or weight decay needs every row every step."""
    return bool(tc.sparse_embedding) and not tc.weight_decay


def make_optimizer(tc: "TrainConfig", model: nn.Module, strategy: nn.Module) -> Optimizers:
    """Adam / AdamW (fused where torch has it) over the trainable parameters (each once),
    except the model's embedding tables, which get RowSparseAdam (train under
    ``row_sparse_gradients`` to make their gradients row-sparse; dense ones work too)."""
    tables = row_sparse_tables(model) if row_sparse_enabled(tc) else []
    seen: set[int] = {id(p) for p in tables}
    params = []
    for p in list(model.parameters()) + list(strategy.parameters()):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    dense = None
    if params:
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[tc.optimizer]
        try:  # the fused kernel is several times faster than the per-tensor default on CPU
            dense = cls(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # old torch, or a device / dtype it does not cover
            dense = cls(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return Optimizers(dense, RowSparseAdam(tables, lr=tc.lr) if tables else None)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2) that also accepts sparse gradients."""
    params = [p for p in params if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad.coalesce() if p.grad.is_sparse else p.grad for p in params]
    total = torch.stack([torch.linalg.vector_norm(g.values() if g.is_sparse else g).double().cpu()
                         for g in grads]).norm()
    coef = min(float(max_norm) / (float(total) + 1e-6), 1.0)
    for p, g in zip(params, grads):
        p.grad = g.mul_(coef)
    return total.float()
