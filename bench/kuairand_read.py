"""Synthetic KuaiRand at a chosen scale: write the raw CSVs, read them, build the SessionLog.

Prints rows/s of each stage and the peak RSS. Plain script, not a test:

    python bench/kuairand_read.py --users 20000 --items 50000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from rmtl.data.build import build_session_log
from rmtl.data.kuairand import read_kuairand
from rmtl.data.synth_kuairand import write_kuairand


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kuairand"
        t0 = time.perf_counter()
        files = write_kuairand(out, users=args.users, items=args.items, seed=args.seed)
        t1 = time.perf_counter()
        raw = read_kuairand(out, include_random=True)
        t2 = time.perf_counter()
        log, summary = build_session_log(raw, session_gap=1800.0, split_ratios=(0.6, 0.2, 0.2),
                                         split_order=None, min_count=1, seed=0)
        t3 = time.perf_counter()
        mb = sum(p.stat().st_size for p in files.values()) / 2**20
    n = raw.events_read
    print(f"synthetic KuaiRand: {args.users} users, {args.items} videos, {n:,} log rows, {mb:.0f} MB of CSV")
    print(f"write_kuairand     {t1 - t0:7.2f} s  {n / (t1 - t0):>12,.0f} rows/s")
    print(f"read_kuairand      {t2 - t1:7.2f} s  {n / (t2 - t1):>12,.0f} rows/s")
    print(f"build_session_log  {t3 - t2:7.2f} s  {n / (t3 - t2):>12,.0f} rows/s")
    print(f"read + build       {t3 - t1:7.2f} s  {n / (t3 - t1):>12,.0f} rows/s")
    print(f"sessions {log.num_sessions:,}, rows kept {log.num_rows:,}, sparse fields {log.spec.num_sparse}, dense {log.spec.num_dense}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB")


if __name__ == "__main__":
    main()
