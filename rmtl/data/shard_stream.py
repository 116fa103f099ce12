"""Training from a sharded prepare (rmtl.data.shards): each process streams its own shards.

    source = ShardSource.open(entry_dir, rank, world)         # meta.json + this rank's files
    stream = source.train_stream(global_batch, seed=0)        # Batches, lazily, row group by row group
    val = source.split("val")                                 # this rank's val rows, read at each evaluation

The batch rule (ShardStream): the train rows are cut into S **streams** (stream s reads
the shards ``rank_files(meta, s, S)``; every session has one reader), each yielding
batches of ``global_batch // S`` rows of its own sessions; the GLOBAL batch of a step is
the streams' batches together. S is ``data.shard_streams`` (default: the process count
of the run's first start), kept in last.pt, so the global batches do not depend on how
many processes train on them: with W = S processes each reads one stream (its own
shards, a local batch of global / W rows), with fewer each reads several whole streams,
with more several processes share one stream and split each of its batches. A run
resumed with another process count therefore continues the same global batches
(gradients equal up to float summation order). The steps per epoch are the minimum
over streams of ceil(train rows / stream batch), computed by every rank from meta.json
(the per-shard ``rows_by_split``) and checked with an all-reduce. A stream with more rows drops the tail of its shuffled epoch (different rows
every epoch); the last step may be short on the smallest stream, and each rank's share
of a step (its rows / the step's rows) follows from the same counts, so the gradient
all-reduce (rmtl.distributed) weights it right without a per-step message.

The shuffle, per stream, deterministic under (seed, epoch) for a fixed stream count: the
stream's shard files and each file's row groups in a seeded order, the rows in a buffer of about
``buffer_rows`` rows permuted before it is cut into batches (what is left over joins the
next buffer; every stream draws from the same (seed, epoch) generators, over its own rows).
Memory: per stream a process reads, one buffer plus one row group, whatever the data
size. With one shard of one row group and a buffer larger than the train split, the
batches are exactly rmtl.data.batches.BatchIterator's (the same permutation of the same rows).

Evaluation: each rank reads and predicts its own val / test rows row group by row group
at every evaluation, keeping only (row, labels, probabilities, session, user); these are
gathered to rank 0 and sorted by global row, so the metrics are those of one process over
all shards; rank 0 sends them to the others (``gather_predictions``, ``evaluate_gathered``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rmtl import distributed
from rmtl.callbacks import Callback
from rmtl.data.batches import Batch
from rmtl.data.sessionlog import SessionLog
from rmtl.data.shards import rank_files, read_meta
from rmtl.data.spec import FeatureSpec
from rmtl.errors import ConfigError, DataError

DEFAULT_BUFFER_ROWS = 1 << 18  # rows shuffled together: 4 row groups of a shard (shards.ROW_GROUP)


@dataclass
class ShardSource:
    path: Path
    meta: dict
    rank: int
    world: int

    @classmethod
    def open(cls, path, rank: int = 0, world: int = 1) -> "ShardSource":
        path = Path(path)
        meta = read_meta(path)  # DataError naming the folder when it is not a sharded entry
        for name in ("train", "val", "test"):
            if name not in meta.get("splits", {}):
                raise DataError(f"the sharded entry has no '{name}' split", path=path / "meta.json")
        return cls(path, meta, int(rank), int(world))

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec.from_dict(self.meta["spec"])

    def files(self, part: int | None = None, parts: int | None = None) -> list[str]:
        """The shard files of ``part`` of ``parts`` (default: this rank's of the world)."""
        return rank_files(self.meta, self.rank if part is None else part, self.world if parts is None else parts)

    def rows(self, split: str, part: int | None = None, parts: int | None = None) -> int:
        """Rows of ``split`` in a part's shards (default: this rank's; from meta.json, nothing read)."""
        mine = set(self.files(part, parts))
        return sum(int(s["rows_by_split"][split]) for s in self.meta["shards"] if s["file"] in mine)

    def row_offset(self, split: str) -> int:
        """Global index of the split's first row: the rows of the splits whose sessions come first."""
        start = self.meta["splits"][split][0]
        return sum(int(s["rows_by_split"][name]) for s in self.meta["shards"]
                   for name, (a, _) in self.meta["splits"].items() if a < start)

    def train_stream(self, global_batch: int, *, seed: int = 0, buffer_rows: int = DEFAULT_BUFFER_ROWS,
                     shuffle: bool = True, device="cpu", streams: int | None = None,
                     resuming: bool = False) -> "ShardStream":
        """This rank's train batches; ``streams``: how the train rows are cut (default: one
        stream per process, what a new run uses; ShardStream's doc). ``resuming``: the count
        comes from last.pt (StreamLayout), set before the first use; ``streams``, when given,
        must then equal it."""
        return ShardStream(self, global_batch, streams=streams, seed=seed, buffer_rows=buffer_rows,
                           shuffle=shuffle, device=device, resuming=resuming)

    def empty_log(self) -> SessionLog:
        """A SessionLog without rows (the spec and the three split names): what the Trainer is
        built with; its iterator and its val / test splits are then set by ``setup``."""
        spec, z = self.spec, np.zeros(0, dtype=np.int64)
        return SessionLog(spec=spec, session_ptr=np.zeros(1, dtype=np.int64), user=z, item=z, time=z,
                          sparse=np.zeros((0, spec.num_sparse), dtype=np.int64),
                          dense=np.zeros((0, spec.num_dense), dtype=np.float32),
                          labels=np.zeros((0, spec.num_tasks), dtype=np.float32),
                          splits={name: (0, 0) for name in self.meta["splits"]})

    def split(self, name: str) -> "ShardSplit":
        return ShardSplit(self, name)

    def chunks(self, split: str, rng=None, *, part: int | None = None, parts: int | None = None):
        """The rows of ``split`` in a part's shards (default: this rank's), one row group at a
        time (column arrays); files and row groups in file order, or in ``rng``'s order. Row
        groups whose session statistics show no session of the split are not read."""
        lo, hi = self.meta["splits"][split]
        files, names, spec = self.files(part, parts), _columns(self.spec), self.spec
        for f in (rng.permutation(len(files)) if rng is not None else range(len(files))):
            try:
                pf = pq.ParquetFile(self.path / files[f], memory_map=True)
                groups = [g for g in range(pf.num_row_groups) if _may_hold(pf, g, lo, hi)]
                for g in (rng.permutation(groups) if rng is not None else groups):
                    cols = _concat([pf.read_row_group(int(g), columns=names)], spec)
                    inside = (cols["session"] >= lo) & (cols["session"] < hi)
                    if not inside.all():
                        cols = _take(cols, inside)
                    if len(cols["row"]):
                        yield cols
            except (OSError, pa.ArrowException) as err:
                raise DataError(f"unreadable shard ({err}); prepare again", path=self.path / files[f]) from None


@dataclass
class ShardSplit:
    """The val or test rows of this rank's shards, read row group by row group at every
    evaluation (what the Trainer evaluates instead of an in-memory split)."""
    source: ShardSource
    name: str

    @property
    def spec(self) -> FeatureSpec:
        return self.source.spec

    @property
    def num_rows(self) -> int:
        return self.source.rows(self.name)


def _columns(spec: FeatureSpec) -> list[str]:
    return (["row", "session", "user"] + [f"s:{f}" for f in spec.sparse_fields]
            + [f"d:{f}" for f in spec.dense_fields] + [f"y:{t}" for t in spec.tasks])


def _concat(tables: list, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Column arrays of Arrow tables with the shard layout: sparse / dense / labels stacked."""
    table = pa.concat_tables(tables) if tables else None
    n = 0 if table is None else table.num_rows

    def col(name, dtype):
        return (np.zeros(0, dtype=dtype) if table is None
                else table.column(name).to_numpy().astype(dtype, copy=False))

    def block(prefix, names, dtype):
        if not names or table is None:
            return np.zeros((n, len(names)), dtype=dtype)
        return np.stack([col(f"{prefix}{c}", dtype) for c in names], axis=1)

    out = {k: col(k, np.int64) for k in ("row", "session", "user")}
    out["sparse"] = block("s:", spec.sparse_fields, np.int64)
    out["dense"] = block("d:", spec.dense_fields, np.float32)
    out["labels"] = block("y:", spec.tasks, np.float32)
    return out


def _take(cols: dict, index) -> dict:
    return {k: v[index] for k, v in cols.items()}


class ShardStream:
    """This rank's train Batches for the trainer (``set_epoch``, ``__len__``, ``__iter__``).

    The run's train rows are cut into ``streams`` (S) streams, defined without the process
    count: stream s reads ``rank_files(meta, s, S)`` in its seeded order and yields batches
    of ``global_batch // S`` rows; the GLOBAL batch of step t is stream 0's batch t, then
    stream 1's, ... S is ``data.shard_streams``, by default the process count of the run's
    first start. Process r of W (``assign``, contiguous blocks, so the ranks' rows in rank
    order are the global batch): with W <= S the streams [r S / W, (r + 1) S / W), whole (it
    reads only their shards); with W > S the stream floor(r S / W), shared with the other
    ranks given the same one, taking its contiguous part of each of that stream's batches.
    S is kept in last.pt (``StreamLayout``), so a run resumed with another process count
    trains on the same global batches. A step whose shared batch has fewer rows than its
    sharers (the last step of an epoch, only when W > S) gives some rank no rows: it still
    takes the step, with share 0 (its contribution to every all-reduce is zeroed).
    """

    def __init__(self, source: ShardSource, global_batch: int, *, streams: int | None, seed: int,
                 buffer_rows: int, shuffle: bool, device, resuming: bool = False):
        self.source, self.spec = source, source.spec
        self.global_batch = int(global_batch)
        self.seed, self.shuffle = int(seed), shuffle
        self.requested_buffer_rows = int(buffer_rows)
        self.device = torch.device(device)
        self.epoch = 0
        self.train_range = tuple(source.meta["splits"]["train"])
        self.row0 = source.row_offset("train")
        self.requested = streams  # the configured count (data.shard_streams); None: one per process
        self.streams = None  # resuming: set by StreamLayout from last.pt, else (an older last.pt) at first use
        if not resuming:
            self.set_streams(source.world if streams is None else streams)

    def _layout(self) -> None:
        if self.streams is None:
            self.set_streams(self.source.world if self.requested is None else self.requested)

    def set_streams(self, streams: int) -> None:
        """Lays the train rows out as ``streams`` streams (a resumed run: its saved count)."""
        streams, source = int(streams), self.source
        if not 1 <= streams <= len(source.meta["shards"]):
            raise DataError(f"cannot cut {len(source.meta['shards'])} shards into {streams} streams", path=source.path)
        distributed.check_global_batch(self.global_batch, "train.batch_size", max(streams, source.world))
        self.streams = streams
        self.batch_size = self.global_batch // streams  # each stream's batch (the local one when W = S)
        self.buffer_rows = max(self.requested_buffer_rows, self.batch_size)
        self.counts = np.array([source.rows("train", s, streams) for s in range(streams)], dtype=np.int64)
        empty = np.flatnonzero(self.counts == 0)
        if len(empty):
            who = "process" if streams == source.world else "stream"
            raise DataError(f"{who} {int(empty[0])} of {streams} has no train rows in its shards "
                            f"({len(source.meta['shards'])} shards): prepare with more shards", path=source.path)
        self.steps = int(min(-(-self.counts // self.batch_size)))
        self.mine, self.part = assign(source.rank, source.world, streams)

    def check_agreement(self) -> None:
        """Every rank must run the same number of steps, or one would hang in a collective
        (a collective itself: call it on every rank, outside distributed.all_or_none)."""
        self._layout()
        got = distributed.sum_over_ranks([float(self.steps), float(self.steps) ** 2])
        w = self.source.world
        if got[0] * got[0] != got[1] * w:  # all equal iff (sum x)^2 = N sum x^2
            raise DataError("the processes disagree on the steps per epoch: do all read the same meta.json?",
                            path=self.source.path)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        self._layout()
        return self.steps

    def step_rows(self, step: int) -> np.ndarray:
        """Rows of every stream at ``step`` of an epoch (the global batch's, stream by stream)."""
        self._layout()
        return np.clip(self.counts - step * self.batch_size, 0, self.batch_size)

    def dropped_rows(self) -> np.ndarray:
        """Train rows each stream leaves out per epoch (the tail of its shuffled order)."""
        return self.counts - sum(self.step_rows(t) for t in range(self.steps))

    def __iter__(self):
        self._layout()
        gens = [self._stream_batches(s) for s in self.mine]
        for step in range(self.steps):
            parts = [next(g) for g in gens]
            cols = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            if self.part is not None:  # this rank's contiguous part of a shared stream's batch
                cols = _take(cols, distributed.part_slice(len(cols["row"]), *self.part))
            distributed.set_share(float(len(cols["row"])) / float(self.step_rows(step).sum()))
            yield self._batch(cols)

    def _stream_batches(self, stream: int):
        """Stream ``stream``'s batches of this epoch, the last one possibly short (ceil(its
        rows / batch) of them: at least ``steps``)."""
        for cols in self._buffers(stream):
            for lo in range(0, len(cols["row"]), self.batch_size):
                yield _take(cols, slice(lo, lo + self.batch_size))

    def _buffers(self, stream: int | None = None):
        """Shuffled buffers of a stream's rows (default: this rank's first); every one but the
        last a multiple of the batch size."""
        stream = self.mine[0] if stream is None else stream
        order_rng = np.random.default_rng([self.seed, self.epoch, 1]) if self.shuffle else None
        buffer_rng = np.random.default_rng([self.seed, self.epoch])  # BatchIterator's, see the module doc
        pending, size = [], 0
        for cols in self.source.chunks("train", order_rng, part=stream, parts=self.streams):
            pending.append(cols)
            size += len(cols["row"])
            if size >= self.buffer_rows:
                buf = self._mix(pending, buffer_rng)
                full = (size // self.batch_size) * self.batch_size
                yield _take(buf, slice(0, full))
                pending, size = [_take(buf, slice(full, size))], size - full
        if size:
            yield self._mix(pending, buffer_rng)

    def _mix(self, parts: list, rng) -> dict:
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if self.shuffle:
            cols = _take(cols, rng.permutation(len(cols["row"])))
        return cols

    def _batch(self, cols: dict) -> Batch:
        batch = Batch(rows=torch.from_numpy(cols["row"] - self.row0), sparse=torch.from_numpy(cols["sparse"]),
                      dense=torch.from_numpy(cols["dense"]), labels=torch.from_numpy(cols["labels"]),
                      session=torch.from_numpy(cols["session"] - self.train_range[0]),
                      user=torch.from_numpy(cols["user"]))
        return batch if self.device.type == "cpu" else batch.to(self.device)


def assign(rank: int, world: int, streams: int) -> tuple[list[int], tuple[int, int] | None]:
    """(the streams process ``rank`` of ``world`` reads, None or (its index among the ranks
    sharing its one stream, their number)), in contiguous blocks so that the ranks' rows in
    rank order are the global batch: W <= S: streams [r S / W, (r + 1) S / W) whole; W > S:
    stream r S / W (rounded down), shared by the ranks with the same one."""
    if world <= streams:
        return list(range(rank * streams // world, (rank + 1) * streams // world)), None
    stream = rank * streams // world
    sharers = [r for r in range(world) if r * streams // world == stream]
    return [stream], (rank - sharers[0], len(sharers))


class StreamLayout(Callback):
    """Keeps the stream count in last.pt and lays a resumed run's stream out with it (before
    the trainer counts its steps), so any process count continues the same global batches.
    A last.pt without it (older runs) resumes with the current process count."""

    name = "shard_streams"

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def state_dict(self) -> dict:
        self.stream._layout()
        return {"streams": self.stream.streams}

    def load_state_dict(self, state: dict) -> None:
        saved, asked = int(state["streams"]), self.stream.requested
        if asked is not None and asked != saved:
            raise ConfigError(f"data.shard_streams {asked} differs from the {saved} streams this run was "
                              "started with (its last.pt): drop the key to resume", key="data.shard_streams")
        self.stream.set_streams(saved)

    def on_fit_start(self, trainer) -> None:
        self.stream.check_agreement()  # every rank, after a resume has set the layout


def _may_hold(pf, group: int, lo: int, hi: int) -> bool:
    """False when the row group's session statistics prove it holds no session of [lo, hi)."""
    meta = pf.metadata.row_group(group)
    for c in range(meta.num_columns):
        col = meta.column(c)
        if col.path_in_schema == "session" and col.statistics is not None and col.statistics.has_min_max:
            return col.statistics.max >= lo and col.statistics.min < hi
    return True


def gather_predictions(model, split: ShardSplit, batch_size: int = 8192, *,
                       dst: int | None = None) -> dict[str, np.ndarray] | None:
    """Every rank's rows of a split with the model's probabilities: ``row`` (global), ``labels``
    and ``probs`` [N, K] (the model's task columns), ``session`` (global) and ``user``, from all
    ranks, sorted by global row: one process's order over all shards. Each rank reads and
    predicts its own rows row group by row group and keeps only these columns. ``dst``: only
    that rank gets them (the others None); None: every rank."""
    from rmtl.predict import predict_arrays, task_columns

    cols = task_columns(model, split.spec.num_tasks)
    parts = {k: [] for k in ("row", "labels", "probs", "session", "user")}
    for chunk in split.source.chunks(split.name):
        parts["probs"].append(predict_arrays(model, chunk["sparse"], chunk["dense"], batch_size))
        parts["labels"].append(chunk["labels"][:, cols])
        for k in ("row", "session", "user"):
            parts[k].append(chunk[k])
    empty = {"row": np.zeros(0, np.int64), "session": np.zeros(0, np.int64), "user": np.zeros(0, np.int64),
             "labels": np.zeros((0, len(cols)), np.float32), "probs": np.zeros((0, len(cols)), np.float32)}
    mine = {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}
    every = distributed.all_gather_objects(mine) if dst is None else distributed.gather_objects(mine, dst)
    if every is None:
        return None
    out = {k: np.concatenate([m[k] for m in every]) for k in mine}
    return _take(out, np.argsort(out["row"], kind="stable"))


def evaluate_gathered(model, split: ShardSplit, batch_size: int = 8192, *, predictor=None) -> dict:
    """Metrics of the model over every rank's rows of a split (gather_predictions), the
    numbers of one process over all shards: the rows are gathered to rank 0 only, which
    computes the metrics and sends them to the others (every rank needs them: best-score
    tracking, the fit's result). ``predictor`` is ignored (the Trainer's call)."""
    from rmtl.metrics import evaluate_predictions
    from rmtl.predict import task_columns

    got = gather_predictions(model, split, batch_size, dst=0)
    metrics = None
    if got is not None:
        tasks = [split.spec.tasks[c] for c in task_columns(model, split.spec.num_tasks)]
        metrics = evaluate_predictions(got["labels"], got["probs"], got["session"], got["user"], tasks)
    return distributed.from_rank0(metrics)


def setup(trainer, stream: ShardStream) -> None:
    """A Trainer that trains on ``stream`` and evaluates over all ranks' rows (plus, under
    torchrun, rmtl.distributed's gradient reducer and rank sync)."""
    trainer.iterator = stream
    trainer.val_log, trainer.test_log = stream.source.split("val"), stream.source.split("test")
    trainer.evaluator = evaluate_gathered
    trainer.callbacks.callbacks.append(StreamLayout(stream))
    distributed.add_callbacks(trainer)
