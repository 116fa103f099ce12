"""The user side file cut by user shard, for the sharded prepare (rmtl/data/shards.py).

``kuairand.load_side`` holds a side file's every row (4 B per sparse and 8 B per dense
column per id, plus its index): for the user file that grows with the log's users. Users
are partitioned into shards, and a shard's rows only ever look up its own users, so the
user file is streamed once (blocks of ``block_bytes``), cut by ``shard_of(user_id)`` and
written as one small Arrow file per shard; a worker loads only its shard's file, cut to
the users its rows hold (``load``: the cut ``load_sides`` makes, so duplicated ids of
users absent from the log are not an error there either). Each sparse column is coded
against ONE table of its distinct values grown in file order (``GlobalCodes``), so its
codes -- what the per-shard statistics exchange -- mean the same value in every shard.
(They may number the values differently from ``load_side``, whose table only holds the
values of the log's users; codes never leave the prepare: the vocabularies are written
as values, in order of first appearance in the log.) Memory in the main process: one
block and the columns' distinct values, not the users.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from rmtl.data import kuairand as kr
from rmtl.errors import DataError


class GlobalCodes:
    """pd.factorize of a column fed block by block: codes against one growing table of the
    distinct values in first-appearance order (missing -> -1)."""

    def __init__(self):
        self.index = pd.Index([])
        self.parts: list[np.ndarray] = []  # the new values of each block, in order

    def add(self, values: np.ndarray) -> np.ndarray:
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        uniques = np.asarray(uniques)
        at = self.index.get_indexer(uniques) if len(self.index) else np.full(len(uniques), -1, dtype=np.intp)
        new = at < 0
        if new.any():
            at[new] = len(self.index) + np.arange(int(new.sum()))
            self.parts.append(uniques[new])
            self.index = pd.Index(np.concatenate(self.parts))
        return kr.take_or(at.astype(np.int32), codes, -1)

    def result(self) -> pd.Index:
        return pd.Index(np.concatenate(self.parts)) if self.parts else pd.Index([])


def _file(out: Path, s: int) -> Path:
    return out / f"user-{s:05d}.arrow"


def split(paths: list[Path], columns: list[str], shard_of, out: Path, block_bytes: int) -> dict:
    """Stream the user side files into ``out/user-SSSSS.arrow`` (each sparse column as int32
    codes). Returns the sparse columns' distinct values (``categories``) -- what ``load``
    needs besides a shard's file."""
    key = "user_id"
    what = "KuaiRand user_features"
    sparse = [c for c in columns if c in kr.USER_SPARSE]
    coded = {c: GlobalCodes() for c in sparse}
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    try:
        for p in paths:
            for data, _ in kr.iter_csv(p, [key, *columns], what, block_bytes=block_bytes,
                                       check=lambda d, path, row: kr._require_values(d, [key], path, row)):
                ids = data[key].astype(np.int64)
                cols = {key: ids}
                for c in columns:
                    cols[c] = coded[c].add(data[c]) if c in coded else data[c]
                shard = shard_of(ids)
                append_by_group(writers, cols, shard, int(shard.max(initial=0)) + 1, lambda s: _file(out, s))
    finally:
        for w in writers.values():
            w.close()
    return {"columns": list(columns), "paths": list(paths), "categories": {c: coded[c].result() for c in sparse}}


def append_by_group(writers: dict, cols: dict, group: np.ndarray, groups: int, path_of) -> None:
    """Append the rows of ``cols`` (numpy or Arrow arrays) to one Arrow IPC file per value of
    ``group`` (0 .. ``groups`` - 1), keeping file order inside a group; ``writers`` maps a
    group to its open writer and gains the groups seen for the first time (``path_of(g)``)."""
    order = np.argsort(group, kind="stable")
    table = pa.table({c: v.take(order) if isinstance(v, pa.Array) else v[order] for c, v in cols.items()})
    bounds = np.searchsorted(group[order], np.arange(groups + 1))
    for g in np.flatnonzero(np.diff(bounds)).tolist():
        if g not in writers:
            writers[g] = pa.ipc.new_file(path_of(g), table.schema)
        writers[g].write_table(table.slice(bounds[g], bounds[g + 1] - bounds[g]))


def duplicates(ids) -> tuple[int, int | None]:
    """(number of ids listed more than once, the smallest of them) among one shard's side
    rows: an id's rows all land in its shard, so the shards' counts add up to the file's."""
    uniq, counts = np.unique(np.asarray(ids), return_counts=True)
    dup = uniq[counts > 1]
    return len(dup), (int(dup[0]) if len(dup) else None)


def duplicate_error(found: list[tuple[int, int | None]], paths: list[Path]) -> None:
    """The one reader's error for duplicated ids (kuairand._read_side), from every shard's count."""
    n = sum(k for k, _ in found)
    if n:
        example = min(e for k, e in found if k)
        raise DataError(f"{n} duplicated id(s) (e.g. {example}); expected one row per user_id", path=paths[0],
                        column="user_id")


def _read(out: Path, s: int) -> dict:
    with pa.OSFile(str(_file(out, s))) as fh:
        table = pa.ipc.open_file(fh).read_all()
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def load(out: Path, s: int, info: dict, users: np.ndarray | None = None) -> dict:
    """Shard ``s``'s side rows (of the ``users`` ids only, if given) as
    ``kuairand.load_side`` gives a whole file."""
    columns = info["columns"]
    if _file(out, s).is_file():
        data = _read(out, s)
    else:  # no user of this shard has a side row
        data = {"user_id": np.zeros(0, np.int64), **{c: np.zeros(0, np.int32 if c in info["categories"] else np.float64)
                                                     for c in columns}}
    if users is not None:
        keep = np.isin(data["user_id"], users)
        data = {c: v[keep] for c, v in data.items()}
    side = {"key": "user_id", "paths": info["paths"], "columns": columns, "index": pd.Index(data["user_id"])}
    for c in columns:
        side[c] = (data[c].astype(np.int32, copy=False), info["categories"][c]) if c in info["categories"] else data[c]
    return side
