"""Out-of-core prepare of KuaiRand logs: user-partitioned Parquet shards.

    from rmtl.data.shards import prepare_sharded
    sp = prepare_sharded("/data/KuaiRand-27K/data", shards=64)
    sp.shard_files()        # shard-00000.parquet ... one per shard, rows in log order
    sp.load_log()           # all shards as ONE SessionLog (small data / tests only)

The same SessionLog as ``prepare("kuairand", dir)`` builds in memory, written as shards
(docs/shards.md), while memory stays bounded by one CSV block plus one shard per worker and
one bucket of sessions / of users in the main process (nothing there is held per user):

1. **Partition** (one streamed pass over the raw log, ``kuairand.iter_log``; with several
   workers each plain-text file is cut into byte ranges at line starts, ``csv_ranges``,
   parsed in parallel): every validated block is cut by ``splitmix64(user_id) % shards``
   and appended to that shard's raw part file, with ``pos``, the row's index in the one
   reader's row order. The user side file is cut the same way (``side_shards``); the video
   side file (videos cross shards) is spilled in buckets of video ids (``video_buckets``).
2. **Sessions per shard**: a user's events all live in one shard, so duplicate removal, the
   reader's per-row frame (``kuairand.events_frame``), the session cut and the short-session
   drop are the in-memory ones applied to the shard. Each kept session leaves its key on
   disk: (start time, the ``pos`` of its user's first row -- or of its own first row for
   ``sessions=user_day`` -- and its rank inside the shard). Sorting these keys globally
   gives the builder's session order exactly (its tie-break is the session id, which
   follows the user's first appearance); the main process sorts them one start-time
   bucket of SESSION_BUCKET sessions at a time; the 6:2:2 cut is then the builder's own
   (``build._split_bounds``).
3. **Merged statistics**: per sparse field, each value's first ``pos`` (over all rows, as
   the builder's factorize sees them) and its train count, folded by min / sum across
   shards -- the vocabulary index order is that first appearance, exactly; dense mean /
   std from per-shard (count, mean, M2) merged by Chan's formula (float tolerance); the
   user / item codes from each one's first row in the final log order. The user field's
   tables stay beside their shard; the video field's are cut by VIDEO_BUCKET buckets of
   video ids and merged one bucket at a time; both fields' vocabularies and codes are
   ranked one key range of RANK_BUCKET rows at a time (one code path).
4. **Encode** each shard and write it in log order.

Everything lands in a temporary folder beside the entry, renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmtl.data import cache, csv_ranges, side_shards, video_buckets
from rmtl.data import kuairand as kr
from rmtl.data.build import (FIRST_VALUE_INDEX, MISSING_INDEX, RARE_INDEX, _kept_warnings, _split_bounds,
                             check_split_order)
from rmtl.data.sessionlog import SPLITS, SessionLog
from rmtl.data.sessions import assign_sessions, group_time_order
from rmtl.data.spec import FeatureSpec
from rmtl.errors import ConfigError, DataError

DEFAULT_SHARDS = "auto"  # the one default of the shard count (API; the CLI's --shards names it)
# "auto": one shard per this many bytes of raw log (~1.8 M rows of the published columns), so a
# shard's rows -- hence a worker's memory -- stay the same whatever the log's size. A .gz
# log counts GZ_RATIO times its size (KuaiRand's logs compress about that much).
AUTO_SHARD_BYTES = 128 << 20
GZ_RATIO = 5
MAX_SHARDS = 4096  # one open Parquet writer per shard during pass 1
SHARD_FORMAT = 1
SOURCE = "kuairand"
ENTRY_PREFIX = "kuairand-shards"
SHARD_NAME = "shard-{:05d}.parquet"
# The streamed CSV pass reads 4 MB blocks: arrow's streaming reader holds far more than a
# block (measured on a 1 GB log: peak 0.3 GB with 4 MB blocks, 0.76 GB with 16 MB, 2 GB with
# 64 MB) and 4 MB blocks parse fastest; blocks are gathered to PARTITION_ROWS rows before the
# shard split so a shard file gets row groups of a useful size.
STREAM_BLOCK_BYTES = 4 << 20
PARTITION_ROWS = 1 << 20
# Pass 1 with several workers cuts a plain-text log into byte ranges of about this size
# (at least one per worker), parsed in parallel: one part file per (range, shard).
PARTITION_RANGE_BYTES = 512 << 20
ROW_GROUP = 1 << 16  # rows per Parquet row group of an output shard: the unit a lazy reader loads
FOLD_ROWS = 1 << 20  # fold the per-shard partial tables once this many rows pile up
# The global session order (time split) is built one start-time bucket of about this many
# sessions at a time: ~60 B per session of it in the main process (keys, sort, rank, first
# row), not every session of the log. Bucket edges come from a sample of SAMPLE_SESSIONS.
SESSION_BUCKET = 1 << 22
SAMPLE_SESSIONS = 1 << 20
# The user field's per-user tables (first pos, train count, first row; the vocabulary index
# and user code made from them) stay beside each user's shard on disk; the vocabulary's
# order and the user codes are ranked one key range of RANK_BUCKET rows at a time (a range
# of rows holds at most that many users' first rows), so the main process never holds
# every user. The vocabularies are written VOCAB_WRITE_ROWS values at a time.
USER_FIELD = "user_id"
RANK_BUCKET = 1 << 22
VOCAB_WRITE_ROWS = 1 << 18  # ~180 B per value while converted to text: ~47 MB a write
USER_VOCAB_FILE = "user-vocab.arrow"
# The video field's tables (first pos, train count, first row) are the same, but a video's
# rows cross shards: each shard writes its videos' partial tables cut by the VIDEO_BUCKET
# buckets of video ids, merged one bucket at a time (a worker each), then ranked as the
# user field's, RANK_BUCKET rows at a time. The main process holds no per-video table.
VIDEO_FIELD = "video_id"
VOCAB_FILES = {"users": USER_VOCAB_FILE, "videos": "video-vocab.arrow"}
FIELD_KIND = {USER_FIELD: "users", VIDEO_FIELD: "videos"}
# The video side file is spilled in buckets of at most VIDEO_BUCKET of the video ids seen
# (rmtl/data/video_buckets.py): a worker holds one bucket at a time, the main process none.
VIDEO_BUCKET = 1 << 20
# The passes' own files (raw parts, mid) are read once or twice and deleted: Arrow IPC files,
# uncompressed (about 5x faster to write and 20x faster to read than plain Parquet).
DAY_REF = 19_000  # days since 1970 subtracted before the date-correlation sums (fewer lost digits)


@dataclass
class ShardedPrepared:
    path: Path  # the entry folder: meta.json, vocab.parquet, shard-*.parquet
    meta: dict
    from_cache: bool

    @property
    def summary(self) -> dict:
        return self.meta["summary"]

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec.from_dict(self.meta["spec"])

    def shard_files(self) -> list[Path]:
        return [self.path / s["file"] for s in self.meta["shards"]]

    def load_log(self) -> SessionLog:
        return load_log(self.path)

    @property
    def vocabularies(self) -> dict:
        return cache.load_vocabularies(self.path)


def check_shards(shards) -> int | str:
    if shards == "auto":
        return shards
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or not 1 <= shards <= MAX_SHARDS:
        raise ConfigError(f"expected 'auto' or a whole number of shards in 1..{MAX_SHARDS}, got {shards!r}", key="shards")
    return int(shards)


def auto_shards(log_files: list[Path]) -> int:
    """The shard count of ``shards="auto"``: one per AUTO_SHARD_BYTES of raw log."""
    size = sum(p.stat().st_size * (GZ_RATIO if p.suffix == ".gz" else 1) for p in log_files)
    return int(min(max(-(-size // AUTO_SHARD_BYTES), 1), MAX_SHARDS))


def check_workers(workers) -> int:
    if workers is None:
        return min(os.cpu_count() or 1, 4)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ConfigError(f"expected a whole number of processes >= 1, got {workers!r}", key="workers")
    return int(workers)


def shard_of(user_id: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each user id: splitmix64 of the id modulo ``shards`` (ids of a release
    are often consecutive; the mix spreads them evenly)."""
    x = np.asarray(user_id).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(shards)).astype(np.int32)


def prepare_sharded(
    data_dir: str | Path,
    *,
    shards: int | str = DEFAULT_SHARDS,
    cache_dir: str | Path | None = None,
    session_gap: float | None = 1800.0,
    split_ratios=None,
    split_order: str | None = None,
    min_count: int = 1,
    seed: int = 0,
    reader_options: dict | None = None,
    block_bytes: int | None = None,
    workers: int | None = None,
    progress=None,
) -> ShardedPrepared:
    """Build (or reuse) the sharded SessionLog of a KuaiRand release folder.

    The entry lives in the cache root (``cache_dir``, default $RMTL_CACHE) as
    ``kuairand-shards-<key>/``, keyed like prepare()'s entries plus the shard count.
    ``shards``: a number, or "auto" (one per AUTO_SHARD_BYTES of raw log: memory then does
    not grow with the log's rows, only with its sessions and distinct values).
    ``block_bytes``: CSV block size of the streamed read (default kuairand.BLOCK_BYTES).
    ``workers``: processes for the per-shard passes (default: the CPU count, at most 4);
    each holds one shard at a time, so peak memory grows with it.
    ``progress``: a callable taking one line of text (phase timings), or None.
    """
    from rmtl.data.prepare import check_options

    shards = check_shards(shards)
    options = check_options(SOURCE, session_gap=session_gap, split_ratios=split_ratios, split_order=split_order,
                            min_count=min_count, seed=seed, reader_options=reader_options)
    data_path = Path(data_dir).expanduser()
    if not data_path.exists():
        raise DataError(f"no such file or directory; expected the raw {SOURCE} files", path=data_path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache.default_root()
    # the layout settings ride in the options part of the key
    material = {"source": SOURCE, "options": {**options, "shards": shards, "shard_format": SHARD_FORMAT},
                "files": cache.fingerprint(data_path, cache.input_files(data_path, exclude=root))}
    entry = cache.entry_path(root, ENTRY_PREFIX, cache.cache_key(**material))
    if (entry / cache.META_FILE).is_file():
        meta = json.loads((entry / cache.META_FILE).read_text())
        if all((entry / s["file"]).is_file() for s in meta.get("shards", [])):
            return ShardedPrepared(entry, meta, True)
    try:
        root.mkdir(parents=True, exist_ok=True)
        cache.remove_stale_temporaries(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-p{os.getpid()}-{entry.name}-", dir=root))
    except OSError as err:
        raise DataError(f"cannot write the shards here ({err.strerror or err}); pick another with --out / "
                        "$RMTL_CACHE", path=root) from None
    try:
        os.chmod(tmp, 0o755)
        meta = _build(data_path, tmp, shards, options, block_bytes, check_workers(workers), progress or (lambda line: None))
        meta["key_material"] = material
        meta["summary"]["data_dir"] = str(data_path)
        meta["summary"]["options"] = options
        (tmp / cache.META_FILE).write_text(json.dumps(meta, indent=1, default=cache._json_default))
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / cache.META_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same entry first
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot write the shards ({err.strerror or str(err).splitlines()[0]}); nothing was written",
                        path=entry) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardedPrepared(entry, meta, False)


# ----------------------------------------------------------------------------- the passes

def _build(data_path: Path, out: Path, shards: int | str, options: dict, block_bytes, workers: int, progress) -> dict:
    reader_options = dict(options["reader_options"])
    keep_duplicates = bool(reader_options.pop("keep_duplicates", False))
    reader_options.pop("session_gap", None)
    plan = kr.plan_read(data_path, **reader_options)
    if shards == "auto":
        shards = auto_shards(plan.files["log"])
    order_kind = check_split_order(options["split_order"], SOURCE)
    raw_dir, mid_dir = out / "raw", out / "mid"
    raw_dir.mkdir()
    mid_dir.mkdir()
    clock = time.perf_counter()

    # 1. partition
    part = _partition(plan, raw_dir, shards, block_bytes, workers)
    _trim()  # the CSV blocks' buffers, before the workers fork
    progress(f"partition   {part['rows']:,} rows into {shards} shards  {time.perf_counter() - clock:.1f}s{_peak_note()}")
    clock = time.perf_counter()
    ctx = _CTX
    ctx.clear()
    # the user side file cut by shard (a worker loads its shard's users); the video side
    # file (videos cross shards) held whole, cut to the videos seen
    videos = part.pop("videos")
    side_dir = out / "side"
    side_dir.mkdir()
    user_side = (side_shards.split(plan.files["user"], plan.user_cols, lambda ids: shard_of(ids, shards),
                                   side_dir, block_bytes or STREAM_BLOCK_BYTES) if plan.user_cols else None)
    # the video side file (videos cross shards) spilled in buckets of VIDEO_BUCKET video ids,
    # cut to the videos seen; a worker keeps its shard's videos' rows
    video_side = (video_buckets.split(plan.files["video"], plan.video_cols, videos, side_dir,
                                      block_bytes or STREAM_BLOCK_BYTES, VIDEO_BUCKET)
                  if plan.video_cols else None)
    video_edges = videos[VIDEO_BUCKET::VIDEO_BUCKET]  # video bucket b: ids in [edges[b-1], edges[b])
    del videos
    _trim()
    ctx.update(plan=plan, video_side=video_side, video_edges=video_edges, user_side=user_side, side_dir=side_dir,
               raw_dir=raw_dir, parts=part.pop("parts"), shards=shards,
               mid_dir=mid_dir, out=out, session_gap=options["session_gap"], keep_duplicates=keep_duplicates,
               order_kind=order_kind, min_events=1 if plan.sessions == "gap_keep_single" else 2)

    # 2. sessions per shard
    first_pos: dict[str, _Fold] = {}
    counts, acc = [], _Acc()  # sessions kept per shard (their keys are in mid/)
    spec_fields = None
    duplicated = []  # (count, smallest) of user ids listed twice in the user side file, per shard
    for got in _map(_pass_sessions, range(shards), workers):
        if got is None or got[0] == "duplicated":
            counts.append(0)
            duplicated += [got[1]] if got is not None else []
            continue
        fields, n_sessions, firsts, shard_acc = got
        spec_fields = spec_fields or fields
        counts.append(n_sessions)
        acc.merge(shard_acc)
        for name, (values, pos) in firsts.items():
            first_pos.setdefault(name, _Fold("min")).add(values, pos)
    side_shards.duplicate_error(duplicated, plan.files["user"])
    if spec_fields is None:
        raise DataError(f"no log row belongs to the {len(plan.selected)} selected user(s); expected at least one",
                        path=plan.files["log"][0].parent, column="user_id")
    where = f"{SOURCE} events"
    if acc.kept_rows == 0:
        raise DataError(f"every session has fewer than {ctx['min_events']} events; nothing to build", path=where)
    progress(f"sessions    {acc.kept_rows:,} rows kept in {sum(counts):,} sessions  "
             f"{time.perf_counter() - clock:.1f}s{_peak_note()}")
    clock = time.perf_counter()

    # global session order and the split
    session_ptr = _global_order(mid_dir, counts, order_kind, options["seed"])  # a read-only memmap
    bounds = _split_bounds(session_ptr, tuple(options["split_ratios"]), where)
    splits = {name: (bounds[i], bounds[i + 1]) for i, name in enumerate(SPLITS)}
    n_rows, n_sessions = int(session_ptr[-1]), len(session_ptr) - 1
    del session_ptr
    sparse, dense, tasks, side_fields = spec_fields
    ctx.update(splits=splits, fields=spec_fields)
    _trim()
    present = [s for s in range(shards) if counts[s]]

    # 3. merged statistics over the train rows (the user field's tables stay per shard, on disk)
    counts = {name: _Fold("sum") for name in sparse if name not in FIELD_KIND}
    moments = {name: [0, 0.0, 0.0, 0] for name in dense}  # n, mean, M2, missing
    split_acc = {name: {"rows": 0, "users": 0, "pos": np.zeros(len(tasks))} for name in SPLITS}
    for got in _map(_pass_statistics, present, workers):
        for name in counts:
            counts[name].add(*got["counts"][name])
        for name in dense:
            if got["inf"][name]:
                raise DataError(f"{got['inf'][name]} infinite value(s); expected finite numbers or NaN",
                                path=where, column=name)
            moments[name][3] += got["missing"][name]  # the builder counts missing over all kept rows
            _merge_moments(moments[name], *got["moments"][name])
        for name in SPLITS:
            for k in ("rows", "users", "pos"):
                split_acc[name][k] = split_acc[name][k] + got["splits"][name][k]
    # the video tables merged over the shards one video bucket at a time, by the workers
    video_parts = [b for b, rows in zip(range(len(video_edges) + 1),
                                        _map(_merge_videos, list(range(len(video_edges) + 1)), workers)) if rows]
    parts_of = {"users": present, "videos": video_parts}
    vocab_luts, vocab, cards, vocab_sizes = {}, {}, [], {}
    for name in sparse:
        if name in FIELD_KIND:  # ranked bucket by bucket over the parts' tables
            frequent, rare = _user_vocabulary(mid_dir, parts_of[FIELD_KIND[name]], part["rows"], options["min_count"],
                                              FIELD_KIND[name])
            vocab[name] = None  # written from mid/ (VOCAB_FILES)
            cards.append(FIRST_VALUE_INDEX + frequent)
            vocab_sizes[name] = {"frequent": frequent, "rare": rare}
            continue
        values, first = first_pos[name].result()
        lut, series, frequent, rare = _vocabulary(name, values, first, counts[name], options["min_count"],
                                                  side_fields.get(name))
        vocab_luts[name] = (values, lut)
        vocab[name] = series
        cards.append(FIRST_VALUE_INDEX + frequent)
        vocab_sizes[name] = {"frequent": frequent, "rare": rare}
    del first_pos, counts
    dense_stats = {}
    for name, (n, mean, m2, missing) in moments.items():
        std = float(np.sqrt(m2 / n)) if n else 1.0
        dense_stats[name] = {"mean": float(mean) if n else 0.0, "std": std if std > 0 else 1.0, "missing": int(missing)}
    n_users = _user_codes(mid_dir, present, n_rows)
    n_items = _user_codes(mid_dir, video_parts, n_rows, "videos")
    encoders = {name: _encoder(vocab_luts[name], cards[j]) for j, name in enumerate(sparse) if name not in FIELD_KIND}
    ctx.update(encoders=encoders, dense_stats=dense_stats, video_parts=video_parts,
               cards={name: cards[sparse.index(name)] for name in FIELD_KIND if name in sparse})
    del vocab_luts
    _trim()
    progress(f"statistics  {len(sparse)} vocabularies, {len(dense)} dense columns  {time.perf_counter() - clock:.1f}s{_peak_note()}")
    clock = time.perf_counter()

    # 4. encode and write each shard in log order
    shard_meta = [{"file": SHARD_NAME.format(s), "shard": s, **info}
                  for s, info in zip(present, _map(_pass_encode, present, workers))]
    vocab_dtypes = _write_vocabularies(vocab, mid_dir, out / cache.VOCAB_FILE)
    shutil.rmtree(raw_dir)
    shutil.rmtree(mid_dir)
    shutil.rmtree(side_dir)
    progress(f"encode      {len(shard_meta)} shard files  {time.perf_counter() - clock:.1f}s{_peak_note()}")
    ctx.clear()

    spec = FeatureSpec(
        source=SOURCE, sparse_fields=list(sparse), cardinalities=cards, dense_fields=list(dense), tasks=list(tasks),
        user_field="user_id", item_field="video_id", author_field="author_id" if "author_id" in sparse else None,
        extra={
            "sparse_convention": {"missing_or_unseen": MISSING_INDEX, "rare": RARE_INDEX, "first_value": FIRST_VALUE_INDEX,
                                  "fitted_on": "train", "min_count": options["min_count"]},
            "train_vocab_sizes": vocab_sizes,
            "dense_stats": dense_stats,
            "split_order": order_kind,
            "split_ratios": list(options["split_ratios"]),
            "fixed_test": None,
            "session_gap": None if plan.sessions == "user_day" else options["session_gap"],
        },
    )
    summary = _summary(plan, part, acc, spec, n_rows, n_sessions, splits, split_acc, n_users,
                       n_items, 1 if plan.sessions == "gap_keep_single" else 2)
    return {
        "format": cache.FORMAT_VERSION,
        "shard_format": SHARD_FORMAT,
        "layout": {"partition": "splitmix64(user_id) % shards", "shards": shards, "row_group": ROW_GROUP},
        "spec": spec.to_dict(),
        "splits": {k: list(v) for k, v in splits.items()},
        "num_rows": n_rows,
        "num_sessions": n_sessions,
        "shards": shard_meta,
        "summary": summary,
        "vocab_dtypes": vocab_dtypes,
    }


# What the per-shard passes read (set before the worker processes fork, so they inherit it).
_CTX: dict = {}


def _map(fn, items, workers: int):
    """``fn`` over the shard numbers, results yielded in order as they come: in this process,
    or in ``workers`` forked processes (each holds one shard at a time). Consumed one by one,
    so the parent never holds every shard's result at once."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=multiprocessing.get_context("fork")) as pool:
        pending = [pool.submit(fn, items[i]) for i in range(min(2 * workers, len(items)))]
        for i in range(len(items)):
            result = pending[i].result()
            pending[i] = None  # drop the finished future's result
            if len(pending) < len(items):
                pending.append(pool.submit(fn, items[len(pending)]))
            yield result


def _peak_note() -> str:
    """This process's peak resident memory so far (Linux), for the progress lines."""
    try:
        with open("/proc/self/status") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
        return f"  (main process peak {kib / 2**20:.2f} GB)"
    except (OSError, StopIteration, ValueError):
        return ""


def _trim() -> None:
    """Hand freed memory back to the system before the workers fork (they inherit the
    parent's pages): arrow's pooled buffers and glibc's free heap."""
    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _partition(plan, raw_dir: Path, shards: int, block_bytes, workers: int) -> dict:
    """Pass 1: stream every log file block by block into per-shard raw Parquet files.

    With several workers a plain-text log is cut into byte ranges at line starts
    (``csv_ranges``; about PARTITION_RANGE_BYTES each, at least one per worker) parsed in
    parallel; each range writes its own part file per shard, numbering its rows from 0.
    ``pos`` is the row's index over all files in the reader's order, so a part's rows get
    the rows kept before its range added (``parts``: the (task, offset) pairs pass 2 reads
    in order). A file whose range saw a quote (a cut may split a quoted field) or bad
    input is read again here in one piece, which gives the one reader's rows or its exact
    error message. .gz files are one range each."""
    tasks = []  # (file index, path, header end, (start, end) or None = the whole file)
    for i, path in enumerate(plan.files["log"]):
        header_end, ranges = 0, None
        if workers > 1 and path.suffix != ".gz":
            parts = max(-(-path.stat().st_size // PARTITION_RANGE_BYTES), workers)
            header_end, ranges = csv_ranges.line_ranges(path, parts)
        tasks += [(i, path, header_end, r) for r in ranges] if ranges else [(i, path, 0, None)]
    _CTX.clear()
    _CTX.update(tasks=tasks, plan=plan, raw_dir=raw_dir, shards=shards, block_bytes=block_bytes or STREAM_BLOCK_BYTES)
    by_file: dict[int, list] = {}
    for t, got in enumerate(_map(_partition_task, range(len(tasks)), workers)):
        by_file.setdefault(tasks[t][0], []).append((t, got))
    videos = _Fold("set")
    parts, pos, n_read, n_random = [], 0, 0, 0
    for i, path in enumerate(plan.files["log"]):
        done = by_file[i]
        if any(got is None for _, got in done) or sum(got["read"] for _, got in done) == 0:
            for p in raw_dir.glob("*.arrow"):  # this file's ranges: read it again in one piece
                if int(p.stem.split("-")[2]) in {t for t, _ in done}:
                    p.unlink()
            tasks.append((i, path, 0, None))
            done = [(len(tasks) - 1, _partition_task(len(tasks) - 1, ranged=False))]
        for t, got in done:
            parts.append((t, pos))
            pos += got["rows"]
            n_read += got["read"]
            n_random += got["rows"] if path.name.startswith("log_random") else 0
            videos.add(got["videos"], None)
    _CTX.clear()
    return {"rows": pos, "read": n_read, "random": n_random, "videos": videos.result()[0], "parts": parts}


def _part_name(s: int, t: int) -> str:
    return f"shard-{s:05d}-{t:06d}.arrow"


def _mid_name(s: int) -> str:
    return f"shard-{s:05d}.arrow"


def _write_temp(table: pa.Table, path: Path) -> None:
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)


def _read_temp(path: Path) -> pa.Table:
    """A temporary Arrow IPC file read into memory (not mapped: the file is deleted soon)."""
    with pa.OSFile(str(path)) as fh:
        return pa.ipc.open_file(fh).read_all()


def _partition_task(t: int, ranged: bool = True) -> dict | None:
    """Pass 1 on one task (a byte range of a log file, or a whole file): its rows cut by
    shard into ``raw/shard-SSSSS-TTTTTT.parquet``, ``pos`` counted from 0. None when a
    range saw a quote or bad input (the caller reads the file again in one piece)."""
    ctx = _CTX
    _, path, header_end, rng = ctx["tasks"][t]
    plan, raw_dir, shards = ctx["plan"], ctx["raw_dir"], ctx["shards"]
    columns = ["pos", *plan.log_columns]
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    videos = _Fold("set")
    pos = n_read = 0
    pending: list[dict] = []

    def flush() -> None:  # one shard split and one row group per shard for PARTITION_ROWS rows
        data = {c: np.concatenate([d[c] for d in pending]) for c in columns}
        pending.clear()
        shard = shard_of(data["user_id"], shards)
        order = np.argsort(shard, kind="stable")  # keeps the reader's row order inside a shard
        table = pa.table({c: data[c][order] for c in columns})
        bounds = np.searchsorted(shard[order], np.arange(shards + 1))
        for s in np.flatnonzero(np.diff(bounds)):
            if s not in writers:
                writers[s] = pa.ipc.new_file(raw_dir / _part_name(s, t), table.schema)
            writers[s].write_table(table.slice(bounds[s], bounds[s + 1] - bounds[s]))

    source = csv_ranges.ByteRange(path, header_end, *rng) if ranged and rng is not None else None
    try:
        for data, rows in kr.iter_log(path, plan.log_columns, plan.selected, ctx["block_bytes"], byte_range=source):
            if source is not None and source.quoted:
                return None
            n_read += rows
            m = len(data["user_id"])
            if m == 0:
                continue
            data["pos"] = np.arange(pos, pos + m, dtype=np.int64)
            pos += m
            pending.append(data)
            videos.add(pd.unique(data["video_id"]), None)
            if sum(len(d["pos"]) for d in pending) >= PARTITION_ROWS:
                flush()
        if source is not None and source.quoted:
            return None
        if pending:
            flush()
    except DataError:
        if source is None:
            raise
        return None
    finally:
        for w in writers.values():
            w.close()
        if source is not None:
            source.close()
    return {"rows": pos, "read": n_read, "videos": videos.result()[0]}


class _Acc:
    """Counts summed over shards for the summary."""

    def __init__(self):
        self.impressions = 0
        self.duplicates = 0
        self.kept_rows = 0
        self.notes: dict[str, int] = {}
        self.rate_all: np.ndarray | None = None
        self.rate_kept: np.ndarray | None = None
        self.date: dict[str, np.ndarray] = {}  # dense name -> [n, sx, sy, sxx, syy, sxy, min x, max x]
        self.day_range = [np.inf, -np.inf]

    def merge(self, other: "_Acc") -> None:
        self.impressions += other.impressions
        self.duplicates += other.duplicates
        self.kept_rows += other.kept_rows
        for k, v in other.notes.items():
            self.notes[k] = self.notes.get(k, 0) + v
        for name in ("rate_all", "rate_kept"):
            mine = getattr(self, name)
            setattr(self, name, getattr(other, name) if mine is None else mine + getattr(other, name))
        self.day_range = [min(self.day_range[0], other.day_range[0]), max(self.day_range[1], other.day_range[1])]
        for name, s in other.date.items():
            old = self.date.get(name)
            self.date[name] = s if old is None else np.r_[old[:6] + s[:6], min(old[6], s[6]), max(old[7], s[7])]


def _pass_sessions(s: int):
    """Pass 2 on one shard: the builder's steps 1-3 on its rows; writes the shard's kept rows
    (session-sorted log columns) and returns its session keys, each sparse value's first
    ``pos`` and its counts for the summary."""
    ctx = _CTX
    plan = ctx["plan"]
    files = [(ctx["raw_dir"] / _part_name(s, t), offset) for t, offset in ctx["parts"]]
    files = [(p, offset) for p, offset in files if p.is_file()]
    if not files:
        return None
    # the parts in the reader's order; each part's pos counted from 0, shifted by the rows before it
    tables = [_read_temp(p) for p, _ in files]
    pos = np.concatenate([t.column("pos").to_numpy() + offset for t, (_, offset) in zip(tables, files)])
    table = pa.concat_tables(tables)
    del tables
    log = {c: table.column(c).to_numpy() for c in plan.log_columns}
    del table
    for p, _ in files:
        p.unlink()
    sides = _sides(s, pd.unique(log["user_id"]), pd.unique(log["video_id"]))  # this shard's users / videos only
    if sides["user"] is not None and not sides["user"]["index"].is_unique:
        return "duplicated", side_shards.duplicates(sides["user"]["index"])
    acc = _Acc()
    if not ctx["keep_duplicates"]:
        first = ~kr.duplicate_rows(log)
        if not first.all():
            acc.duplicates += int((~first).sum())
            log = {c: v[first] for c, v in log.items()}
            pos = pos[first]
    frame, sparse, dense, notes = kr.events_frame(log, plan, sides)
    n = len(pos)
    acc.impressions += n
    acc.notes = dict(notes)
    _date_sums(acc, frame, dense, log["time_ms"])
    tasks = list(plan.task_map)
    time_ms = log["time_ms"]

    # sessions: the builder's rule, on this shard's rows (in the reader's order)
    user_codes = pd.factorize(log["user_id"])[0].astype(np.int64)
    if "session" in frame:  # user_day: session ids follow first appearance, like the builder's factorize
        session = pd.factorize(frame["session"])[0].astype(np.int64)
        by_session = group_time_order(session, time_ms)
        tie_group = session
    else:
        session, by_session = assign_sessions(user_codes, time_ms, ctx["session_gap"])
        tie_group = user_codes  # gap sessions: ids ascend by (user's first appearance, time)
    lengths = np.bincount(session)
    keep = lengths[session] >= ctx["min_events"]
    y_all = np.stack([np.asarray(frame[t], dtype=np.int64) for t in tasks], axis=1)
    acc.rate_all = y_all.sum(axis=0)
    acc.rate_kept = y_all[keep].sum(axis=0)
    acc.kept_rows = int(keep.sum())

    firsts = {}
    for name in sparse:
        if name in _side_of(plan):
            continue
        v = _value_ids(frame[name])
        firsts[name] = _first_by(v[v != -1], pos[v != -1])
    # a side feature's value first appears with the first row of one of its users / videos:
    # per entity, not per row (26 user columns over a user's ~40 rows each)
    for which, key in (("user", "user_id"), ("video", "video_id")):
        side = sides[which]
        if side is None:
            continue
        ids, first = firsts[key]
        idx = side["index"].get_indexer(ids)
        for c in side["columns"]:
            if c in _side_of(plan):
                codes = kr.take_or(side[c][0], idx, -1, dtype=np.int64)
                firsts[c] = _first_by(codes[codes != -1], first[codes != -1])
    side_fields = {name: frame[name].categories for name in sparse if isinstance(frame[name], pd.Categorical)}
    fields = (sparse, dense, tasks, side_fields)
    ids, first = firsts.pop(USER_FIELD)  # this shard's users only: written beside it, sorted by first pos
    by_pos = np.argsort(first, kind="stable")
    for name, values in (("pos", first[by_pos]), ("id", ids[by_pos])):
        values.astype(np.int64).tofile(_user_file(ctx["mid_dir"], s, name))
    if VIDEO_FIELD in firsts:  # this shard's videos' first pos, cut by video bucket (merged in pass 3)
        _write_video_part(s, "first", *firsts.pop(VIDEO_FIELD))
    del frame
    if not keep.any():
        return fields, 0, firsts, acc

    by_session = by_session[keep[by_session]]
    s_sorted = session[by_session]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    session_len = np.diff(np.r_[starts, len(by_session)])
    start_time = time_ms[by_session[starts]]
    group_first = pos[np.unique(tie_group, return_index=True)[1]]  # pos of each group's first row
    k1 = group_first[tie_group[by_session[starts]]]
    # local order: the global order restricted to this shard (time: start, then session id)
    local = (np.lexsort((s_sorted[starts], k1, start_time)) if ctx["order_kind"] == "time"
             else np.lexsort((s_sorted[starts], k1)))
    new_len = session_len[local]
    ptr = np.zeros(len(local) + 1, dtype=np.int64)
    np.cumsum(new_len, out=ptr[1:])
    gather = np.repeat(starts[local] - ptr[:-1], new_len) + np.arange(ptr[-1])
    rows = by_session[gather]
    # the kept rows' log columns: passes 3 and 4 rebuild the (row-local) frame from them
    cols = {"sess": np.repeat(np.arange(len(local), dtype=np.int64), new_len), "pos": pos[rows],
            **{c: log[c][rows] for c in plan.log_columns}}
    _write_temp(pa.table(cols), ctx["mid_dir"] / _mid_name(s))
    for name, values in (("start", start_time[local]), ("k1", k1[local]), ("length", new_len)):
        values.astype(KEY_DTYPES[name]).tofile(_key_file(ctx["mid_dir"], s, name))
    return fields, len(local), firsts, acc


def _sides(s: int, users: np.ndarray | None = None, videos: np.ndarray | None = None) -> dict:
    """The side tables shard ``s``'s rows join: its own users' (those of ``users`` only,
    if given) and its own videos' (pass 2 gathers them from the video buckets and keeps
    them beside the shard for passes 3 and 4)."""
    ctx = _CTX
    user = side_shards.load(ctx["side_dir"], s, ctx["user_side"], users) if ctx["user_side"] is not None else None
    video = None
    if ctx["video_side"] is not None:  # passes 3, 4 reread what pass 2 kept (a superset of their videos)
        own = ctx["mid_dir"] / f"video-side-{s:05d}"
        own.mkdir(exist_ok=True)
        video = video_buckets.load(ctx["side_dir"], ctx["video_side"], videos, own)
    return {"user": user, "video": video}


def _read_mid(s: int):
    """A shard's kept rows: (sess, row, global session, frame rebuilt by events_frame)."""
    ctx = _CTX
    table = _read_temp(ctx["mid_dir"] / _mid_name(s))
    mid = {name: table.column(name).to_numpy() for name in table.column_names}
    del table
    frame, _, _, _ = kr.events_frame({c: mid[c] for c in ctx["plan"].log_columns}, ctx["plan"],
                                 _sides(s, pd.unique(mid["user_id"]), pd.unique(mid["video_id"])))
    rank, first = (np.fromfile(_key_file(ctx["mid_dir"], s, k), dtype=np.int64) for k in ("rank", "first"))
    row, srank = _global_rows(mid["sess"], rank, first)
    return mid, frame, row, srank


def _pass_statistics(s: int) -> dict:
    """Pass 3 on one shard: train counts per sparse value, dense moments, first rows of users
    and items, per-split counts."""
    ctx = _CTX
    sparse, dense, tasks, _ = ctx["fields"]
    mid, frame, row, srank = _read_mid(s)
    train = srank < ctx["splits"]["train"][1]
    out = {"counts": {name: _count(_value_ids(frame[name])[train]) for name in sparse if name not in FIELD_KIND},
           "inf": {}, "missing": {}, "moments": {}, "splits": {}}
    for name in dense:
        x = np.asarray(frame[name], dtype=np.float64)
        out["inf"][name] = int(np.isinf(x).sum())
        out["missing"][name] = int(np.isnan(x).sum())
        out["moments"][name] = _moments(x[train])
    _user_statistics(s, mid["user_id"], train, row)
    _video_statistics(s, _count(_value_ids(frame[VIDEO_FIELD])[train]) if VIDEO_FIELD in sparse else None,
                      _first_by(mid["video_id"], row))
    for name, (a, b) in ctx["splits"].items():
        inside = (srank >= a) & (srank < b)
        out["splits"][name] = {"rows": int(inside.sum()), "users": len(pd.unique(mid["user_id"][inside])),
                               "pos": np.array([int(np.asarray(frame[t])[inside].sum(dtype=np.int64)) for t in tasks])}
    return out


def _pass_encode(s: int) -> dict:
    """Pass 4 on one shard: encode with the merged vocabularies / stats, write it in log order."""
    ctx = _CTX
    sparse, dense, tasks, _ = ctx["fields"]
    mid, frame, row, srank = _read_mid(s)
    # time order: the shard's session order is already the global one, rows need no move
    order = slice(None) if (row[1:] > row[:-1]).all() else np.argsort(row, kind="stable")
    enc = {**ctx["encoders"], **_user_encoders(s), **_video_encoders(pd.unique(mid["video_id"]))}
    cols = {"row": row[order], "session": srank[order], "user": _encode(enc["user"], mid["user_id"][order]),
            "item": _encode(enc["item"], mid["video_id"][order]), "time": mid["time_ms"][order]}
    for name in sparse:
        cols[f"s:{name}"] = _encode(enc[name], _value_ids(frame[name])[order])
    for name in dense:
        st = ctx["dense_stats"][name]
        z = (np.asarray(frame[name], dtype=np.float64)[order] - st["mean"]) / st["std"]
        z[np.isnan(z)] = 0.0
        cols[f"d:{name}"] = z.astype(np.float32)
    for t in tasks:
        cols[f"y:{t}"] = np.asarray(frame[t], dtype=np.int8)[order]
    name = SHARD_NAME.format(s)
    pq.write_table(pa.table(cols), ctx["out"] / name, compression="lz4", use_dictionary=False, row_group_size=ROW_GROUP)
    (ctx["mid_dir"] / _mid_name(s)).unlink()
    session = cols["session"]
    return {"rows": int(len(session)), "sessions": int(len(pd.unique(session))),
            "rows_by_split": {k: int(((session >= a) & (session < b)).sum()) for k, (a, b) in ctx["splits"].items()}}


def _side_of(plan) -> set:
    """The sparse features that come from the user / video side files."""
    return {c for c in [*plan.user_cols, *plan.video_cols] if c in kr.USER_SPARSE or c in kr.VIDEO_SPARSE}


def _value_ids(col) -> np.ndarray:
    """A sparse column as comparable ids, the same in every shard: the raw integers of the
    log's own fields, the side table's category codes (one side table for all shards)
    for the side fields; -1 = missing."""
    if isinstance(col, pd.Categorical):
        return np.asarray(col.codes, dtype=np.int64)
    return np.asarray(col)


KEY_DTYPES = {"start": np.int64, "k1": np.int64, "length": np.int64, "rank": np.int64, "first": np.int64}


def _key_file(mid_dir: Path, s: int, name: str) -> Path:
    """A shard's per-session array in pass 2's local session order (raw, KEY_DTYPES[name])."""
    return mid_dir / f"keys-{s:05d}.{name}"


def _read_keys(mid_dir: Path, s: int, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    dtype = np.dtype(KEY_DTYPES[name])
    count = -1 if stop is None else stop - start
    return np.fromfile(_key_file(mid_dir, s, name), dtype=dtype, count=count, offset=start * dtype.itemsize)


def _time_order(start: np.ndarray, k1: np.ndarray) -> np.ndarray:
    """Stable order by (start, k1): keys concatenated shard by shard, each shard in its local
    order, so equal keys (one user's sessions, so one shard) stay in local order -- the
    third key for free. One packed int64 key (group_time_order) instead of a 3-key lexsort."""
    return group_time_order(start, k1)


def _global_order(mid_dir: Path, counts: list[int], order_kind: str, seed: int) -> np.ndarray:
    """Each shard's sessions' global rank and first global row (written beside its keys as
    ``rank`` / ``first``); returns the global session_ptr (a read-only memmap of a file).

    Time order: the shards' keys are each sorted by start time, so the global order is
    built one start-time bucket of about SESSION_BUCKET sessions at a time (bucket edges
    from a sample of the start times; a bucket holds every session of its time range, so
    ties never straddle two): memory is one bucket, not every session. Random order (the
    builder's permutation of the session ids under the seed) needs the whole permutation:
    16 B per session."""
    total = sum(counts)
    present = [s for s in range(len(counts)) if counts[s]]
    ptr_path = mid_dir / "session_ptr.bin"
    with open(ptr_path, "wb") as ptr_out:
        np.zeros(1, np.int64).tofile(ptr_out)
        if order_kind == "time":
            _bucketed_time_order(mid_dir, counts, present, total, ptr_out)
        else:
            _random_order(mid_dir, counts, present, seed, ptr_out)
    return np.memmap(ptr_path, dtype=np.int64, mode="r")


def _bucketed_time_order(mid_dir: Path, counts, present, total: int, ptr_out) -> None:
    # the start times are read shard by shard, twice (sample, then cuts): one shard's in memory, not the log's
    step = max(total // SAMPLE_SESSIONS, 1)
    sample = np.sort(np.concatenate([_read_keys(mid_dir, s, "start")[::step] for s in present]))
    n_buckets = max(-(-total // SESSION_BUCKET), 1)
    edges = np.unique(sample[(len(sample) * np.arange(1, n_buckets)) // n_buckets])
    del sample
    # per shard, where each bucket's sessions begin (its start times are sorted)
    cuts = {s: np.r_[0, np.searchsorted(_read_keys(mid_dir, s, "start"), edges, side="left"), counts[s]]
            for s in present}
    rank_base = row_base = 0
    for b in range(len(edges) + 1):
        spans = [(s, int(cuts[s][b]), int(cuts[s][b + 1])) for s in present if cuts[s][b + 1] > cuts[s][b]]
        if not spans:
            continue
        start = np.concatenate([_read_keys(mid_dir, s, "start", a, z) for s, a, z in spans])
        k1 = np.concatenate([_read_keys(mid_dir, s, "k1", a, z) for s, a, z in spans])
        length = np.concatenate([_read_keys(mid_dir, s, "length", a, z) for s, a, z in spans])
        order = _time_order(start, k1)
        del start, k1
        rank, first = _place(order, length, rank_base, row_base, ptr_out)
        at = 0
        for s, a, z in spans:  # back to each shard, appended in its local order
            for name, values in (("rank", rank), ("first", first)):
                with open(_key_file(mid_dir, s, name), "ab") as fh:
                    values[at: at + z - a].tofile(fh)
            at += z - a
        rank_base += len(order)
        row_base += int(length.sum())


def _random_order(mid_dir: Path, counts, present, seed: int, ptr_out) -> None:
    k1 = np.concatenate([_read_keys(mid_dir, s, "k1") for s in present])
    by_id = np.argsort(k1, kind="stable")  # session-id order (k1, local), then the builder's permutation
    del k1
    order = by_id[np.random.default_rng(seed).permutation(len(by_id))]
    del by_id
    length = np.concatenate([_read_keys(mid_dir, s, "length") for s in present])
    rank, first = _place(order, length, 0, 0, ptr_out)
    at = 0
    for s in present:
        rank[at: at + counts[s]].tofile(_key_file(mid_dir, s, "rank"))
        first[at: at + counts[s]].tofile(_key_file(mid_dir, s, "first"))
        at += counts[s]


def _place(order: np.ndarray, length: np.ndarray, rank_base: int, row_base: int, ptr_out):
    """Sessions (``length`` rows each) placed in ``order`` after ``rank_base`` sessions and
    ``row_base`` rows: their global rank and first global row, in their given order; their
    session_ptr ends are appended to ``ptr_out``."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(rank_base, rank_base + len(order), dtype=np.int64)
    ends = row_base + np.cumsum(length[order])
    first = np.empty(len(order), dtype=np.int64)
    first[order] = ends - length[order]
    ends.tofile(ptr_out)
    return rank, first


def _global_rows(sess: np.ndarray, rank: np.ndarray, first: np.ndarray):
    """Global row index and global session index of a shard's rows (grouped by local session)."""
    srank = rank[sess]
    starts = np.flatnonzero(np.r_[True, sess[1:] != sess[:-1]]) if len(sess) else np.zeros(0, np.int64)
    offset = np.arange(len(sess)) - np.repeat(starts, np.diff(np.r_[starts, len(sess)]))
    return first[sess] + offset, srank


def _user_file(mid_dir: Path, s: int, name: str, kind: str = "users") -> Path:
    """A part's per-entity int64 array -- ``users``: shard ``s``'s users; ``videos``: video
    bucket ``s``'s videos (merged over the shards): ``pos``, ``id`` (by first pos),
    ``count`` (train rows), ``index`` (the vocabulary's), aligned; ``row``, ``rowid`` (by
    first row in the final log), ``code`` (the user / item code), aligned."""
    return mid_dir / f"{kind}-{s:05d}.{name}"


def _read_user(mid_dir: Path, s: int, name: str, start: int = 0, stop: int | None = None,
               kind: str = "users") -> np.ndarray:
    path = _user_file(mid_dir, s, name, kind)
    if not path.is_file():
        return np.zeros(0, np.int64)
    return np.fromfile(path, dtype=np.int64, count=-1 if stop is None else stop - start, offset=start * 8)


def _user_statistics(s: int, user: np.ndarray, train: np.ndarray, row: np.ndarray) -> None:
    """Pass 3's per-user tables of shard ``s`` (its rows' ``user`` ids, global ``row``s):
    train rows per user, aligned with pass 2's list, and each user's first row. Sorts, not
    tables over the id range: a worker's memory is its shard's."""
    mid_dir = _CTX["mid_dir"]
    ids = _read_user(mid_dir, s, "id")
    by_id = np.argsort(ids, kind="stable")
    u, c = np.unique(user[train], return_counts=True)
    count = np.zeros(len(ids), dtype=np.int64)
    count[by_id[np.searchsorted(ids[by_id], u)]] = c
    count.tofile(_user_file(mid_dir, s, "count"))
    order = np.argsort(row, kind="stable")
    uniq, first = np.unique(user[order], return_index=True)  # first occurrence in row order
    first_row = row[order][first]
    by_row = np.argsort(first_row, kind="stable")
    first_row[by_row].astype(np.int64).tofile(_user_file(mid_dir, s, "row"))
    uniq[by_row].astype(np.int64).tofile(_user_file(mid_dir, s, "rowid"))


def _bucket_slices(mid_dir: Path, present: list[int], key: str, columns: list[str], end: int, kind: str = "users"):
    """The parts' per-entity tables (each sorted by ``key``, distinct keys in 0..end) one key
    range of RANK_BUCKET at a time, in key order: yields the (part, start, stop) spans and
    the columns of those spans concatenated -- at most RANK_BUCKET users / videos."""
    edges = np.arange(RANK_BUCKET, max(end, 1), RANK_BUCKET, dtype=np.int64)
    cuts = {}
    for s in present:
        keys = _read_user(mid_dir, s, key, kind=kind)
        cuts[s] = np.r_[0, np.searchsorted(keys, edges), len(keys)]
    for b in range(len(edges) + 1):
        spans = [(s, int(cuts[s][b]), int(cuts[s][b + 1])) for s in present if cuts[s][b + 1] > cuts[s][b]]
        if spans:
            yield spans, {c: np.concatenate([_read_user(mid_dir, s, c, a, z, kind) for s, a, z in spans])
                          for c in columns}


def _append_user(mid_dir: Path, spans, name: str, values: np.ndarray, kind: str = "users") -> None:
    """``values`` (one bucket's, in its spans' order) appended to each part's ``name`` file."""
    at = 0
    for s, a, z in spans:
        with open(_user_file(mid_dir, s, name, kind), "ab") as fh:
            values[at: at + z - a].astype(np.int64).tofile(fh)
        at += z - a


def _user_vocabulary(mid_dir: Path, present: list[int], end_pos: int, min_count: int,
                     kind: str = "users") -> tuple[int, int]:
    """The user (``kind`` videos: video) field's vocabulary, as _vocabulary makes it over
    every value at once: values seen in train, numbered 2.. by first pos (those with >=
    min_count train rows; 1 for the rarer), ranked bucket by bucket. Each part gets its
    values' ``index``; the kept values' (value, index) rows go to VOCAB_FILES[kind] in
    vocabulary order. Returns (frequent, rare)."""
    frequent = rare = 0
    schema = pa.schema([("value", pa.int64()), ("index", pa.int64())])
    with pa.ipc.new_file(mid_dir / VOCAB_FILES[kind], schema) as writer:
        for spans, cols in _bucket_slices(mid_dir, present, "pos", ["pos", "id", "count"], end_pos, kind):
            order = np.argsort(cols["pos"], kind="stable")
            count = cols["count"][order]
            kept, often = count > 0, count >= min_count
            index = np.zeros(len(order), dtype=np.int64)
            index[kept & ~often] = RARE_INDEX
            index[often] = FIRST_VALUE_INDEX + frequent + np.arange(int(often.sum()))
            frequent += int(often.sum())
            rare += int((kept & ~often).sum())
            writer.write_table(pa.table({"value": cols["id"][order][kept], "index": index[kept]}, schema=schema))
            back = np.empty_like(index)
            back[order] = index
            _append_user(mid_dir, spans, "index", back, kind)
    return frequent, rare


def _user_codes(mid_dir: Path, present: list[int], n_rows: int, kind: str = "users") -> int:
    """Each user's (video's) code (numbered by its first row in the final log, as the
    builder's factorize), ranked bucket by bucket into each part's ``code``; returns the count."""
    base = 0
    for spans, cols in _bucket_slices(mid_dir, present, "row", ["row"], n_rows, kind):
        order = np.argsort(cols["row"], kind="stable")
        code = np.empty(len(order), dtype=np.int64)
        code[order] = base + np.arange(len(order))
        base += len(order)
        _append_user(mid_dir, spans, "code", code, kind)
    return base


def _user_encoders(s: int) -> dict:
    """Shard ``s``'s encoders of the user field and the user code: its own users only."""
    ctx = _CTX
    mid_dir = ctx["mid_dir"]
    ids, index = _read_user(mid_dir, s, "id"), _read_user(mid_dir, s, "index")
    by_id = np.argsort(ids, kind="stable")
    dtype = cache._narrow(np.zeros(1, np.int64), ctx["cards"][USER_FIELD]).dtype
    rid, code = _read_user(mid_dir, s, "rowid"), _read_user(mid_dir, s, "code")
    by_rid = np.argsort(rid, kind="stable")
    return {USER_FIELD: (ids[by_id], index[by_id].astype(dtype)), "user": (rid[by_rid], code[by_rid])}


def _video_part_file(s: int, b: int, table: str, name: str) -> Path:
    """Shard ``s``'s partial table of the videos of video bucket ``b``: ``first`` (pass 2:
    ids, first pos), ``count`` (pass 3: ids, train rows), ``row`` (pass 3: ids, first row)."""
    return _CTX["mid_dir"] / f"vpart-{s:05d}-{b:05d}.{table}.{name}"


def _write_video_part(s: int, table: str, ids: np.ndarray, values: np.ndarray) -> None:
    """(sorted ids, their values) cut by video bucket, one file pair per bucket present."""
    ids = ids.astype(np.int64)
    bounds = np.searchsorted(ids, _CTX["video_edges"])  # ids sorted: bucket b = ids[bounds[b-1]:bounds[b]]
    bounds = np.r_[0, bounds, len(ids)]
    for b in np.flatnonzero(np.diff(bounds)):
        a, z = bounds[b], bounds[b + 1]
        ids[a:z].tofile(_video_part_file(s, b, table, "id"))
        values[a:z].astype(np.int64).tofile(_video_part_file(s, b, table, "value"))


def _video_statistics(s: int, counts, first_rows) -> None:
    """Pass 3's per-video tables of shard ``s``, cut by video bucket: train rows, first rows."""
    if counts is not None:
        _write_video_part(s, "count", *counts)
    _write_video_part(s, "row", *first_rows)


def _merge_videos(b: int) -> int:
    """Video bucket ``b``'s tables merged over the shards (min first pos, summed train rows,
    min first row), written as the user field's (_user_file, kind ``videos``): at most
    VIDEO_BUCKET videos. Returns the videos with a first row (0: nothing to rank)."""
    mid_dir = _CTX["mid_dir"]
    folds = {"first": _Fold("min"), "count": _Fold("sum"), "row": _Fold("min")}
    for s in range(_CTX["shards"]):
        for table, fold in folds.items():
            path = _video_part_file(s, b, table, "id")
            if path.is_file():
                fold.add(np.fromfile(path, dtype=np.int64),
                         np.fromfile(_video_part_file(s, b, table, "value"), dtype=np.int64))
                path.unlink()
                _video_part_file(s, b, table, "value").unlink()
    ids, first = folds["first"].result()
    if len(ids):
        cv, cc = folds["count"].result()
        count = np.zeros(len(ids), dtype=np.int64)
        count[np.searchsorted(ids, cv)] = cc
        by_pos = np.argsort(first, kind="stable")
        for name, values in (("pos", first[by_pos]), ("id", ids[by_pos]), ("count", count[by_pos])):
            values.astype(np.int64).tofile(_user_file(mid_dir, b, name, "videos"))
    rid, row = folds["row"].result()
    by_row = np.argsort(row, kind="stable")
    for name, values in (("row", row[by_row]), ("rowid", rid[by_row])):
        values.astype(np.int64).tofile(_user_file(mid_dir, b, name, "videos"))
    return len(rid) + len(ids)


def _video_encoders(videos: np.ndarray) -> dict:
    """The encoders of the video field and the item code over ``videos`` (a shard's) only,
    read from their video buckets one at a time."""
    ctx = _CTX
    mid_dir = ctx["mid_dir"]
    videos = np.sort(videos.astype(np.int64))
    buckets = set(np.unique(np.searchsorted(ctx["video_edges"], videos, side="right")).tolist())
    found = {"id": [], "index": [], "rowid": [], "code": []}
    for b in ctx["video_parts"]:
        if b not in buckets:
            continue
        for key, value in (("id", "index"), ("rowid", "code")):
            if key == "id" and VIDEO_FIELD not in ctx["cards"]:
                continue
            ids = _read_user(mid_dir, b, key, kind="videos")
            mine = np.isin(ids, videos)
            found[key].append(ids[mine])
            found[value].append(_read_user(mid_dir, b, value, kind="videos")[mine])
    out = {}
    for key, value, name, bound in (("id", "index", VIDEO_FIELD, ctx["cards"].get(VIDEO_FIELD)),
                                    ("rowid", "code", "item", None)):
        if key == "id" and VIDEO_FIELD not in ctx["cards"]:
            continue
        ids = np.concatenate(found[key]) if found[key] else np.zeros(0, np.int64)
        values = np.concatenate(found[value]) if found[value] else np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")
        out[name] = _encoder((ids[order], values[order]), bound)
    return out


def _write_vocabularies(vocab: dict, mid_dir: Path, path: Path) -> dict:
    """vocab.parquet (cache._vocab_table's columns) written VOCAB_WRITE_ROWS values at a time,
    field by field; the user field's (None in ``vocab``) from USER_VOCAB_FILE. Returns the
    fields' value dtypes (meta.json's ``vocab_dtypes``)."""
    dtypes = {}
    with pq.ParquetWriter(path, cache._vocab_table({}).schema, compression="lz4") as writer:
        for name, series in vocab.items():
            for part in (_user_vocab_parts(mid_dir / VOCAB_FILES[FIELD_KIND[name]]) if series is None else
                         (series.iloc[a: a + VOCAB_WRITE_ROWS] for a in range(0, len(series), VOCAB_WRITE_ROWS))):
                dtypes.setdefault(name, cache._value_dtype(part.index))
                writer.write_table(cache._vocab_table({name: part}))
            dtypes.setdefault(name, cache._value_dtype(series.index) if series is not None else "int64")
    return dtypes


def _user_vocab_parts(path: Path):
    """The user (video) field's vocabulary as Series (value -> index) of up to VOCAB_WRITE_ROWS values."""
    with pa.OSFile(str(path)) as fh:
        reader = pa.ipc.open_file(fh)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            values, index = batch.column("value").to_numpy(), batch.column("index").to_numpy()
            for a in range(0, len(values), VOCAB_WRITE_ROWS):
                yield pd.Series(index[a: a + VOCAB_WRITE_ROWS], index=pd.Index(values[a: a + VOCAB_WRITE_ROWS]))


def _small_ids(values: np.ndarray) -> bool:
    """Integer ids in 0..SMALL_IDS: per-value tables can be dense arrays indexed by the id."""
    return values.dtype.kind in "iu" and len(values) > 0 and values.min() >= 0 and values.max() < SMALL_IDS


def _first_by(values: np.ndarray, key: np.ndarray):
    """(unique values in ascending order, the smallest key of each)."""
    if _small_ids(values):  # one scatter-min into an array over the ids, no sort
        best = np.full(int(values.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, values, key)
        u = np.flatnonzero(best != np.iinfo(np.int64).max)
        return u.astype(values.dtype), best[u].astype(key.dtype, copy=False)
    if len(key) and not (key[1:] >= key[:-1]).all():  # one argsort by key, then the in-order path
        order = np.argsort(key, kind="stable")
        values, key = values[order], key[order]
    if len(key):  # keys in order (rows in pos / log order): one hash pass
        codes, uniques = pd.factorize(values, sort=False)
        # codes appear as 0, 1, 2, ... at their first row: the running maximum steps there
        first = np.searchsorted(np.maximum.accumulate(codes), np.arange(len(uniques)))
        uniques = np.asarray(uniques)
        order = np.argsort(uniques, kind="stable")
        return uniques[order], key[first][order]
    return values[:0], key[:0]


class _Fold:
    """Per-value min or sum over shards (or the set of values), folded whenever the pending rows pile up.

    A fold sorts the folded table and every part added since, so it runs only once the
    added rows outnumber max(FOLD_ROWS, the folded table): each row is then sorted
    O(log) times in all. (Folding whenever folded + added > FOLD_ROWS re-sorted the whole
    table at every add once it held FOLD_ROWS distinct values -- per CSV block in pass 1,
    per shard later: the cost that grew with the square of the users past ~1 M users.)"""

    def __init__(self, op: str):
        self.op = op
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.folded = 0  # rows of the folded table (parts[0] after a fold)
        self.pending = 0  # rows added since the last fold
        self.folds = 0

    def add(self, values: np.ndarray, numbers: np.ndarray) -> None:
        self.parts.append((values, numbers))
        self.pending += len(values)
        if self.pending > max(FOLD_ROWS, self.folded) and len(self.parts) > 1:
            self.parts = [self.result()]
            self.folded, self.pending = len(self.parts[0][0]), 0
            self.folds += 1

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        values = np.concatenate([p[0] for p in self.parts])
        if self.op == "set":
            return np.sort(pd.unique(values)), None
        numbers = np.concatenate([p[1] for p in self.parts])
        if self.op == "min":
            return _first_by(values, numbers)
        if _small_ids(values):
            total = np.zeros(int(values.max()) + 1, dtype=np.int64)
            np.add.at(total, values, numbers)
            seen = np.zeros(len(total), dtype=bool)
            seen[values] = True
            u = np.flatnonzero(seen)
            return u.astype(values.dtype), total[u]
        order = np.argsort(values, kind="stable")
        v = values[order]
        head = np.flatnonzero(np.r_[True, v[1:] != v[:-1]]) if len(v) else np.zeros(0, np.int64)
        return v[head], np.add.reduceat(numbers[order], head) if len(v) else numbers[:0]


def _moments(x: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of the non-NaN values."""
    seen = x[~np.isnan(x)]
    if not len(seen):
        return 0, 0.0, 0.0
    mean = float(seen.mean())
    return len(seen), mean, float(((seen - mean) ** 2).sum())


def _merge_moments(m: list, nb: int, mb: float, m2b: float) -> None:
    """Fold a shard's (count, mean, M2) into [n, mean, M2, .] (Chan et al.'s pairwise update)."""
    if nb == 0:
        return
    na = m[0]
    n = na + nb
    delta = mb - m[1]
    m[1] = m[1] + delta * nb / n
    m[2] = m[2] + m2b + delta * delta * na * nb / n
    m[0] = n


def _vocabulary(name, values, first, counts: _Fold, min_count: int, categories):
    """lut over ``values`` (sorted ids) and the vocabulary Series, as build._encode_sparse
    makes them: kept = seen in train; frequent ones numbered 2.. in order of first appearance."""
    cv, cc = counts.result()
    count = np.zeros(len(values), dtype=np.int64)
    count[np.searchsorted(values, cv)] = cc
    by_first = np.argsort(first, kind="stable")
    kept = count[by_first] > 0
    frequent = count[by_first] >= min_count
    index = np.zeros(len(values), dtype=np.int64)
    idx_first = np.zeros(len(values), dtype=np.int64)
    idx_first[kept & ~frequent] = RARE_INDEX
    idx_first[frequent] = FIRST_VALUE_INDEX + np.arange(int(frequent.sum()))
    index[by_first] = idx_first
    ids = values[by_first][kept]
    if categories is not None:
        raw = pd.Index(pd.Categorical.from_codes(ids, dtype=pd.CategoricalDtype(categories)))
    else:
        raw = pd.Index(ids)
    series = pd.Series(idx_first[kept], index=raw, name=name)
    return index, series, int(frequent.sum()), int((kept & ~frequent).sum())


SMALL_IDS = 1 << 22  # ids below this are looked up / counted through a dense array, not a sort


def _count(values: np.ndarray):
    """(distinct values >= 0, their counts); -1 (missing) left out."""
    values = values[values != -1]
    if len(values) and values.min() >= 0 and values.max() < SMALL_IDS:
        c = np.bincount(values.astype(np.int64))
        u = np.flatnonzero(c)
        return u.astype(values.dtype), c[u]
    return np.unique(values, return_counts=True)


def _encoder(table, bound: int | None = None):
    """(sorted ids, their numbers) -> what _encode applies, in the cache's narrow dtype for
    ``bound``: a dense array over small ids (its extra last slot 0 is what id -1, missing,
    reads), else the sorted ids for a binary search."""
    keys, out = table
    dtype = np.int64 if bound is None else cache._narrow(np.zeros(1, np.int64), bound).dtype
    if len(keys) and keys[0] >= 0 and keys[-1] < SMALL_IDS:
        dense = np.zeros(int(keys[-1]) + 2, dtype=dtype)
        dense[keys.astype(np.int64)] = out
        return dense
    return keys, out.astype(dtype)


def _encode(encoder, values: np.ndarray) -> np.ndarray:
    """The numbers of ``values`` (-1 = missing -> 0); every other value is among the ids."""
    if isinstance(encoder, np.ndarray):
        return encoder[values]
    keys, out = encoder
    result = np.zeros(len(values), dtype=out.dtype)
    ok = values != -1
    result[ok] = out[np.searchsorted(keys, values[ok])]
    return result


def _date_sums(acc: _Acc, frame: dict, dense: list, time_ms: np.ndarray) -> None:
    """Mergeable sums for kuairand._date_like_warnings (correlation of each dense feature
    with the impression's Beijing day)."""
    day = ((time_ms + kr.BEIJING_OFFSET_MS) // kr.DAY_MS).astype(np.float64)
    if len(day):
        acc.day_range = [min(acc.day_range[0], day.min()), max(acc.day_range[1], day.max())]
    d = day - DAY_REF
    for name in dense:
        x = np.asarray(frame[name], dtype=np.float64)
        ok = np.isfinite(x)
        xo, do = x[ok], d[ok]
        acc.date[name] = np.array([ok.sum(), xo.sum(), do.sum(), (xo * xo).sum(), (do * do).sum(), (xo * do).sum(),
                                   xo.min() if len(xo) else np.inf, xo.max() if len(xo) else -np.inf])


def _date_warnings(acc: _Acc) -> list[str]:
    out = []
    if not acc.day_range[1] > acc.day_range[0]:
        return out
    for name, (n, sx, sy, sxx, syy, sxy, lo, hi) in acc.date.items():
        if n < 3 or not hi > lo:
            continue
        cov = sxy - sx * sy / n
        r = cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))
        if r >= kr.DATE_LIKE_CORRELATION:
            out.append(f"feature '{name}' follows the calendar date (correlation {r:.2f} with the impression day): "
                       "under the time split its val/test values lie beyond the train range; "
                       "leave it out (video_features without upload_dt) unless that is intended")
    return out


def _summary(plan, part, acc: _Acc, spec: FeatureSpec, n_rows, n_sessions, splits, split_acc, n_users, n_items,
             min_events) -> dict:
    dropped = {} if part["rows"] == part["read"] else {"user not among the selected users": part["read"] - part["rows"]}
    if acc.duplicates:
        dropped[kr.DROP_DUPLICATE] = acc.duplicates
    builder = {}
    if acc.kept_rows < acc.impressions:
        reason = "one-event session" if min_events == 2 else f"session shorter than {min_events} events"
        builder[reason] = acc.impressions - acc.kept_rows
    tasks = spec.tasks
    kept = {"share": acc.kept_rows / acc.impressions if acc.impressions else 1.0,
            "rate_all": {t: float(acc.rate_all[k] / acc.impressions) for k, t in enumerate(tasks)},
            "rate_kept": {t: float(acc.rate_kept[k] / acc.kept_rows) for k, t in enumerate(tasks)}}
    notes = dict(acc.notes)
    if plan.files["log"] and any(p.name.startswith("log_random") for p in plan.files["log"]):
        notes = {"random_exposures (log_random)": int(part["random"]), **notes}
    out_splits = {}
    for name in SPLITS:
        a, b = splits[name]
        rows = split_acc[name]["rows"]
        out_splits[name] = {
            "sessions": b - a, "rows": rows, "users": split_acc[name]["users"],
            "positive_rate": {t: (float(split_acc[name]["pos"][k] / rows) if rows else None) for k, t in enumerate(tasks)},
        }
    return {
        "source": SOURCE,
        "events_read": int(part["read"]),
        "impressions": int(acc.impressions),
        "rows": n_rows,
        "sessions": n_sessions,
        "users": n_users,
        "items": n_items,
        "tasks": list(tasks),
        "sparse_fields": dict(zip(spec.sparse_fields, spec.cardinalities)),
        "dense_fields": list(spec.dense_fields),
        "splits": out_splits,
        "dropped": {"reader": dropped, "builder": builder},
        "notes": notes,
        "sessions_kept": kept,
        "warnings": list(plan.warnings) + _date_warnings(acc) + _kept_warnings(kept),
    }


# ----------------------------------------------------------------------------- reading

def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / cache.META_FILE).read_text())
        meta["shards"], meta["spec"]  # noqa: B018 -- the keys a sharded entry must have
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"not a sharded KuaiRand entry ({err}); expected meta.json with 'shards'", path=path) from None
    return meta


def rank_files(meta: dict, rank: int, world: int) -> list[str]:
    """The shard files process ``rank`` of ``world`` reads: round-robin over the shard list
    (shard i goes to rank i % world), so every user -- and every session -- has one reader."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ConfigError(f"expected 0 <= rank < world, got rank {rank!r} of {world!r}", key="rank")
    return [s["file"] for i, s in enumerate(meta["shards"]) if i % world == rank]


def load_log(path: str | Path, files: list[str] | None = None) -> SessionLog:
    """The rows of all shards (or of the named shard files) as one SessionLog in log order.
    With every shard this is the SessionLog the in-memory builder makes; with some of
    them, their sessions in global order (session_ptr rebuilt, splits recounted)."""
    path = Path(path)
    meta = read_meta(path)
    spec = FeatureSpec.from_dict(meta["spec"])
    names = [s["file"] for s in meta["shards"]] if files is None else list(files)
    try:
        table = pa.concat_tables([pq.read_table(path / name) for name in names])
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"unreadable shard ({err}); prepare again", path=path) from None
    order = np.argsort(table.column("row").to_numpy(), kind="stable")
    table = table.take(pa.array(order))
    session = table.column("session").to_numpy()
    uniq, local, lengths = np.unique(session, return_inverse=True, return_counts=True)
    session_ptr = np.zeros(len(uniq) + 1, dtype=np.int64)
    np.cumsum(lengths, out=session_ptr[1:])
    splits = {name: (int(np.searchsorted(uniq, a)), int(np.searchsorted(uniq, b))) for name, (a, b) in meta["splits"].items()}
    n = table.num_rows

    def block(prefix, names_, dtype):
        if not names_:
            return np.zeros((n, 0), dtype=dtype)
        return np.stack([table.column(f"{prefix}{c}").to_numpy() for c in names_], axis=1).astype(dtype, copy=False)

    return SessionLog(
        spec=spec, session_ptr=session_ptr,
        user=table.column("user").to_numpy().astype(np.int64), item=table.column("item").to_numpy().astype(np.int64),
        time=table.column("time").to_numpy().astype(np.int64),
        sparse=block("s:", spec.sparse_fields, np.int64), dense=block("d:", spec.dense_fields, np.float32),
        labels=block("y:", spec.tasks, np.float32), splits=splits,
    )
