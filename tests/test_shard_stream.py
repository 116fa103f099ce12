"""Training from a sharded prepare (rmtl.data.shard_stream): each process streams its own
shards; metrics over 2 ranks' shards equal one process's over the whole log.

Small synthetic KuaiRand release (150 users, ~6 k rows), tiny MMoE, one spawn of 2 gloo
processes for the distributed cases.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import RecordGradients  # noqa: E402
from test_train import small_cfg  # noqa: E402

from rmtl import checkpoint as ckpt  # noqa: E402
from rmtl.backbones import build  # noqa: E402
from rmtl.callbacks import Callback  # noqa: E402
from rmtl.data.batches import gather_batch  # noqa: E402
from rmtl.cli import main  # noqa: E402
from rmtl.data.batches import BatchIterator  # noqa: E402
from rmtl.data.shard_stream import ShardSource, evaluate_gathered, gather_predictions  # noqa: E402
from rmtl.data.shards import load_log, prepare_sharded, rank_files  # noqa: E402
from rmtl.data.synth_kuairand import write_kuairand  # noqa: E402
from rmtl.predict import evaluate, predict  # noqa: E402
from rmtl.train import fit  # noqa: E402

COMMON = ["model.options.dropout=0", "train.batch_size=64", "train.epochs=2", "train.eval_every=20",
          "train.patience=null"]
# The same weights predict the same rows up to the last float32 bit (the kernels depend on
# where an array starts in memory: a split view of the whole log vs a rank's own array), and
# a flipped near-tie moves AUC / GAUC by ~1e-5 on these few thousand rows. Missing or
# duplicated rows move them by ~1e-2.
METRIC_ATOL = 1e-4


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    root = tmp_path_factory.mktemp("krs")
    write_kuairand(root / "raw", users=150, items=400, seed=5)
    four = prepare_sharded(root / "raw", shards=4, cache_dir=root / "c4", workers=1)
    one = prepare_sharded(root / "raw", shards=1, cache_dir=root / "c1", workers=1)
    return four.path, one.path


def _epoch_rows(stream) -> np.ndarray:
    """Every train row one epoch of the stream reads (before the step cap), global ids."""
    return np.concatenate([b["row"] for b in stream._buffers()])


def test_each_rank_streams_its_own_train_rows_once_per_epoch(entries):
    path, _ = entries
    full = load_log(path)
    train_rows = np.arange(full.split("train").num_rows)  # train comes first: global ids 0..n-1
    seen = []
    for rank in range(2):
        src = ShardSource.open(path, rank, 2)
        stream = src.train_stream(64, seed=3, buffer_rows=200)
        assert stream.batch_size == 32
        rows = _epoch_rows(stream)
        mine = load_log(path, rank_files(src.meta, rank, 2))
        expected = np.sort(np.concatenate([np.flatnonzero(np.isin(full.user, mine.user))]))
        expected = expected[expected < len(train_rows)]
        assert len(rows) == len(np.unique(rows)) == src.rows("train") == len(expected)
        np.testing.assert_array_equal(np.sort(rows), expected)
        assert not np.array_equal(rows, np.sort(rows))  # shuffled
        # memory: a buffer holds < buffer_rows + one row group (here a whole shard) + one batch
        sizes = [len(b["row"]) for b in stream._buffers()]
        group = max(s["rows"] for s in src.meta["shards"])
        assert len(sizes) > 1 and max(sizes) < 200 + group + 32
        np.testing.assert_array_equal(_epoch_rows(stream), rows)  # deterministic under (seed, epoch)
        stream.set_epoch(1)
        assert not np.array_equal(_epoch_rows(stream), rows)
        stream.set_epoch(0)
        # the batches: the first len(stream) x local batch rows of that order, the features the log's
        batches = list(stream)
        assert len(batches) == len(stream) == min(-(-stream.counts // 32))
        got = np.concatenate([b.rows.numpy() for b in batches])
        np.testing.assert_array_equal(got, rows[:len(got)])
        assert len(rows) - len(got) == stream.dropped_rows()[rank]
        b = batches[0]
        np.testing.assert_array_equal(b.sparse.numpy(), full.sparse[b.rows.numpy()])
        np.testing.assert_array_equal(b.labels.numpy(), full.labels[b.rows.numpy()])
        np.testing.assert_array_equal(b.user.numpy(), full.user[b.rows.numpy()])
        seen.append(rows)
    assert not np.intersect1d(seen[0], seen[1]).size
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), train_rows)


def test_one_shard_stream_equals_the_in_memory_batches_and_training(entries, tmp_path):
    """One shard of one row group, buffer > train rows: the same permutation of the same
    rows as BatchIterator, so fitting from the shards ends at the in-memory fit's weights."""
    _, one = entries
    log = load_log(one)
    stream = ShardSource.open(one).train_stream(64, seed=0, buffer_rows=1 << 20)
    ref = BatchIterator(log.split("train"), 64, seed=0)
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        ref.set_epoch(epoch)
        pairs = list(zip(stream, ref, strict=True))
        for a, b in pairs:
            for name in ("rows", "sparse", "dense", "labels", "session", "user"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    cfg = small_cfg(tmp_path, *COMMON, f"data.shards={one}")
    sharded = fit(cfg, run_dir=tmp_path / "sharded")
    memory = fit(small_cfg(tmp_path, *COMMON), prepared=log, run_dir=tmp_path / "memory")
    assert sharded.steps == memory.steps == 2 * -(-log.split("train").num_rows // 64)
    for name in ("last.pt", "best.pt"):  # the same training, bit for bit
        a = ckpt.load_user_file(tmp_path / "sharded" / "train" / name, "test")["model"]
        b = ckpt.load_user_file(tmp_path / "memory" / "train" / name, "test")["model"]
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # and the same evaluation: the rows of one process's split in its order, the in-memory
    # model's probabilities (up to the last float32 bit, see METRIC_ATOL), the fit's metrics
    source = ShardSource.open(one)
    for split in ("val", "test"):
        got = gather_predictions(memory.model, source.split(split))
        _assert_same_rows(got, log, split, predict(memory.model, log.split(split)))
        assert sharded.metrics[split] == evaluate_gathered(memory.model, source.split(split))


def _assert_same_rows(got: dict, full, split: str, probs: np.ndarray) -> None:
    first, last = full.splits[split]
    lo, hi = full.session_ptr[first], full.session_ptr[last]
    np.testing.assert_array_equal(got["row"], np.arange(lo, hi))
    np.testing.assert_array_equal(got["labels"], full.labels[lo:hi])
    np.testing.assert_array_equal(got["user"], full.user[lo:hi])
    np.testing.assert_array_equal(got["session"], full.session_of_row()[lo:hi])
    np.testing.assert_allclose(got["probs"], probs, rtol=0, atol=1e-6)


GRAD_CASES = {"ew": ["strategy.name=ew"], "pcgrad": ["strategy.name=pcgrad"]}
ONE_EPOCH = ["model.options.dropout=0", "train.batch_size=64", "train.epochs=1", "train.patience=null"]


def _grad_run(root: Path, name: str, extra=(), prepared=None, callbacks=()) -> list:
    recorder = RecordGradients()
    fit(small_cfg(root, *ONE_EPOCH, *GRAD_CASES[name], *extra), prepared=prepared, run_dir=root / f"g-{name}",
        callbacks=[*callbacks, recorder])
    return torch.stack(recorder.steps)


def test_resume_from_shards_is_bit_exact(entries, tmp_path):
    """Cut at step 40 of a 62-step epoch, resumed past the epoch end: the straight run's weights."""
    path, _ = entries
    base = ["model.options.dropout=0.1", "train.batch_size=64", "train.patience=null", f"data.shards={path}"]
    fit(small_cfg(tmp_path, *base, "train.max_steps=40"), run_dir=tmp_path / "cut")
    resumed = fit(small_cfg(tmp_path, *base, "train.max_steps=90"), run_dir=tmp_path / "cut", resume=True)
    straight = fit(small_cfg(tmp_path, *base, "train.max_steps=90"), run_dir=tmp_path / "straight")
    assert resumed.steps == straight.steps == 90 and resumed.epochs == 1
    a = ckpt.load_user_file(tmp_path / "cut" / "train" / "last.pt", "test")["model"]
    b = ckpt.load_user_file(tmp_path / "straight" / "train" / "last.pt", "test")["model"]
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _worker(rank: int, world: int, init_file: str, root: str, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        out = {"grads": {name: _grad_run(Path(root), name, [f"data.shards={path}"]) for name in GRAD_CASES}}
        result = fit(small_cfg(Path(root), *COMMON, f"data.shards={path}"), run_dir=Path(root) / "ddp")
        out["steps"], out["metrics"] = result.steps, result.metrics
        out["weights"] = {k: v.clone() for k, v in result.model.state_dict().items()}
        torch.manual_seed(0)  # the same model on both ranks; each evaluates its own shards' rows
        src = ShardSource.open(path, rank, world)
        model = build("mmoe", src.spec, embed_dim=8, num_experts=3, expert_dims=[32], tower_dims=[16])
        out["eval"] = {s: evaluate_gathered(model, src.split(s)) for s in ("val", "test")}
        out["gathered"] = {s: gather_predictions(model, src.split(s)) for s in ("val", "test")}
        out["local_val_rows"] = src.split("val").num_rows
        torch.save(out, Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(entries, tmp_path_factory):
    path, _ = entries
    root = tmp_path_factory.mktemp("ddp_shards")
    mp.spawn(_worker, args=(2, str(root / "init"), str(root), str(path)), nprocs=2, join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_metrics_from_two_ranks_shards_equal_one_process(entries, two_ranks):
    path, _ = entries
    _, outs = two_ranks
    full = load_log(path)
    torch.manual_seed(0)
    model = build("mmoe", full.spec, embed_dim=8, num_experts=3, expert_dims=[32], tower_dims=[16])
    assert 0 < outs[0]["local_val_rows"] < full.split("val").num_rows
    for split in ("val", "test"):
        ref = evaluate(model, full.split(split))
        for out in outs:
            _assert_same_rows(out["gathered"][split], full, split, predict(model, full.split(split)))
            for task, mets in ref.items():
                for name, value in mets.items():
                    got = out["eval"][split][task][name]
                    assert got == pytest.approx(value, abs=METRIC_ATOL), (split, task, name)


def test_two_process_shard_training_runs_equal_steps_and_writes_one_set(entries, two_ranks):
    path, _ = entries
    root, outs = two_ranks
    counts = np.array([ShardSource.open(path, r, 2).rows("train") for r in range(2)])
    assert counts[0] != counts[1]  # the rule matters here: unequal ranks
    per_epoch = int(min(-(-counts // 32)))
    assert outs[0]["steps"] == outs[1]["steps"] == 2 * per_epoch
    assert outs[0]["metrics"] == outs[1]["metrics"]
    for key, value in outs[0]["weights"].items():
        torch.testing.assert_close(outs[1]["weights"][key], value, rtol=0, atol=0, msg=key)
    files = sorted(p.name for p in (root / "ddp" / "train").iterdir())
    assert [f for f in files if not f.startswith("events.")] == ["best.pt", "last.pt", "metrics.json"]
    assert sum(f.startswith("events.") for f in files) == 1
    last = ckpt.load_user_file(root / "ddp" / "train" / "last.pt", "test")
    assert last["loop"]["step"] == 2 * per_epoch


class UnionBatches:
    """One process's iterator: at step t, rank 0's then rank 1's local batch of the 2-process run."""

    def __init__(self, path, train_log):
        self.streams = [ShardSource.open(path, r, 2).train_stream(64, seed=0) for r in range(2)]
        self.train_log = train_log

    def set_epoch(self, epoch):
        for s in self.streams:
            s.set_epoch(epoch)

    def __len__(self):
        return len(self.streams[0])

    def __iter__(self):
        for parts in zip(*self.streams):
            yield gather_batch(self.train_log, torch.cat([p.rows for p in parts]).numpy())


class UseUnionBatches(Callback):
    name = "union_batches"

    def __init__(self, path):
        self.path = path

    def on_fit_start(self, trainer):
        trainer.iterator = UnionBatches(self.path, trainer.train_log)


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_two_rank_shard_gradients_equal_one_process_on_the_union_batch(entries, two_ranks, tmp_path, name):
    """Each step's reduced gradient = one process's on the two local batches together, the
    last step included (there the smaller rank has fewer rows: its share is smaller)."""
    path, _ = entries
    _, outs = two_ranks
    stream = ShardSource.open(path, 1, 2).train_stream(64)
    assert stream.step_rows(len(stream) - 1).tolist()[0] != stream.step_rows(len(stream) - 1).tolist()[1]
    single = _grad_run(tmp_path, name, prepared=load_log(path), callbacks=[UseUnionBatches(path)])
    assert single.shape[0] == outs[0]["grads"][name].shape[0] == len(stream)
    for out in outs:
        torch.testing.assert_close(out["grads"][name], single, rtol=1e-4, atol=1e-6)


def test_bad_shards_folder_exits_2_and_leaves_nothing(entries, tmp_path, capsys):
    path, _ = entries
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing", path.parent):
        code = main(["train", "-c", "quickstart", "--shards", str(bad), f"run_dir={tmp_path / 'run'}",
                     "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and "meta.json" in err[0] and str(bad) in err[0]
        assert not (tmp_path / "run").exists()


def test_commands_that_need_the_whole_log_refuse_data_shards(entries, tmp_path, capsys):
    path, _ = entries
    code = main(["pipeline", "-c", "quickstart", f"data.shards={path}", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.shards" in err[0]
    assert not (tmp_path / "run").exists()
