"""Training throughput of our MMoE / PLE against torch-rechub's MMOE / PLE, same config,
same run, with the CPU's instruction set, the measured fp32 GEMM peak and the share of it
each model reaches; plus a bf16-vs-fp32 quality check on a planted synthetic problem.

    python bench/backbones.py                 # full table (a few minutes on 2 cores)
    python bench/backbones.py --steps 5 --rounds 2 --quality-steps 0   # quicker

Config (issue 3): 7 sparse fields + 1 dense, embedding 128, experts (512, 256), towers
(128, 64), 8 experts (MMoE) / 4 shared + 4 specific = 2 per task (PLE, 1 level), batch 2048,
dropout 0.2, two tasks. Samples/s = forward + loss + backward + Adam step on batches
already in memory, after warm-up; the models are timed in interleaved rounds (the machine
is shared, so the median over rounds is printed). Our models train as ``rmtl train`` does
(rmtl.optim: fused Adam + row-sparse Adam for the embedding table); torch-rechub with
fused Adam. Like CPU training, the process first makes glibc keep freed memory
(rmtl.device.keep_freed_memory), which both libraries then share. "% peak" = the
step's GEMM FLOPs (counted by torch's FlopCounterMode over forward and backward) x
steps/s / the fp32 GEMM peak of the same rounds (median over rounds of the best of a
few 2048 x 1024 x 4096 products, measured before each round). bf16 rows run only where
the CPU has native bf16 (rmtl.device.native_bf16) unless --bf16 forces them.
torch-rechub needs ``pip install torch-rechub==0.9.0 --no-deps`` (the ``bench`` extra);
without it only our rows are printed. Where the step's time goes, per op and per GEMM
layout: bench/step_profile.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from rmtl.backbones import build
from rmtl.config import TrainConfig
from rmtl.data.spec import FeatureSpec
from rmtl.device import cpu_instruction_set, keep_freed_memory, native_bf16
from rmtl.optim import make_optimizer, row_sparse_gradients

FIELDS, VOCAB, EMBED, BATCH, DROPOUT = 7, 10_000, 128, 2048, 0.2
EXPERT_DIMS, TOWER_DIMS = (512, 256), (128, 64)
TASKS = ["ctr", "ctcvr"]


def make_spec() -> FeatureSpec:
    return FeatureSpec("bench", [f"f{i}" for i in range(FIELDS)], [VOCAB] * FIELDS, ["d0"], TASKS)


def ours(name: str, spec: FeatureSpec, levels: int) -> torch.nn.Module:
    common = dict(embed_dim=EMBED, dense_dim=1, expert_dims=EXPERT_DIMS, tower_dims=TOWER_DIMS, dropout=DROPOUT)
    if name == "mmoe":
        return build("mmoe", spec, num_experts=8, **common)
    return build("ple", spec, levels=levels, shared_experts=4, specific_experts=2, **common)


class RechubAdapter(torch.nn.Module):
    """torch-rechub model behind our (sparse, dense) -> logits call; it returns
    probabilities, so the loss for it is BCE on probabilities (as its trainer does)."""

    def __init__(self, name: str, levels: int):
        super().__init__()
        from torch_rechub.basic.features import DenseFeature, SparseFeature
        from torch_rechub.models.multi_task import MMOE, PLE

        self.names = [f"f{i}" for i in range(FIELDS)]
        feats = [SparseFeature(n, VOCAB, embed_dim=EMBED) for n in self.names] + [DenseFeature("d0")]
        expert = {"dims": list(EXPERT_DIMS), "dropout": DROPOUT, "activation": "relu"}
        towers = [{"dims": list(TOWER_DIMS), "dropout": DROPOUT, "activation": "relu"} for _ in TASKS]
        types = ["classification"] * len(TASKS)
        if name == "mmoe":
            self.model = MMOE(feats, types, n_expert=8, expert_params=expert, tower_params_list=towers)
        else:
            self.model = PLE(feats, types, n_level=levels, n_expert_specific=2, n_expert_shared=4,
                             expert_params=expert, tower_params_list=towers)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = {n: sparse[:, i] for i, n in enumerate(self.names)}
        x["d0"] = dense[:, 0]
        return self.model(x)


def adam(model: torch.nn.Module):
    """Adam with the fused kernel: rmtl's training optimiser (row-sparse tables) for our
    models, torch's fused Adam for torch-rechub's."""
    if isinstance(model, RechubAdapter):
        return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    return make_optimizer(TrainConfig(lr=1e-3), model, torch.nn.Module())


def gemm_peak(n: int = 2048, k: int = 1024, m: int = 4096, reps: int = 8) -> float:
    """Best fp32 GEMM rate (FLOP/s) of torch.mm on this machine, measured now."""
    a, b = torch.randn(n, k), torch.randn(k, m)
    out = torch.empty(n, m)
    torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2 * n * k * m / (time.perf_counter() - t0))
    return best


def step_flops(model: torch.nn.Module, probs_out: bool) -> int:
    """GEMM FLOPs of one forward + backward on a batch (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    sparse, dense, labels = planted(BATCH, seed=3)
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss_of(model, probs_out, sparse, dense, labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def loss_of(model: torch.nn.Module, probs_out: bool, sparse, dense, labels) -> torch.Tensor:
    out = model(sparse, dense)
    if probs_out:
        return F.binary_cross_entropy(out.float(), labels)
    return F.binary_cross_entropy_with_logits(out.float(), labels)


def planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids whose hidden per-id factors determine two correlated labels."""
    g = np.random.default_rng(seed)
    sparse = g.integers(1, VOCAB, size=(n, FIELDS))
    factors = np.random.default_rng(1234).normal(size=(FIELDS, VOCAB, 2)) * 0.6
    dense = g.normal(size=(n, 1)).astype(np.float32)
    z = factors[np.arange(FIELDS), sparse].sum(1) + 0.5 * dense  # [n, 2]
    click = g.random(n) < 1 / (1 + np.exp(-(z[:, 0] - 0.5)))
    conv = click & (g.random(n) < 1 / (1 + np.exp(-(z[:, 1] - 1.0))))
    labels = np.stack([click, conv], 1).astype(np.float32)
    return torch.from_numpy(sparse), torch.from_numpy(dense), torch.from_numpy(labels)


def throughput(models: dict, steps: int, rounds: int, bf16: bool) -> tuple[dict[str, float], float]:
    """(median samples/s per model, median fp32 GEMM peak measured between the rounds).
    The peak is re-measured in every round, interleaved with the models, so on a shared
    machine the % of peak compares with what the cores gave in the same minutes."""
    spec_data = planted(BATCH * 4, seed=0)
    batches = [tuple(t[i * BATCH:(i + 1) * BATCH] for t in spec_data) for i in range(4)]
    optims = {k: adam(m) for k, (m, _) in models.items()}

    def run(key: str, n: int) -> float:
        model, probs = models[key]
        model.train()
        t0 = time.perf_counter()
        with row_sparse_gradients(model):  # as the Trainer does (a no-op for torch-rechub's modules)
            for s in range(n):
                sparse, dense, labels = batches[s % len(batches)]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_of(model, probs, sparse, dense, labels)
                optims[key].zero_grad(set_to_none=True)
                loss.backward()
                optims[key].step()
        return time.perf_counter() - t0

    for key in models:  # warm-up
        run(key, 2)
    rates: dict[str, list[float]] = {k: [] for k in models}
    peaks = []
    for _ in range(rounds):
        peaks.append(gemm_peak(reps=4))
        for key in models:
            rates[key].append(steps * BATCH / run(key, steps))
    return {k: statistics.median(v) for k, v in rates.items()}, statistics.median(peaks)


def quality(name: str, steps: int, levels: int, batch: int = BATCH, seed: int = 0) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    train = planted(batch * steps, seed=1)
    val = planted(20_000, seed=2)
    out = {}
    for bf16 in (False, True):
        torch.manual_seed(seed)
        model = ours(name, make_spec(), levels)
        optim = adam(model)
        model.train()
        for s in range(steps):  # dense embedding gradients here: RowSparseAdam takes them too
            sl = slice(s * batch, (s + 1) * batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(model, False, train[0][sl], train[1][sl], train[2][sl])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            probs = torch.sigmoid(model(val[0], val[1]).float()).numpy()
        y = val[2].numpy()
        out["bf16" if bf16 else "fp32"] = [roc_auc_score(y[:, k], probs[:, k]) for k in range(len(TASKS))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round and model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", type=int, default=1, help="PLE extraction levels (both libraries)")
    ap.add_argument("--quality-steps", type=int, default=150, help="training steps of the bf16/fp32 check (0 = skip)")
    ap.add_argument("--quality-batch", type=int, default=BATCH, help="batch size of the bf16/fp32 check")
    ap.add_argument("--models", default="mmoe,ple")
    ap.add_argument("--no-rechub", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="time bf16 autocast even without native bf16")
    args = ap.parse_args()
    torch.manual_seed(0)
    memory = keep_freed_memory()  # as CPU training does (rmtl.device); the same for both libraries
    peak = gemm_peak()
    has_bf16, why = native_bf16(torch.device("cpu"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; CPU instruction set {cpu_instruction_set()}; "
          f"fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s (measured now; each row uses the peak of its own rounds); batch {BATCH}; timings are noisy on a "
          f"shared machine (median of rounds; ratios within this run are what compare); {memory}", flush=True)
    try:
        import torch_rechub  # noqa: F401

        have_rechub = not args.no_rechub
    except ImportError:
        have_rechub = False
        print("torch-rechub not installed: pip install torch-rechub==0.9.0 --no-deps")
    precisions = [False] + ([True] if has_bf16 or args.bf16 else [])
    if not has_bf16 and not args.bf16:
        print(f"bf16 rows skipped: {why} (--bf16 times them anyway)")
    spec = make_spec()
    for name in args.models.split(","):
        models = {f"rmtl {name}": (ours(name, spec, args.levels), False)}
        if have_rechub:
            models[f"torch-rechub {name}"] = (RechubAdapter(name, args.levels), True)
        flops = {k: step_flops(m, probs) for k, (m, probs) in models.items()}
        for bf16 in precisions:
            rates, round_peak = throughput(models, args.steps, args.rounds, bf16)
            tag = "bf16" if bf16 else "fp32"
            row = "  ".join(f"{k}: {v:7.0f}/s ({100 * flops[k] * v / BATCH / round_peak:4.1f}% peak)"
                            for k, v in rates.items())
            ratio = ""
            if have_rechub:
                ratio = f"  ratio {rates[f'rmtl {name}'] / rates[f'torch-rechub {name}']:.2f}x"
            print(f"{name:5s} {tag}  {row}{ratio}  [peak in these rounds {round_peak / 1e9:.1f} GFLOP/s; "
                  f"{flops[f'rmtl {name}'] / BATCH / 1e6:.1f} MFLOP per sample]", flush=True)
    if args.quality_steps > 0 and not (has_bf16 or args.bf16):
        print("bf16-vs-fp32 quality check skipped: no native bf16 here (--bf16 runs it anyway)")
    elif args.quality_steps > 0:
        for name in args.models.split(","):
            q = quality(name, args.quality_steps, args.levels, args.quality_batch)
            diff = [b - f for f, b in zip(q["fp32"], q["bf16"])]
            print(f"{name:5s} val AUC ({args.quality_steps} steps x {args.quality_batch}) fp32 "
                  + " ".join(f"{t}={a:.4f}" for t, a in zip(TASKS, q["fp32"]))
                  + "  bf16 " + " ".join(f"{t}={a:.4f}" for t, a in zip(TASKS, q["bf16"]))
                  + "  diff " + " ".join(f"{d:+.4f}" for d in diff), flush=True)


if __name__ == "__main__":
    main()
