"""Benchmark: out-of-core prepare (peak memory, events/s) and data-parallel training throughput.

    python bench/scale.py                    # prepare 10 M, 50 M, 100 M rows; then DDP 1 and 2 processes
    python bench/scale.py --sizes 1M --procs 1,2 --steps 10   # a quick run
    python bench/scale.py --sizes none --steps 30 --batch 2048  # DDP only

**Prepare.** For each size a synthetic KuaiRand log of about that many rows is written
first (chunked: ``write_kuairand(users_per_chunk=...)``, in a child process; kept in
``--workdir`` and reused by later runs; not timed), then ``prepare_sharded`` runs in a
FRESH child process (with its forked shard workers), so its peak memory is its own: the sum
of the PSS of that process tree, sampled every 50 ms (PSS counts a page the workers share
with their parent once; ``ru_maxrss`` of the main process and of the largest worker are
printed too). events/s = log rows read / prepare seconds (partition, sessions, statistics,
encode and write; not generation); CPU seconds (main + workers) give a rate the load of a
shared machine changes less. Each pass's wall and CPU seconds are printed too. The 322 M-row line extrapolates the time linearly from the
largest size and the peak memory linearly from the two largest; the growth line says how
much the peaks grew from the smallest size to the largest (flat = what the settings
bound: sessions and users are handled in buckets of a fixed size; what may still grow is
the per-video state -- this bench keeps 500,000 videos at every size).

On an idle 2-core machine the default run takes about 11 min to write the three logs
(38 s, 194 s, 446 s measured before) plus the prepares and the DDP part.

**DDP.**
Each configuration trains the same model on the same global batches: 1 process (with
``--threads`` intra-op threads) and N gloo processes spawned with torch.multiprocessing
(each with threads / N, so all of them share the same cores). Samples/s = global rows
per second over the timed steps (after --warmup steps), timed on rank 0 between
``on_step_end`` calls, so it covers forward, backward, the gradient all-reduce and the
optimiser step, not validation. On one 2-core machine two processes can only show the
cost of the all-reduce and of splitting a batch, not a gain: the point of DDP is more
machines / GPUs. The machine may be shared: timings are noisy, compare within one run.

"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
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


ROWS_PER_USER = 42.5  # measured on write_kuairand's defaults (5 sessions x 12 impressions, some users leave)
ITEMS = 500_000  # videos of every size (KuaiRand-27K: 7.6 M for 322 M rows)
USERS_PER_CHUNK = 50_000
FULL_27K_ROWS = 322_000_000


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _dataset(workdir: Path, rows: int) -> Path:
    """The synthetic release of about ``rows`` rows (written once, in a child process)."""
    out = workdir / f"kuairand-{rows}-items{ITEMS}-seed0"
    if not out.is_dir():
        subprocess.run([sys.executable, __file__, "--_generate", str(out), str(rows)], check=True)
    return out


def _generate(out: str, rows: int) -> None:
    from rmtl.data.synth_kuairand import write_kuairand

    tmp = Path(f"{out}.tmp{os.getpid()}")
    t = time.perf_counter()
    write_kuairand(tmp, users=max(int(rows / ROWS_PER_USER), 1), items=ITEMS, seed=0, users_per_chunk=USERS_PER_CHUNK)
    os.replace(tmp, out)
    print(f"  wrote {out} in {time.perf_counter() - t:.0f}s (not timed below)", flush=True)


def _prepare_child(data: str, cache_dir: str, shards: str, workers: int) -> None:
    from rmtl.data.shards import prepare_sharded

    def cpu_seconds() -> float:  # this process and its reaped workers (each pass's pool ends before its line)
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    passes, mark = [], [time.perf_counter(), cpu_seconds()]

    def progress(line: str) -> None:
        now, cpu = time.perf_counter(), cpu_seconds()
        passes.append({"pass": line.split()[0], "seconds": now - mark[0], "cpu_seconds": cpu - mark[1]})
        mark[:] = [now, cpu]
        print(f"    {line}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    sp = prepare_sharded(data, shards=shards if shards == "auto" else int(shards), cache_dir=cache_dir, workers=workers,
                         progress=progress)
    seconds = time.perf_counter() - t
    cpu = cpu_seconds()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "passes": passes, "events": sp.summary["events_read"],
                      "rows": sp.summary["rows"],
                      "shards": sp.meta["layout"]["shards"],
                      "sessions": sp.summary["sessions"],
                      # Linux: KiB; the main process, and the largest of the forked shard workers
                      "rss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))


def _tree_memory(pid: int) -> int:
    """Memory of a process and all its descendants: the sum of their PSS (proportional set
    size, /proc/PID/smaps_rollup), so the pages forked workers share with the main process
    are counted once, not once per process as a sum of RSS would."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) * 1024 for line in fh if line.startswith("Pss:"))
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except (OSError, StopIteration, ValueError):
            pass  # exited meanwhile
    return total


def _run_sampled(argv: list[str]) -> tuple[str, int]:
    """Run a child; return its stdout and the peak memory (PSS) of its process tree, sampled every 50 ms."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_memory(proc.pid))
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"prepare child failed with status {proc.returncode}")
    return out, peak


def bench_prepare(args) -> None:
    sizes = [] if args.sizes.lower() in ("", "none", "0") else [_size(x) for x in args.sizes.split(",")]
    if not sizes:
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"out-of-core prepare (rmtl.data.shards), {args.shards} shards, {args.workers} worker process(es), "
          f"{os.cpu_count()} cores; synthetic KuaiRand "
          f"logs, {ITEMS:,} videos; the machine may be shared: noisy", flush=True)
    results = []
    for rows in sizes:
        data = _dataset(workdir, rows)
        cache_dir = Path(tempfile.mkdtemp(prefix="shards-", dir=workdir))
        try:
            out, tree = _run_sampled([sys.executable, __file__, "--_prepare", str(data), str(cache_dir), str(args.shards),
                                      str(args.workers)])
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        r = json.loads(out.strip().splitlines()[-1])
        r["peak_rss"] = tree
        results.append(r)
        print(f"prepare {r['events']:>12,} events: {r['seconds']:7.1f} s  {r['events'] / r['seconds']:>10,.0f} events/s  "
              f"peak memory {tree / 2**30:5.2f} GB (PSS of the process tree; peak RSS of the main process "
              f"{r['rss_main'] / 2**30:4.2f}, of the largest worker {r['rss_worker'] / 2**30:4.2f})  {r['shards']} shards, {r['rows']:,} rows kept, {r['sessions']:,} sessions; "
              f"CPU {r['cpu_seconds']:.0f} s = {r['events'] / r['cpu_seconds']:,.0f} events per CPU-second", flush=True)
        print("    per pass: " + "; ".join(
            f"{p['pass']} {p['seconds']:.1f} s, CPU {p['cpu_seconds']:.1f} s ({r['events'] / max(p['cpu_seconds'], 1e-9):,.0f} "
            "events per CPU-s)" for p in r["passes"]), flush=True)
        if not args.keep_data:
            shutil.rmtree(data, ignore_errors=True)
    big = results[-1]
    if len(results) > 1:
        small = results[0]
        grow = {k: big[k] - small[k] for k in ("peak_rss", "rss_main", "rss_worker")}
        print(f"growth {small['events']:,} -> {big['events']:,} events: peak memory of the tree "
              f"{grow['peak_rss'] / 2**30:+.2f} GB ({grow['peak_rss'] / (big['events'] - small['events']):+.1f} B per event), "
              f"main process {grow['rss_main'] / 2**30:+.2f} GB, largest worker {grow['rss_worker'] / 2**30:+.2f} GB",
              flush=True)
    rate = big["events"] / big["seconds"]
    if len(results) > 1:
        a = results[-2]
        slope = (big["peak_rss"] - a["peak_rss"]) / (big["events"] - a["events"])
    else:
        slope = 0.0
    peak = big["peak_rss"] + slope * (FULL_27K_ROWS - big["events"])
    print(f"extrapolated to {FULL_27K_ROWS:,} events (KuaiRand-27K): {FULL_27K_ROWS / rate / 60:5.1f} min at "
          f"{rate:,.0f} events/s, peak memory {peak / 2**30:5.2f} GB (+{slope:.1f} B per event from the last two sizes)",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2048, help="global batch size")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in total per configuration")
    ap.add_argument("--procs", default="1,2", help="process counts to time ('none': skip the DDP part)")
    ap.add_argument("--sizes", default="10M,50M,100M", help="log sizes for the prepare part ('none': skip it)")
    ap.add_argument("--shards", default="auto", help="shards of the prepare part: a number or 'auto' (default: one per "
                                                       "128 MB of log, so every size has shards of the same rows)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the prepare part")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rmtl-scale"),
                    help="where the synthetic logs and the shards go (needs ~75 B per row for the logs)")
    ap.add_argument("--keep-data", action="store_true", help="keep the synthetic logs for the next run")
    if len(sys.argv) > 1 and sys.argv[1] == "--_generate":
        return _generate(sys.argv[2], int(sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "--_prepare":
        return _prepare_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    args = ap.parse_args()
    bench_prepare(args)
    if args.procs.lower() in ("", "none", "0"):
        return
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
