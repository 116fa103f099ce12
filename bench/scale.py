"""Benchmark: data-parallel training throughput with 1 and 2 processes (rmtl.distributed).

    python bench/scale.py                    # MMoE on the synthetic RetailRocket default
    python bench/scale.py --steps 30 --batch 2048

Each configuration trains the same model on the same global batches: 1 process (with
``--threads`` intra-op threads) and N gloo processes spawned with torch.multiprocessing
(each with threads / N, so all of them share the same cores). Samples/s = global rows
per second over the timed steps (after --warmup steps), timed on rank 0 between
``on_step_end`` calls, so it covers forward, backward, the gradient all-reduce and the
optimiser step, not validation. On one 2-core machine two processes can only show the
cost of the all-reduce and of splitting a batch, not a gain: the point of DDP is more
machines / GPUs. The machine may be shared: timings are noisy, compare within one run.

The out-of-core prepare figures of issue 13 (peak RSS and events/s of sharded prepare
on 10 M - 100 M synthetic KuaiRand rows) are NOT measured here: that prepare does not
exist yet (docs/distributed.md says so).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rmtl.callbacks import Callback
from rmtl.config import load_config


class StepClock(Callback):
    """Wall time of every step end (rank 0 reads them)."""

    name = "step_clock"

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, trainer, step):
        self.times.append(time.perf_counter())


def _cfg(args, run_dir: str, threads: int):
    return load_config("quickstart", [
        f"train.max_steps={args.warmup + args.steps}", f"train.batch_size={args.batch}", "train.eval_every=100000",
        "train.progress=false", f"train.num_threads={threads}", "train.log_every=100000", f"run_dir={run_dir}",
        "model.options.embed_dim=32", "model.options.expert_dims=[256,128]", "model.options.num_experts=8",
        "train.epochs=1000", "train.patience=null"])


def run(args, run_dir: str, threads: int) -> float:
    from rmtl.train import fit, load_data

    cfg = _cfg(args, run_dir, threads)
    clock = StepClock()
    fit(cfg, prepared=load_data(cfg.data, cfg.seed), callbacks=[clock])
    t = clock.times[args.warmup - 1:]
    return args.batch * (len(t) - 1) / (t[-1] - t[0])


def _worker(rank: int, world: int, init_file: str, args, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rate = run(args, str(Path(out) / f"ddp{world}"), max(args.threads // world, 1))
        if rank == 0:
            Path(out, f"rate{world}").write_text(str(rate))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2048, help="global batch size")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in total per configuration")
    ap.add_argument("--procs", default="1,2", help="process counts to time")
    args = ap.parse_args()
    # the cached synthetic default is built once, before any timing
    from rmtl.train import load_data

    load_data(_cfg(args, "/tmp/unused", 1).data, 0)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {args.threads} threads per configuration; "
          f"MMoE on the synthetic RetailRocket default, global batch {args.batch}, {args.steps} timed steps; "
          "the machine may be shared: noisy, compare within this run", flush=True)
    with tempfile.TemporaryDirectory(prefix="rmtl-scale-") as tmp:
        for n in (int(x) for x in args.procs.split(",")):
            if n == 1:  # also 1 thread: a 2-thread process suffers most from busy cores (OpenMP barriers)
                for threads in sorted({args.threads, max(args.threads // 2, 1)}, reverse=True):
                    rate = run(args, str(Path(tmp) / f"single{threads}"), threads)
                    print(f"1 process x {threads} thread(s): {rate:8.0f} samples/s", flush=True)
                continue
            mp.spawn(_worker, args=(n, str(Path(tmp) / f"init{n}"), args, tmp), nprocs=n, join=True)
            rate = float(Path(tmp, f"rate{n}").read_text())
            print(f"DDP {n} processes x {max(args.threads // n, 1)} thread(s): {rate:8.0f} samples/s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
