"""Where the time of one training step of our MMoE / PLE goes, and how fast each of its
GEMMs could run on this CPU (the profile issue 13 asks for).

    python bench/step_profile.py --model mmoe          # or ple; --threads 1|2

1. Every aten op of a step (forward, loss, backward, Adam) is timed by a dispatch mode,
   per call, over several steps; each call keeps its MINIMUM over the steps (on a shared
   machine the minimum filters out the time other processes took the cores). The table
   gives each op group's share of the summed minima ("best-case step").
2. Every GEMM of the step (mm / addmm / bmm / baddbmm, with the strides it was called
   with) is replayed alone (best of a few calls) and, for 2-D products, in all eight
   layouts of the same product (each operand row- or column-major, the output or its
   transpose), against the fp32 GEMM peak measured in between (bench/backbones.py's
   2048 x 1024 x 4096 product). "in step" is its rate inside the step, "alone" at its
   own layout, "best layout" the fastest of the eight.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backbones as bb  # noqa: E402  (the bench's config, models and optimiser)

from rmtl.device import cpu_instruction_set, keep_freed_memory  # noqa: E402
from rmtl.optim import row_sparse_gradients  # noqa: E402

GEMMS = {"mm", "addmm", "bmm", "baddbmm"}
clock = time.perf_counter  # time.thread_time with --threads 1: CPU time, blind to other processes


def peak_rate(n: int = 2048, k: int = 1024, m: int = 4096, reps: int = 4) -> float:
    """bench/backbones.py's gemm_peak on this script's clock."""
    a, b, out = torch.randn(n, k), torch.randn(k, m), torch.empty(n, m)
    return 2 * n * k * m / best_time(lambda: torch.mm(a, b, out=out), reps)


def _meta(a):
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), tuple(a.stride()), a.dtype) if a.layout == torch.strided else ("sparse",)
    if isinstance(a, (list, tuple)):
        return ("list", len(a))
    if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device, torch.layout)):
        return a
    return type(a).__name__


class OpTimer(TorchDispatchMode):
    """Times every aten op called under it (wall time of the op, in call order)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple, dict, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = clock()
        out = func(*args, **kwargs)
        dt = clock() - t0
        name = func.overloadpacket.__name__
        self.calls.append((name, tuple(map(_meta, args)), {k: _meta(v) for k, v in kwargs.items()}, dt))
        return out


def group_of(name: str, args: tuple) -> str:
    if name in GEMMS:
        shapes = [a[1] for a in args if isinstance(a, tuple) and a and a[0] == "T"]
        return f"{name} " + " x ".join("x".join(map(str, s)) for s in shapes[-2:] if s)
    if "adam" in name:
        return "Adam (fused dense)"
    if name in {"index_select", "index_copy_", "index_add_", "unique_dim", "_unique2", "embedding",
                "sqrt_", "addcmul_", "div_", "coalesce", "_coalesce", "_sparse_coo_tensor_with_dims_and_tensors"}:
        return "embedding gather + row-sparse update"
    return "other: " + name


def profile_step(model, optim, batches, steps: int) -> list[tuple[str, tuple, dict, float]]:
    """Per call of one step: (op, args meta, kwargs meta, minimum time over ``steps`` steps)."""
    runs = []
    with row_sparse_gradients(model):
        for s in range(steps + 2):
            sparse, dense, labels = batches[s % len(batches)]
            timer = OpTimer()
            with timer:
                loss = bb.loss_of(model, False, sparse, dense, labels)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
            if s >= 2:  # warm-up steps first
                runs.append(timer.calls)
    n = min(len(r) for r in runs)
    keyed = [[(c[0], c[1]) for c in r[:n]] for r in runs]
    if any(k != keyed[0] for k in keyed):  # the row-sparse update's shapes vary with the ids: align by name only
        names = [[c[0] for c in r[:n]] for r in runs]
        if any(x != names[0] for x in names):
            raise RuntimeError("the steps called different op sequences")
    return [(runs[0][i][0], runs[0][i][1], runs[0][i][2], min(r[i][3] for r in runs)) for i in range(n)]


def gemm_flops(name: str, args: tuple) -> int:
    shapes = [a[1] for a in args if isinstance(a, tuple) and a and a[0] == "T"]
    a, b = shapes[-2], shapes[-1]
    if name in {"bmm", "baddbmm"}:
        return 2 * a[0] * a[1] * a[2] * b[2]
    return 2 * a[0] * a[1] * b[1]


def _make(meta):
    if isinstance(meta, tuple) and meta and meta[0] == "T":
        _, shape, stride, dtype = meta
        t = torch.empty_strided(shape, stride, dtype=dtype)
        return t.normal_() if t.is_floating_point() else t.zero_()
    return meta


def best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def replay(name: str, args: tuple, kwargs: dict, reps: int) -> float:
    op = getattr(torch.ops.aten, name)
    a, k = [_make(x) for x in args], {key: _make(v) for key, v in kwargs.items()}
    return best_time(lambda: op(*a, **k), reps)


def layouts(name: str, args: tuple, reps: int) -> dict[str, float]:
    """Best time of the same product C = A B in each of 8 layouts: A as [m,k] row- or
    column-major, B likewise, and the output as C (row-major) or C^T (computed as B^T A^T)."""
    tensors = [a for a in args if isinstance(a, tuple) and a and a[0] == "T"]
    (sa, sb), batched, dtype = [t[1] for t in tensors[-2:]], name in {"bmm", "baddbmm"}, tensors[-1][3]
    out = {}
    for ta, tb, tc in itertools.product((False, True), repeat=3):
        def mat(shape, transposed):
            if transposed:
                return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype).transpose(-1, -2)
            return torch.randn(*shape, dtype=dtype)
        A, B = mat(sa, ta), mat(sb, tb)
        if tc:  # C^T = B^T A^T, written row-major
            x, y = B.transpose(-1, -2), A.transpose(-1, -2)
        else:
            x, y = A, B
        C = torch.empty(*x.shape[:-1], y.shape[-1], dtype=dtype)
        f = (lambda x=x, y=y, C=C: torch.bmm(x, y, out=C)) if batched else (lambda x=x, y=y, C=C: torch.mm(x, y, out=C))
        out[f"A{'c' if ta else 'r'}B{'c' if tb else 'r'}{'Ct' if tc else 'C'}"] = best_time(f, reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mmoe", choices=["mmoe", "ple"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=6, help="profiled steps (each call keeps its minimum)")
    ap.add_argument("--reps", type=int, default=6, help="replays per GEMM layout (best kept)")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="time the main thread's CPU time also with 2+ threads (run with OMP_WAIT_POLICY=PASSIVE: "
                         "then a parallel op counts the main thread's share, a serial op all of it)")
    ap.add_argument("--top", type=int, default=15, help="largest non-GEMM calls listed")
    ap.add_argument("--bf16", action="store_true", help="profile under bf16 autocast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = time.thread_time if args.threads == 1 or args.cpu_clock else time.perf_counter
    keep_freed_memory()
    torch.manual_seed(0)
    model = bb.ours(args.model, bb.make_spec(), 1)
    model.train()
    optim = bb.adam(model)
    data = bb.planted(bb.BATCH * 2, seed=0)
    batches = [tuple(t[i * bb.BATCH:(i + 1) * bb.BATCH] for t in data) for i in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        calls = profile_step(model, optim, batches, args.steps)
    total = sum(c[3] for c in calls)
    peaks = [peak_rate()]
    print(f"{args.model} {'bf16' if args.bf16 else 'fp32'}, {args.threads} threads, batch {bb.BATCH}, "
          f"{cpu_instruction_set()}; best-case step {total * 1e3:.1f} ms ({bb.BATCH / total:,.0f} samples/s), "
          f"{len(calls)} aten calls; fp32 GEMM peak {peaks[0] / 1e9:.1f} GFLOP/s")
    groups: dict[str, float] = defaultdict(float)
    for name, a, _, dt in calls:
        g = group_of(name, a)
        groups["GEMM" if name in GEMMS else g] += dt
        if name in GEMMS:
            groups["  " + g] += dt
    print(f"\n{'group':58s} {'ms':>8s} {'share':>7s}")
    for g, dt in sorted(groups.items(), key=lambda kv: (not kv[0].startswith(("GEMM", "  ")), -kv[1])):
        if dt / total >= 0.003 or g == "GEMM":
            print(f"{g:58s} {dt * 1e3:8.2f} {100 * dt / total:6.1f}%")
    print(f"{'(groups under 0.3 % not listed)':58s} {total * 1e3:8.2f} 100.0%")
    others = sorted((c for c in calls if c[0] not in GEMMS), key=lambda c: -c[3])[:args.top]
    print(f"\nlargest non-GEMM calls")
    for name, a, _, dt in others:
        shapes = " ".join(str(list(x[1])) + ("" if x[2] == tuple(torch.empty(x[1]).stride()) else f"@{list(x[2])}")
                          for x in a if isinstance(x, tuple) and x and x[0] == "T")
        print(f"  {name:28s} {dt * 1e3:7.2f} ms  {shapes}")

    big = [(n, a, k, dt) for n, a, k, dt in calls if n in GEMMS and gemm_flops(n, a) >= 1e8]
    print(f"\nGEMMs of >= 0.1 GFLOP (% of the fp32 peak; layouts: A/B r = row-major, c = column-major; C / Ct = output or its transpose)")
    print(f"{'call':62s} {'GFLOP':>6s} {'in step':>8s} {'alone':>7s} {'best layout':>18s}")
    for n, a, k, dt in big:
        fl = gemm_flops(n, a)
        peak = peak_rate()
        peaks.append(peak)
        alone = replay(n, a, k, args.reps)
        lay = layouts(n, a, args.reps)
        best = min(lay, key=lay.get)
        strides = " ".join(str(x[2]) for x in a if isinstance(x, tuple) and x and x[0] == "T")
        desc = f"{n} {' x '.join(str(list(x[1])) for x in a if isinstance(x, tuple) and x and x[0] == 'T')}"
        print(f"{desc:62s} {fl / 1e9:6.2f} {100 * fl / dt / peak:7.1f}% {100 * fl / alone / peak:6.1f}% "
              f"{best:>6s} {100 * fl / lay[best] / peak:6.1f}%   strides {strides}")
    print(f"\npeak over the replays: median {statistics.median(peaks) / 1e9:.1f}, "
          f"range {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
