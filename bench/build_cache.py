"""Benchmark: the data core alone (no CSV parsing) -- build_session_log, cache save, cache load.

    python bench/build_cache.py              # 3 M impressions, 1.4 M users, 235 k items
    python bench/build_cache.py --rows 300000

A RetailRocket-shaped RawEvents frame (six sparse fields, one of them strings, two dense
with missing values, two tasks) is made in memory, then built (sessions cut by the
30-minute gap), saved to a Parquet cache entry (rows + vocabularies) and loaded back. Prints seconds, rows/s
and peak RSS. Timings on a shared 2-core machine are noisy: run twice before quoting.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rmtl.data import cache
from rmtl.data.build import build_session_log
from rmtl.data.raw import RawEvents


def make_raw(rows: int, users: int, items: int, seed: int = 0) -> RawEvents:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, rows)
    item = rng.integers(0, items, rows)
    # each user's events clustered in a few bursts over 137 days, so the gap cut matters
    burst = rng.integers(0, 3, rows)
    t0 = 1_430_000_000_000
    time_ms = t0 + (user * 7919 + burst * 86_400_007) % (137 * 86_400_000) + rng.integers(0, 1_200_000, rows)
    frame = pd.DataFrame({
        "user": user, "item": item, "time": time_ms,
        "itemid": item, "categoryid": item % 1_242, "parentid": item % 362,
        "available": rng.integers(0, 2, rows).astype(float),
        "brand": pd.array(rng.choice([f"n{i}" for i in range(5_000)], rows), dtype="str"),
        "property_x": rng.integers(0, 100_000, rows),
        "price": rng.lognormal(3, 1, rows),
        "stock": np.where(rng.random(rows) < 0.1, np.nan, rng.normal(size=rows)),
        "ctr": (rng.random(rows) < 0.05).astype(np.int8),
        "ctcvr": (rng.random(rows) < 0.015).astype(np.int8),
    })
    return RawEvents(frame, ["itemid", "categoryid", "parentid", "available", "brand", "property_x"],
                     ["price", "stock"], ["ctr", "ctcvr"], "retailrocket", rows, item_field="itemid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--users", type=int, default=1_400_000)
    ap.add_argument("--items", type=int, default=235_000)
    args = ap.parse_args()
    raw = make_raw(args.rows, args.users, args.items)
    tmp = Path(tempfile.mkdtemp(prefix="rmtl-bench-cache-"))
    try:
        t, c = time.perf_counter(), time.process_time()
        vocab: dict = {}
        log, summary = build_session_log(raw, session_gap=1800.0, vocab_out=vocab)
        build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        entry = cache.save(tmp / "entry", log, summary, vocab=vocab)
        save_s, save_cpu = time.perf_counter() - t, time.process_time() - c
        size = sum(f.stat().st_size for f in entry.iterdir())
        t, c = time.perf_counter(), time.process_time()
        cache.load(entry)
        load_s, load_cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"impressions in       {args.rows:,}")
    print(f"rows / sessions out  {log.num_rows:,} / {log.num_sessions:,}")
    print(f"build                {build_s:6.2f} s wall {build_cpu:6.2f} s CPU   {args.rows / build_s / 1e6:5.2f} M rows/s")
    print(f"cache save           {save_s:6.2f} s wall {save_cpu:6.2f} s CPU   ({size / 2**20:.0f} MiB)")
    print(f"cache load           {load_s:6.2f} s wall {load_cpu:6.2f} s CPU   {log.num_rows / load_s / 1e6:5.2f} M rows/s")
    print(f"build+save / load    {(build_s + save_s) / load_s:6.1f} x wall")
    print(f"load average         {os.getloadavg()[0]:6.1f} (2 cores; above 2 the wall times wait for a core)")
    print(f"peak RSS             {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:6.2f} GB")


if __name__ == "__main__":
    main()
