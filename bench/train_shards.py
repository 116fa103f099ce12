"""Benchmark: training from a sharded prepare (streamed) vs from the in-memory SessionLog.

    python bench/train_shards.py                       # 30,000 users (~1.3 M rows), 8 shards
    python bench/train_shards.py --users 4000 --steps 20 --repeats 1   # a quick run

A synthetic KuaiRand release is written and prepared with ``prepare_sharded`` once (kept in
--workdir, not timed). Then each mode trains the same model (the quickstart MMoE, 1
process, --threads intra-op threads) in a FRESH child process, so its peak RSS
(``ru_maxrss``) is its own:

- ``memory``: ``fit(cfg, prepared=load_log(entry))``: the whole log in memory, the
  in-memory BatchIterator;
- ``shards``: ``fit(cfg with data.shards=entry)``: train rows streamed from the shards
  (rmtl.data.shard_stream, ``--buffer`` rows shuffled together), val / test rows read
  row group by row group at each evaluation.

Samples/s = train rows per second between step ends after --warmup steps (forward,
backward, optimiser step and, for shards, the Parquet reads and the shuffle; not
validation). Peak RSS covers the whole child (imports, data, training, the final val /
test evaluation). Modes alternate --repeats times; the machine may be shared, so compare
within one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from rmtl.callbacks import Callback


class StepTimes(Callback):
    name = "step_times"

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, trainer, step):
        self.times.append(time.perf_counter())


def child(args) -> None:
    import torch

    from rmtl.config import load_config
    from rmtl.data.shards import load_log
    from rmtl.train import fit

    torch.set_num_threads(args.threads)
    overrides = [f"train.batch_size={args.batch}", f"train.max_steps={args.warmup + args.steps}",
                 "train.eval_every=null", "train.patience=null", "train.progress=false",
                 f"train.num_threads={args.threads}", f"run_dir={args.workdir}/runs/{args.child}",
                 f"data.shard_buffer_rows={args.buffer}"]
    clock = StepTimes()
    if args.child == "shards":
        cfg = load_config("quickstart", overrides + [f"data.shards={args.entry}"])
        fit(cfg, callbacks=[clock])
    else:
        cfg = load_config("quickstart", overrides)
        fit(cfg, prepared=load_log(args.entry), callbacks=[clock])
    timed = clock.times[args.warmup:]
    rate = (len(timed) - 1) * args.batch / (timed[-1] - timed[0])
    print(json.dumps({"mode": args.child, "samples_per_s": rate,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=30_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--buffer", type=int, default=1 << 18)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/rmtl-bench-train-shards")
    ap.add_argument("--child", choices=["memory", "shards"], help=argparse.SUPPRESS)
    ap.add_argument("--entry", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from rmtl.data.shards import prepare_sharded
    from rmtl.data.synth_kuairand import write_kuairand

    work = Path(args.workdir)
    raw = work / f"kr-{args.users}"
    if not (raw / "done").exists():
        raw.mkdir(parents=True, exist_ok=True)
        write_kuairand(raw, users=args.users, items=max(2000, args.users // 5), seed=0)
        (raw / "done").write_text("")
    sp = prepare_sharded(raw, shards=args.shards, cache_dir=work / "cache", workers=1)
    train_rows = sum(s["rows_by_split"]["train"] for s in sp.meta["shards"])
    print(f"{sp.meta['num_rows']:,} rows ({train_rows:,} train), {len(sp.meta['shards'])} shards, "
          f"batch {args.batch}, {args.steps} timed steps after {args.warmup}, {args.threads} thread(s), "
          f"buffer {args.buffer:,} rows", flush=True)
    results: dict[str, list] = {"memory": [], "shards": []}
    for _ in range(args.repeats):
        for mode in results:
            cmd = [sys.executable, __file__, "--child", mode, "--entry", str(sp.path)] + [
                f"--{k}={getattr(args, k)}" for k in ("batch", "steps", "warmup", "threads", "buffer", "workdir")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            got = json.loads(out)
            results[mode].append(got)
            print(f"{mode:7s} {got['samples_per_s']:10,.0f} samples/s   peak RSS {got['peak_rss_mb']:8,.0f} MB",
                  flush=True)


if __name__ == "__main__":
    main()
