"""One stream's train rows of a sharded entry as an in-memory SessionLog (the RMTL critics'
replay needs random access to its rows; a stream is a process's share, not the data).

    part = train_part(source, stream, streams)     # stream s of S: the shards rank_files(meta, s, S)
    part.log                                       # its train sessions, whole, in global order
    part.sessions, part.rows                       # global train-session / train-row index of each

Sessions never cross shards (users are partitioned by hash; a session is one user's), so a
part holds whole sessions: everything computed per session on it (next rows, session
context, the critics' transitions) is what the whole train split would give for those rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rmtl.callbacks import Callback
from rmtl.data.sessionlog import SessionLog
from rmtl.errors import DataError


@dataclass
class TrainPart:
    stream: int
    log: SessionLog  # the stream's train rows, one split "train"
    sessions: np.ndarray  # int64 [its sessions]: index among ALL train sessions (global session - train start)
    rows: np.ndarray  # int64 [its rows], increasing: index among ALL train rows (what ShardStream's Batch.rows holds)


def train_part(source, stream: int, streams: int) -> TrainPart:
    """Stream ``stream`` of ``streams``: the train rows of the shards ``rank_files(meta, stream,
    streams)``, read row group by row group (groups without a train session skipped)."""
    from rmtl.data.shard_stream import _may_hold

    spec, meta = source.spec, source.meta
    lo, hi = meta["splits"]["train"]
    names = (["row", "session", "user", "item", "time"] + [f"s:{f}" for f in spec.sparse_fields]
             + [f"d:{f}" for f in spec.dense_fields] + [f"y:{t}" for t in spec.tasks])
    tables = []
    for name in source.files(stream, streams):
        try:
            pf = pq.ParquetFile(source.path / name, memory_map=True)
            for g in range(pf.num_row_groups):
                if _may_hold(pf, g, lo, hi):
                    t = pf.read_row_group(g, columns=names)
                    s = t.column("session").to_numpy()
                    tables.append(t.filter(pa.array((s >= lo) & (s < hi))))
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"unreadable shard ({err}); prepare again", path=source.path / name) from None
    table = pa.concat_tables(tables) if tables else pq.read_schema(source.path / source.files(stream, streams)[0]
                                                                   ).empty_table().select(names)
    table = table.take(pa.array(np.argsort(table.column("row").to_numpy(), kind="stable")))
    n = table.num_rows
    session = table.column("session").to_numpy().astype(np.int64)
    uniq, lengths = np.unique(session, return_counts=True)
    ptr = np.zeros(len(uniq) + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])

    def col(name, dtype):
        return table.column(name).to_numpy().astype(dtype, copy=False)

    def block(prefix, fields, dtype):
        if not fields:
            return np.zeros((n, 0), dtype=dtype)
        return np.stack([col(f"{prefix}{c}", dtype) for c in fields], axis=1)

    log = SessionLog(spec=spec, session_ptr=ptr, user=col("user", np.int64), item=col("item", np.int64),
                     time=col("time", np.int64), sparse=block("s:", spec.sparse_fields, np.int64),
                     dense=block("d:", spec.dense_fields, np.float32), labels=block("y:", spec.tasks, np.float32),
                     splits={"train": (0, len(uniq))})
    return TrainPart(stream=int(stream), log=log, sessions=uniq - lo, rows=col("row", np.int64) - source.row_offset("train"))


def train_sessions(source) -> int:
    """How many train sessions the entry holds (what cross-fitting folds are drawn over)."""
    lo, hi = source.meta["splits"]["train"]
    return int(hi - lo)


class BindTrainParts(Callback):
    """A per-row strategy (the rmtl critic weights) fine-tuned from shards: at the fit's start
    (after a resume has laid the stream out) this process reads the train rows of the streams
    it trains on and hands them to ``strategy.bind_parts``, which keeps each row's weights'
    inputs (critic set, session context), not the rows."""

    name = "shard_train_rows"

    def __init__(self, strategy, stream, model=None):
        self.strategy, self.stream = strategy, stream
        # the class-mean weights (transform "label") are taken at the fit's START weights, as
        # bind_log takes them before a resume restores last.pt: a copy of them, kept until bound
        self.start = copy.deepcopy(model) if getattr(strategy, "transform", None) == "label" else None

    def on_fit_start(self, trainer) -> None:
        from rmtl import distributed

        stream = self.stream
        with distributed.all_or_none("reading the train shards"):
            stream._layout()
            parts = [train_part(stream.source, s, stream.streams) for s in stream.mine]
            counted = stream.part is None or stream.part[0] == 0  # a shared stream: its first process counts it
            self.strategy.bind_parts(parts, train_sessions(stream.source), self.start, counted)
        self.start = None
