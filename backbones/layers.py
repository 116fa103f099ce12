"""Building blocks shared by every backbone (and by the critics of the RMTL agent).

Speed notes (CPU, see docs/backbones.md for figures):
- ``Experts`` keeps its activations EXPERT-MAJOR and FEATURE-MAJOR, [E, H, B]: the first
  layer of all experts is one GEMM ([E*H, in] x [in, B]), deeper layers one ``baddbmm``,
  and every elementwise op runs on contiguous memory. ``forward`` still returns the
  familiar [B, E, H] as a free permuted view.
- Dropout draws 16-bit random numbers (four per 64-bit word, from numpy's SFC64 seeded
  by torch's generator) instead of one float per element, and is fused with ReLU in one
  autograd node that saves only its output; on 2 cores torch's Bernoulli mask generation
  otherwise costs more than the expert GEMMs.
- In training (ReLU, 0 < dropout < 1) each expert layer is ONE autograd node
  (``_ExpertLayer``): GEMM, then bias + scale + float mask + ReLU in place on its output;
  the last layer's GEMM writes [B, E, H] directly. Backward runs ReLU's kernel in place,
  folds the dropout scale into the GEMMs' alpha and picks GEMM layouts by what was
  measured (``ROW_MAJOR_FIRST_BACKWARD``: transposed outputs on AVX2, row-major on
  AVX-512). Under bf16 autocast the operands are cast once and kept for backward, and the
  last layer's gradient reaches oneDNN's batched GEMMs (AMX) as a plain [E, B, H] copy.
  Eval / other activations keep addmm / baddbmm. Profile: bench/step_profile.py.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np
import torch
from torch import nn

from rmtl.data.spec import FeatureSpec
from rmtl.optim import sparse_rows

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "prelu": nn.PReLU}
ACTIVATIONS = tuple(_ACTIVATIONS)

_LEVELS = 65536  # the drop probability is rounded to a multiple of 1/65536


def _random_words(n: int, device=None) -> torch.Tensor:
    """n random int64 words. On CPU from numpy's SFC64 (3x faster than torch's mt19937
    random_ on this hardware), seeded with one draw from torch's global generator, so
    ``torch.manual_seed`` still makes every mask reproducible."""
    if device is not None and torch.device(device).type != "cpu":
        return torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, device=device)
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64))
    return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))


def keep_mask(shape: torch.Size | Sequence[int], p: float, device=None) -> tuple[torch.Tensor, float]:
    """(bool mask with P(True) = 1 - p', scale 1 / (1 - p')), p' = round(p * 65536) / 65536.

    Four 16-bit uniforms come out of every 64-bit random word: a quarter of the
    generator calls (and far less memory traffic) of ``torch.rand`` / ``bernoulli_``.
    Uses torch's global generator, so ``torch.manual_seed`` makes it reproducible.
    """
    uniform, threshold, scale = _uniform16(shape, p, device)
    return uniform >= threshold, scale


def _uniform16(shape: torch.Size | Sequence[int], p: float, device=None) -> tuple[torch.Tensor, int, float]:
    """(int16 uniforms of ``shape``, the threshold below which an element is dropped, the
    inverted-dropout scale) (keep_mask and the fused expert layers use it)."""
    n = math.prod(shape)
    words = _random_words((n + 3) // 4, device)
    drop = int(round(p * _LEVELS))
    threshold = -(_LEVELS // 2) + drop  # int16 values are uniform on [-32768, 32767]
    return words.view(torch.int16)[:n].view(*shape), threshold, _LEVELS / (_LEVELS - drop)


class _ReluDropout(torch.autograd.Function):
    """relu(x) * mask / (1 - p) in one node; backward needs only the output's sign."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = keep_mask(x.shape, p, x.device)
        out = torch.relu(x).mul_(keep).mul_(scale)
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        # Match the output's layout so the GEMM backward below gets contiguous gradients.
        grad = grad.contiguous() if out.is_contiguous() else grad
        # threshold_backward is ReLU's own backward kernel: grad where out > 0, else 0.
        return torch.ops.aten.threshold_backward(grad, out, 0).mul_(ctx.scale), None


# The first expert layer's backward products output [B, in] and [E*H, in]: rows only `in`
# wide (897 in bench/backbones.py). MKL on AVX2 (AMD EPYC) ran such outputs at ~2/3 of its
# rate, so there they are written transposed ([in, B], [in, E*H]) and the step pays a
# strided sum into x's gradient and a transposing copy of the weight gradient (~5 % of an
# MMoE step). On AVX-512 (Intel Xeon) all eight layouts of these products run at the same
# rate (within 5 %, bench/step_profile.py), so there the outputs are row-major and both
# passes go. Chosen by the instruction set torch dispatches to: the AVX2 path is unchanged.
ROW_MAJOR_FIRST_BACKWARD = torch.backends.cpu.get_cpu_capability().startswith("AVX512")

_scratch = threading.local()


def _scratch_like(shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """A per-thread buffer reused for a temporary that dies within one op sequence (the
    float dropout mask). A fresh 32 MiB tensor is above glibc's mmap threshold, so every
    step would page-fault it in again (~10-20 ms per tensor on the AVX2 VM we measured)."""
    n = math.prod(shape)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != torch.device(device):
        buf = _scratch.buf = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(*shape)


class _ExpertLayer(torch.autograd.Function):
    """One expert layer in training: relu(W x + b) * mask / (1 - p), as ONE node.

    ``first``: x is the shared input [B, in] and w [E, H, in]: one GEMM for all experts.
    Otherwise x is the previous layer's [E, in, B] and the GEMM is one bmm. The GEMM
    writes [E, H, B] (expert-major, feature-major), or with ``batch_major`` a contiguous
    [B, E, H] directly (the layout ``mix_experts`` wants; MKL takes the transposed
    operands and the strided output at about the same rate, a separate transposing pass
    cost more than the GEMM lost).

    Why one node: bias, scale, mask and ReLU run in place on the GEMM output (addmm's
    bias would first copy the bias into the whole output); the mask is a float multiply
    (a bool masked_fill is not vectorised: ~4x slower) from a reused buffer; backward
    needs only the output's sign (ReLU's own threshold_backward kernel), runs it in place
    on the incoming gradient when ``owns_grad`` (the consumer is the next expert layer,
    so nobody else sees that gradient), and folds the 1 / (1 - p) scale into the
    backward GEMMs' alpha. The first layer's backward GEMMs write [in, E*H] and [in, B]
    and return transposed views where MKL runs products whose output rows are only ``in``
    wide (897 in bench/backbones.py, an odd width) at ~2/3 of its rate (AVX2); on AVX-512
    they write [B, in] and [E*H, in] directly (``ROW_MAJOR_FIRST_BACKWARD``).
    """

    @staticmethod
    def forward(ctx, x, w, bias, p: float, first: bool, batch_major: bool, owns_grad: bool):
        E, H, D = w.shape
        if torch.is_autocast_enabled(x.device.type):  # cast once; backward reuses the cast operands
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dtype), w.to(dtype)
        if first and batch_major:
            h = torch.mm(x, w.reshape(E * H, D).t()).view(-1, E, H)
        elif first:
            h = torch.mm(w.reshape(E * H, D), x.t()).view(E, H, -1)
        elif batch_major:
            h = torch.empty(x.shape[2], E, H, dtype=x.dtype, device=x.device)  # x: the previous layer's dtype
            torch.bmm(x.transpose(1, 2), w.transpose(1, 2).to(x.dtype), out=h.permute(1, 0, 2))
        else:
            h = torch.bmm(w, x)
        uniform, threshold, scale = _uniform16(h.shape, p, h.device)
        b = bias.to(h.dtype).mul(scale)
        if batch_major:
            b = b.view(E, H)
        out = torch.add(b, h, alpha=scale, out=h)  # (h + bias) * scale, in place
        # The float mask: compare in int16 in place, then a converting copy (a compare that
        # writes floats directly is not vectorised: 4-7 ms against 1 + 2 ms for 2048 x 4096).
        mask = _scratch_like(out.shape, out.dtype, out.device).copy_(torch.ge(uniform, threshold, out=uniform))
        out.mul_(mask).relu_()
        ctx.save_for_backward(x, w, out)
        ctx.scale, ctx.first, ctx.batch_major, ctx.owns_grad = scale, first, batch_major, owns_grad
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, out = ctx.saved_tensors
        if ctx.owns_grad and grad.stride() == out.stride():
            g = torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)
        else:
            g = torch.ops.aten.threshold_backward(grad.contiguous(), out, 0)
        if ctx.batch_major and not ctx.first and g.dtype != torch.float32:
            # oneDNN's bf16 / fp16 batched GEMM (AMX) takes no batch stride smaller than a
            # matrix (the permuted view below): it fell back to ~1/8 of its rate. An
            # [E, B, H] copy moves contiguous rows of H (~1 ms); read as [E, H, B].
            g = g.transpose(0, 1).contiguous().transpose(1, 2)
        elif ctx.batch_major:
            g = g.permute(1, 2, 0)  # [E, H, B] view: MKL reads it transposed
        s = ctx.scale
        x, w = x.to(g.dtype), w.to(g.dtype)  # under autocast the forward GEMM ran in g's dtype
        E, H, D = w.shape
        gb = g.sum(-1, keepdim=True).mul_(s).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        gx = gw = None
        zero = g.new_zeros(())  # beta=0: the product times alpha into a fresh buffer (out= keeps
        # the op countable by torch's FlopCounterMode, which bench/backbones.py uses; no input copy)
        if ctx.first and ROW_MAJOR_FIRST_BACKWARD:
            g2 = g.reshape(E * H, -1)  # a view in both layouts
            if ctx.needs_input_grad[0]:  # [B, in] like the gates' share of x's gradient: a contiguous sum
                gx = torch.addmm(zero, g2.t(), w.reshape(E * H, D), beta=0, alpha=s,
                                 out=g.new_empty(g2.shape[1], D))
            if ctx.needs_input_grad[1]:  # straight into the parameter's layout, no transposing copy
                gw = torch.addmm(zero, g2, x, beta=0, alpha=s, out=g.new_empty(E * H, D)).view(E, H, D)
        elif ctx.first:
            g2 = g.reshape(E * H, -1)  # a view in both layouts
            if ctx.needs_input_grad[0]:
                gx = torch.addmm(zero, w.reshape(E * H, D).t(), g2, beta=0, alpha=s,
                                 out=g.new_empty(D, g2.shape[1])).t()
            if ctx.needs_input_grad[1]:
                gw = torch.addmm(zero, x.t(), g2.t(), beta=0, alpha=s,
                                 out=g.new_empty(D, E * H)).t().contiguous().view(E, H, D)
        else:
            if ctx.needs_input_grad[0]:
                gx = torch.baddbmm(zero, w.transpose(1, 2), g, beta=0, alpha=s, out=g.new_empty(E, D, g.shape[2]))
            if ctx.needs_input_grad[1]:
                gw = torch.baddbmm(zero, g, x.transpose(1, 2), beta=0, alpha=s, out=g.new_empty(E, H, D))
        return gx, gw, gb, None, None, None, None


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with the cheap 16-bit mask (drop rate rounded to 1/65536)."""
    if not training or p <= 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    return _Dropout.apply(x, float(p))


def relu_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """relu then inverted dropout, fused (one saved tensor, one backward pass)."""
    if not training or p <= 0:
        return torch.relu(x)
    if p >= 1:
        return torch.zeros_like(x)
    return _ReluDropout.apply(x, float(p))


class ActDropout(nn.Module):
    """Activation followed by dropout; ReLU + dropout runs as one fused node."""

    def __init__(self, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; known: {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.p = float(dropout)
        self.act = None if activation == "relu" else _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            return relu_dropout(x, self.p, self.training)
        return fast_dropout(self.act(x), self.p, self.training)

    def extra_repr(self) -> str:
        return f"activation={self.activation}, dropout={self.p}"


class FeatureEmbedding(nn.Module):
    """All sparse fields through ONE embedding table (per-field offsets), dense fields
    through a linear projection; output is the flat concatenation [B, output_dim].

    One table means one gather for all fields instead of a Python loop over fields.
    ``dense_dim`` is the width of the dense projection (default: embed_dim).
    ``sparse_grad`` (set by the trainer, rmtl.optim): in training the table's gradient is
    row-sparse (only the rows of the batch's ids), for the row-sparse Adam update.
    """

    sparse_grad = False

    def __init__(self, spec: FeatureSpec, embed_dim: int, dense_dim: int | None = None):
        super().__init__()
        self.num_fields = spec.num_sparse
        self.embed_dim = int(embed_dim)
        cards = torch.as_tensor([max(int(c), 1) for c in spec.cardinalities], dtype=torch.long)
        offsets = torch.zeros(len(cards), dtype=torch.long)
        if len(cards) > 1:
            offsets[1:] = torch.cumsum(cards, 0)[:-1]
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(int(cards.sum()) if len(cards) else 1, self.embed_dim)
        nn.init.normal_(self.table.weight, std=0.01)
        self.num_dense = spec.num_dense
        self.dense_dim = 0
        if self.num_dense:
            self.dense_dim = int(dense_dim) if dense_dim is not None else self.embed_dim
            self.dense_proj = nn.Linear(self.num_dense, self.dense_dim)
        self.output_dim = self.num_fields * self.embed_dim + self.dense_dim
        if self.output_dim == 0:
            raise ValueError("the feature spec has neither sparse nor dense fields")

    def field_embeddings(self, sparse: torch.Tensor) -> torch.Tensor:
        """[B, F, E] embeddings of the sparse fields."""
        if self.sparse_grad and self.training and torch.is_grad_enabled():
            return sparse_rows(sparse + self.offsets, self.table.weight)
        return self.table(sparse + self.offsets)

    def row_sparse_parameters(self) -> list[nn.Parameter]:
        return [self.table.weight]

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.num_fields:
            parts.append(self.field_embeddings(sparse).flatten(1))
        if self.num_dense:
            parts.append(self.dense_proj(dense))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class MLP(nn.Sequential):
    """Linear -> activation -> dropout blocks, optionally followed by a linear output."""

    def __init__(self, in_dim: int, hidden: Sequence[int], *, dropout: float = 0.0, activation: str = "relu",
                 out_dim: int | None = None, batch_norm: bool = False):
        layers: list[nn.Module] = []
        dim = int(in_dim)
        for width in hidden:
            layers.append(nn.Linear(dim, int(width)))
            if batch_norm:
                layers.append(nn.BatchNorm1d(int(width)))
            layers.append(ActDropout(activation, dropout))
            dim = int(width)
        if out_dim is not None:
            layers.append(nn.Linear(dim, int(out_dim)))
            dim = int(out_dim)
        super().__init__(*layers)
        self.output_dim = dim


class BatchedLinear(nn.Module):
    """E independent linear layers applied as one batched matmul: [B, in] or [B, E, in] -> [B, E, out]."""

    def __init__(self, num: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(num, 1, out_dim))
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # same input for every expert: one [B, in] x [E, in, out] product
            return torch.matmul(x.unsqueeze(0), self.weight).add_(self.bias).transpose(0, 1)
        return torch.baddbmm(self.bias, x.transpose(0, 1), self.weight).transpose(0, 1)


class Experts(nn.Module):
    """E expert MLPs of identical shape evaluated together: [B, in] -> [B, E, out].

    Internally activations are [E, H, B] (``forward_t``): layer 0 is ONE GEMM for all
    experts (they share their input), layer l > 0 one baddbmm over experts; no Python
    loop over experts. ``weights[l]`` is [E, H_l, H_{l-1}], ``biases[l]`` [E, H_l, 1].
    """

    def __init__(self, num: int, in_dim: int, hidden: Sequence[int], *, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        if not hidden:
            raise ValueError("experts need at least one hidden width")
        if int(num) < 1:
            raise ValueError(f"need at least one expert, got {num}")
        dims = [int(in_dim), *map(int, hidden)]
        self.num = int(num)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(a)  # nn.Linear's default init, per expert
            self.weights.append(nn.Parameter(torch.empty(self.num, b, a).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(self.num, b, 1).uniform_(-bound, bound)))
        self.act = ActDropout(activation, dropout)
        self.output_dim = dims[-1]

    def _fused(self) -> bool:
        """Training with ReLU and 0 < dropout < 1: bias + ReLU + dropout as one node."""
        return self.act.act is None and self.training and 0 < self.act.p < 1

    def _forward_fused(self, x: torch.Tensor, batch_major: bool) -> torch.Tensor:
        last = len(self.weights) - 1
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = _ExpertLayer.apply(h, w, b, self.act.p, i == 0, batch_major and i == last, i < last)
        return h

    def forward_t(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in] (any strides) -> [E, out, B] contiguous."""
        if self._fused():
            return self._forward_fused(x, False)
        E = self.num
        w0, b0 = self.weights[0], self.biases[0]
        act = self.act
        h = torch.addmm(b0.view(E * w0.shape[1], 1), w0.view(E * w0.shape[1], w0.shape[2]), x.t())
        h = act(h).view(E, w0.shape[1], -1)
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = act(torch.baddbmm(b, w, h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in] -> [B, E, out] contiguous (one transposition of the last layer)."""
        if self._fused():  # the transposition is fused into the last layer's bias pass
            return self._forward_fused(x, True)
        return self.forward_t(x).permute(2, 0, 1).contiguous()


def mix_experts(experts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sums of expert outputs: experts [B, E, H], gates [B, G, E] -> [B, G, H].

    One bmm over the batch. ``experts`` must have row-major [E, H] matrices (e.g. the
    output of ``Experts.forward`` or a slice of a [B, N] cut); a permuted view of
    ``forward_t`` would make bmm copy every sample's matrix separately.
    """
    return torch.bmm(gates.to(experts.dtype), experts)


def cut_slices(cut: torch.Tensor, *shapes: Sequence[int]) -> list[torch.Tensor]:
    """Views of consecutive column blocks of a [B, N] cut, each reshaped to [B, *shape]."""
    out, start = [], 0
    for shape in shapes:
        width = math.prod(shape)
        out.append(cut[:, start:start + width].view(cut.shape[0], *shape))
        start += width
    if start != cut.shape[1]:
        raise ValueError(f"cut has {cut.shape[1]} columns, the slices cover {start}")
    return out
