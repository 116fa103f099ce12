"""The video side file spilled to disk in buckets of video ids, for the sharded prepare
(rmtl/data/shards.py).

``kuairand.load_side`` holds the side rows of every video the log uses (4 B per sparse
and 8 B per dense column per video, plus its ids: ~51 B per video with the default
features, measured): KuaiRand-27K's log uses ~7.6 M videos. Videos cross user shards, so
the file cannot be cut by shard; instead it is streamed once (blocks of ``block_bytes``),
cut to the videos seen, and written as one Arrow file per **bucket**: a range of the
sorted video ids seen holding at most ``bucket_rows`` of them (``shards.VIDEO_BUCKET``).
A worker reads the buckets one at a time and keeps its own shard's videos' rows
(``load``), so no process ever holds the whole table.

Sparse columns are coded like ``kuairand._BlockCodes``: each block factorised alone (its
codes written to the bucket files, its uniques kept), then the blocks' uniques,
concatenated in block order, factorised once -- the whole cut column's first-appearance
order, the categories ``load_side`` gives. What stays in the main process: one block, the
blocks' uniques (at most one per video and column) and the columns' distinct values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from rmtl.data import kuairand as kr
from rmtl.data.side_shards import append_by_group
from rmtl.errors import DataError

KEY = "video_id"
BLOCK = "__block"  # the CSV block a row came from: its sparse codes are that block's


def _file(out: Path, b: int) -> Path:
    return out / f"video-{b:05d}.arrow"


def split(paths: list[Path], columns: list[str], seen: np.ndarray, out: Path, block_bytes: int,
          bucket_rows: int) -> dict:
    """Stream the video side files into ``out/video-BBBBB.arrow``, cut to the ``seen`` ids
    (sorted, unique). Raises the one reader's error for an id listed twice. Returns what
    ``load`` needs besides the files."""
    what = "KuaiRand video_features_basic"
    sparse = [c for c in columns if c in kr.VIDEO_SPARSE]
    edges = seen[bucket_rows::bucket_rows]  # bucket b: ids in [edges[b-1], edges[b])
    uniques: dict[str, list[np.ndarray]] = {c: [] for c in sparse}
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    block = 0
    try:
        for p in paths:
            for data, _ in kr.iter_csv(p, [KEY, *columns], what, keep=lambda d: np.isin(d[KEY], seen),
                                       block_bytes=block_bytes,
                                       check=lambda d, path, row: kr._require_values(d, [KEY], path, row)):
                ids = data[KEY].astype(np.int64)
                cols = {KEY: ids, BLOCK: np.full(len(ids), block, dtype=np.int32)}
                for c in columns:
                    if c in uniques:
                        codes, u = pd.factorize(kr._first_tag(data[c]) if c == "tag" else data[c], use_na_sentinel=True)
                        cols[c] = codes.astype(np.int32)
                        uniques[c].append(np.asarray(u))
                    elif data[c].dtype == object:  # text (upload_dt): typed, so an all-empty block fits the schema
                        cols[c] = pa.array(data[c], type=pa.string())
                    else:
                        cols[c] = data[c]
                block += 1
                bucket = np.searchsorted(edges, ids, side="right")
                append_by_group(writers, cols, bucket, len(edges) + 1, lambda b: _file(out, b))
    finally:
        for w in writers.values():
            w.close()
    buckets = sorted(int(b) for b in writers)
    _check_duplicates(out, buckets, paths)
    remap, categories = {}, {}
    for c in sparse:  # one factorize over the blocks' uniques (kuairand._BlockCodes.result)
        parts = uniques.pop(c)
        sizes = [len(u) for u in parts]
        codes, cats = (pd.factorize(np.concatenate(parts), use_na_sentinel=True) if parts
                       else (np.zeros(0, np.int32), []))
        remap[c] = (codes.astype(np.int32), np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64))
        categories[c] = pd.Index(cats)
    return {"columns": list(columns), "paths": list(paths), "buckets": buckets, "remap": remap,
            "categories": categories}


def _read(out: Path, b: int) -> dict:
    with pa.OSFile(str(_file(out, b))) as fh:
        table = pa.ipc.open_file(fh).read_all()
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _check_duplicates(out: Path, buckets: list[int], paths: list[Path]) -> None:
    """kuairand._read_side's error, one bucket at a time: an id's rows all land in one bucket
    and the buckets are id ranges, so the first bucket with a duplicate has the smallest."""
    n, example = 0, None
    for b in buckets:
        with pa.OSFile(str(_file(out, b))) as fh:
            ids = pa.ipc.open_file(fh).read_all().column(KEY).to_numpy()
        uniq, counts = np.unique(ids, return_counts=True)
        n += int((counts > 1).sum())
        if example is None and (counts > 1).any():
            example = uniq[counts > 1][0]
    if n:
        raise DataError(f"{n} duplicated id(s) (e.g. {example}); expected one row per {KEY}", path=paths[0], column=KEY)


def _table(data: dict) -> pa.Table:
    return pa.table({c: pa.array(v, type=pa.string()) if v.dtype == object else v for c, v in data.items()})


def load(out: Path, info: dict, videos: np.ndarray, own: Path | None = None) -> dict:
    """The side rows of ``videos`` as ``kuairand.load_side`` gives them (global codes and
    categories), read one bucket at a time -- or, from ``own`` if it exists, the rows an
    earlier call kept there (one shard's videos); else they are kept there."""
    columns = info["columns"]
    kept: dict[str, list[np.ndarray]] = {c: [] for c in [KEY, BLOCK, *columns]}
    reuse = own is not None and _file(own, 0).is_file()
    wanted = pd.Index(pd.unique(np.asarray(videos)))  # a hash lookup: 10x np.isin's sort on 1 M ids
    for b in [0] if reuse else info["buckets"]:
        data = _read(own if reuse else out, b)
        keep = wanted.get_indexer(data[KEY]) >= 0
        for c in kept:
            kept[c].append(data[c][keep])
        del data
    data = {c: (np.concatenate(v) if v else np.zeros(0, np.int64 if c in (KEY, BLOCK) or c in info["remap"] else np.float64))
            for c, v in kept.items()}
    if own is not None and not reuse:
        with pa.OSFile(str(_file(own, 0)), "wb") as fh, pa.ipc.new_file(fh, _table(data).schema) as writer:
            writer.write_table(_table(data))
    side = {"key": KEY, "paths": info["paths"], "columns": columns, "index": pd.Index(data[KEY].astype(np.int64))}
    block = data[BLOCK].astype(np.int64)
    for c in columns:
        if c in info["remap"]:
            global_codes, offsets = info["remap"][c]
            local = data[c].astype(np.int64)
            at = np.where(local >= 0, offsets[block] + local, -1) if len(local) else local
            side[c] = (kr.take_or(global_codes, at, -1).astype(np.int32), info["categories"][c])
        else:
            side[c] = data[c]
    return side
