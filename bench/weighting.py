"""Cost of each weighting strategy per training step (forward + strategy.backward + Adam).

Plain script, prints figures:  python bench/weighting.py [--batch 1024] [--steps 10]

The model is an MMoE from the backbone registry on random data (7 sparse fields + 1
dense, 2 tasks). Gradient methods are timed on the shared representation (the default
where the backbone gives a cut) and on the shared parameters. Timings on a shared
machine are noisy: compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rmtl.backbones import build
from rmtl.data.spec import FeatureSpec
from rmtl.weighting import build_strategy

LOSS_LEVEL = ["ew", "uw", "dwa", "gradnorm", "rlw"]
GRADIENT = ["pcgrad", "gradvac", "cagrad", "mgda", "imtl", "nash_mtl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU time is not inflated by idle worker threads spinning)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cards = [1000, 5000, 50, 20, 10, 100, 30]
    spec = FeatureSpec(source="bench", sparse_fields=[f"f{i}" for i in range(7)], cardinalities=cards,
                       dense_fields=["d0"], tasks=["ctr", "ctcvr"])
    options = dict(embed_dim=16, num_experts=4, expert_dims=(256, 128), tower_dims=(64,))
    sparse = torch.stack([torch.randint(0, c, (args.batch,)) for c in cards], 1)
    dense = torch.randn(args.batch, 1)
    labels = (torch.rand(args.batch, 2) < torch.tensor([0.3, 0.05])).float()

    configs = [(name, {}) for name in LOSS_LEVEL] + [
        (name, {"on": on}) for name in GRADIENT for on in ("representation", "parameters")]
    runs = []
    for name, strategy_options in configs:
        torch.manual_seed(0)
        model = build("mmoe", spec, **options)
        strategy = build_strategy(name, 2, **strategy_options)
        optimizer = torch.optim.Adam(list(model.parameters()) + list(strategy.parameters()), lr=1e-3)
        runs.append((name, strategy_options.get("on", "-"), model, strategy, optimizer, [], []))

    def one_step(model, strategy, optimizer, step: int) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        logits, shared = model.forward_with_shared(sparse, dense)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        strategy.backward(losses, model, shared=shared, context={"step": step})
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - start_cpu

    # FLOPs of one step (matrix products, forward + backward): a load-independent cost figure
    flops = []
    for name, on, model, strategy, optimizer, times, cpu_times in runs:
        with FlopCounterMode(display=False) as counter:
            one_step(model, strategy, optimizer, 0)
        flops.append(counter.get_total_flops())

    # interleave the strategies round by round so load from other processes hits all alike;
    # report the fastest step of each (the least disturbed one)
    for step in range(args.warmup + args.steps):
        for name, on, model, strategy, optimizer, times, cpu_times in runs:
            elapsed, cpu = one_step(model, strategy, optimizer, step)
            if step >= args.warmup:
                times.append(elapsed)
                cpu_times.append(cpu)
    print(f"MMoE {options}, batch {args.batch}, fastest of {args.steps} interleaved steps, "
          f"torch threads {torch.get_num_threads()}")
    base, base_cpu = min(runs[0][5]), min(runs[0][6])
    print("wall = fastest wall-clock step; cpu = fastest step in process CPU time (all threads), which other")
    print("processes on a shared machine disturb less than wall time")
    print(f"{'strategy':<10} {'on':<15} {'GFLOP/step':>10} {'x EW':>6} {'wall ms':>8} {'x EW':>6} {'cpu ms':>8} {'x EW':>6}")
    for (name, on, _, _, _, times, cpu_times), f in zip(runs, flops):
        best, best_cpu = min(times), min(cpu_times)
        print(f"{name:<10} {on:<15} {f / 1e9:>10.2f} {f / flops[0]:>6.2f} {1000 * best:>8.1f} {best / base:>6.2f} "
              f"{1000 * best_cpu:>8.1f} {best_cpu / base_cpu:>6.2f}")


if __name__ == "__main__":
    main()
