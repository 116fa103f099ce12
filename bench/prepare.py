"""Benchmark: synthetic RetailRocket at the public scale -> raw CSV -> cached SessionLog.

    python bench/prepare.py                 # full scale: 2.75 M events, 1.4 M visitors, 235 k items, 20 M property rows
    python bench/prepare.py --scale 0.1     # a tenth of it, for a quick look

Each phase runs in a fresh Python process so its peak RSS (resource.getrusage) is its
own: (1) write the raw CSVs under /tmp, (2) rmtl.data.prepare.prepare with an empty
cache (read + build + write cache), (3) the same call again, which must hit the cache.
Prints events/s end to end, peak RSS per phase, the cached re-read time and the speed-up.
Targets on 2 cores: >= 300 k events/s, peak RSS <= 6 GB, re-read >= 10x faster.
Timings on a shared machine are noisy; run it twice before quoting a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REAL = dict(events=2_750_000, users=1_400_000, items=235_000, property_rows=20_000_000)
# Rates close to the public log (about 2.6 % of views carted, a third of carts bought,
# many repeat views); sessions_per_user / views_per_session are solved to hit `events`.
RATES = dict(cart_rate=0.03, buy_rate=0.3, repeat_rate=0.25, orphan_rate=0.02, sessions_per_user=1.2, days=137.0)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def phase_generate(out: Path, scale: float, seed: int) -> dict:
    from rmtl.data.synth_retailrocket import write_retailrocket

    users = int(REAL["users"] * scale)
    per_view = 1 + RATES["repeat_rate"] + RATES["cart_rate"] * (1 + RATES["buy_rate"])
    views_per_session = REAL["events"] * scale / (users * RATES["sessions_per_user"] * per_view)
    t0 = time.perf_counter()
    paths = write_retailrocket(out, users=users, items=int(REAL["items"] * scale), seed=seed,
                               views_per_session=max(1.0, views_per_session),
                               property_rows=int(REAL["property_rows"] * scale), **RATES)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in paths.values())
    return {"seconds": seconds, "bytes": size, "peak_rss_gb": _peak_rss_gb()}


def phase_prepare(data: Path, cache: Path) -> dict:
    try:
        from rmtl.data.prepare import prepare
    except ImportError:  # data-core's prepare() not there yet: reader + builder, no cache
        prepare = None
    from rmtl.data.build import build_session_log  # noqa: F401  (imports are not part of the timing)
    from rmtl.data.retailrocket import read_retailrocket  # noqa: F401

    t0, c0 = time.perf_counter(), time.process_time()
    if prepare is not None:
        prepared = prepare("retailrocket", data, cache_dir=cache)
        summary, from_cache = prepared.summary, prepared.from_cache
    else:
        from rmtl.data.build import build_session_log
        from rmtl.data.retailrocket import read_retailrocket

        raw = read_retailrocket(data)
        _, summary = build_session_log(raw, session_gap=1800.0)
        from_cache = False
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cpu_seconds": time.process_time() - c0, "peak_rss_gb": _peak_rss_gb(), "from_cache": from_cache,
            "events_read": summary["events_read"], "impressions": summary["impressions"], "rows": summary["rows"],
            "sessions": summary["sessions"], "dropped": summary["dropped"], "cached": prepare is not None}


def phase_read_only(data: Path) -> dict:
    """The reader alone (for the breakdown)."""
    from rmtl.data.retailrocket import read_retailrocket

    t0, c0 = time.perf_counter(), time.process_time()
    raw = read_retailrocket(data)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "peak_rss_gb": _peak_rss_gb(),
            "impressions": len(raw.frame)}


def _child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"phase {args[:2]} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the public scale (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/rmtl_bench_retailrocket", help="folder for raw files and cache (not the repo)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    data, cache = work / "raw", work / "cache"
    if args.phase == "generate":
        print(json.dumps(phase_generate(data, args.scale, args.seed)))
        return
    if args.phase == "prepare":
        print(json.dumps(phase_prepare(data, cache)))
        return
    if args.phase == "read":
        print(json.dumps(phase_read_only(data)))
        return

    shutil.rmtree(work, ignore_errors=True)
    try:
        common = ["--scale", str(args.scale), "--seed", str(args.seed), "--work", str(work)]
        gen = _child("--phase", "generate", *common)
        print(f"generate : {gen['seconds']:.1f} s, {gen['bytes'] / 1e6:.0f} MB of CSV, peak RSS {gen['peak_rss_gb']:.2f} GB")
        read = _child("--phase", "read", *common)
        print(f"reader   : {read['seconds']:.1f} s ({read['cpu_seconds']:.1f} CPU s) for {read['impressions']:,} impressions, peak RSS {read['peak_rss_gb']:.2f} GB")
        first = _child("--phase", "prepare", *common)
        rate = first["events_read"] / first["seconds"]
        print(f"prepare  : {first['events_read']:,} events -> {first['rows']:,} rows in {first['sessions']:,} sessions "
              f"in {first['seconds']:.1f} s = {rate / 1e3:.0f} k events/s end to end (target >= 300 k), "
              f"peak RSS {first['peak_rss_gb']:.2f} GB (target <= 6)")
        print(f"           {first['cpu_seconds']:.1f} CPU s (all threads) = {first['events_read'] / first['cpu_seconds'] / 1e3:.0f} k events "
              f"per CPU-second; wall/CPU {first['seconds'] / first['cpu_seconds']:.2f} (< 1: threads overlapped; > 1: waiting "
              f"for a busy core); load average {os.getloadavg()[0]:.1f}")
        print(f"dropped  : {json.dumps(first['dropped'])}")
        if first["cached"]:
            again = _child("--phase", "prepare", *common)
            speedup = first["seconds"] / again["seconds"]
            print(f"re-read  : {again['seconds']:.2f} s ({again['cpu_seconds']:.2f} CPU s) from cache={again['from_cache']} -> {speedup:.1f}x faster (target >= 10x), "
                  f"peak RSS {again['peak_rss_gb']:.2f} GB")
        else:
            print("re-read  : rmtl.data.prepare not available yet; timed reader + builder only, no cache")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
