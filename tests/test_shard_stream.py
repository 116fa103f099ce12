"""Training from a sharded prepare (rmtl.data.shard_stream): each process streams its own
shards; metrics over 2 ranks' shards equal one process's over the whole log.

Small synthetic KuaiRand release (150 users, ~6 k rows), tiny MMoE, one spawn of 2 gloo
processes for the distributed cases.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spawned import exit_now  # noqa: E402
from test_distributed import RecordGradients  # noqa: E402
from test_shard_pipeline import check_two_process_pipeline, pipeline_from_shards  # noqa: E402
from test_train import small_cfg  # noqa: E402

from rmtl import checkpoint as ckpt  # noqa: E402
from rmtl.backbones import build  # noqa: E402
from rmtl.callbacks import Callback  # noqa: E402
from rmtl.data.batches import gather_batch  # noqa: E402
from rmtl.cli import main  # noqa: E402
from rmtl.config import save_config  # noqa: E402
from rmtl.data.batches import BatchIterator  # noqa: E402
from rmtl.data.shard_stream import ShardSource, evaluate_gathered, gather_predictions  # noqa: E402
from rmtl.data.shards import load_log, rank_files  # noqa: E402
from rmtl.errors import ConfigError  # noqa: E402
from rmtl.predict import evaluate, predict  # noqa: E402
from rmtl.train import fit  # noqa: E402

COMMON = ["model.options.dropout=0", "train.batch_size=64", "train.epochs=2", "train.eval_every=20",
          "train.patience=null"]
# The same weights predict the same rows up to the last float32 bit (the kernels depend on
# where an array starts in memory: a split view of the whole log vs a rank's own array), and
# a flipped near-tie moves AUC / GAUC by ~1e-5 on these few thousand rows. Missing or
# duplicated rows move them by ~1e-2.
METRIC_ATOL = 1e-4


def _epoch_rows(stream) -> np.ndarray:
    """Every train row one epoch of the stream reads (before the step cap), global ids."""
    return np.concatenate([b["row"] for b in stream._buffers()])


def test_each_rank_streams_its_own_train_rows_once_per_epoch(shard_entries):
    path, _ = shard_entries
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


def test_one_shard_stream_equals_the_in_memory_batches_and_training(shard_entries, tmp_path):
    """One shard of one row group, buffer > train rows: the same permutation of the same
    rows as BatchIterator, so fitting from the shards ends at the in-memory fit's weights."""
    _, one = shard_entries
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


def test_resume_from_shards_is_bit_exact(shard_entries, tmp_path):
    """Cut at step 40 of a 62-step epoch, resumed past the epoch end: the straight run's weights."""
    path, _ = shard_entries
    base = ["model.options.dropout=0.1", "train.batch_size=64", "train.patience=null", f"data.shards={path}"]
    fit(small_cfg(tmp_path, *base, "train.max_steps=40"), run_dir=tmp_path / "cut")
    resumed = fit(small_cfg(tmp_path, *base, "train.max_steps=90"), run_dir=tmp_path / "cut", resume=True)
    straight = fit(small_cfg(tmp_path, *base, "train.max_steps=90"), run_dir=tmp_path / "straight")
    assert resumed.steps == straight.steps == 90 and resumed.epochs == 1
    a = ckpt.load_user_file(tmp_path / "cut" / "train" / "last.pt", "test")["model"]
    b = ckpt.load_user_file(tmp_path / "straight" / "train" / "last.pt", "test")["model"]
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


ONE_TO_TWO = {**GRAD_CASES, "uw": ["strategy.name=uw"]}
CUT1 = 8  # steps of the 1-process runs before they are cut (an epoch has 15, its last of 1 row)
CUT = 40  # steps of the 2-process run before it is cut (an epoch has 59)


DWA_CUT = 80  # in the second of DWA's 3 epochs: its weights at epoch 2 read epoch 1's mean losses


def _dwa_cfg(root: Path, path, *extra):
    return small_cfg(root, *COMMON, "strategy.name=dwa", "train.epochs=3", "train.eval_every=null",
                     f"data.shards={path}", *extra)


def _one_to_two_batch(one) -> int:
    """A global batch whose every epoch ends with ONE row on the one-shard entry: split over
    2 processes, one of them has no rows in that step (the share-0 case)."""
    n = ShardSource.open(one).rows("train")
    fits = [b for b in range(64, n // 4) if n % b == 1]
    assert fits, n
    return fits[0]


def _one_to_two_cfg(root: Path, one, name: str, *extra):
    return small_cfg(root, *COMMON, *ONE_TO_TWO[name], f"data.shards={one}",
                     f"train.batch_size={_one_to_two_batch(one)}", "train.eval_every=null", *extra)


def _worker(rank: int, world: int, init_file: str, root: str, path: str, one: str) -> None:
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
        out["to_rank0"] = gather_predictions(model, src.split("val"), dst=0)  # what the evaluation gathers
        out["local_val_rows"] = src.split("val").num_rows
        # a 2-process run cut mid-epoch, by the CLI (resumed by ONE process in the test below) ...
        code = main(["train", "-c", str(Path(root) / "cli.yaml"), "--shards", path, "--run-dir",
                     str(Path(root) / "cut2"), f"train.max_steps={CUT}", "--no-progress"])
        assert code == 0
        # DWA over 3 epochs, straight and cut in epoch 1 (its epoch loss sums are in last.pt)
        for tag, extra in (("dwa", []), ("dwa-cut", [f"train.max_steps={DWA_CUT}"])):
            fit(_dwa_cfg(Path(root), path, *extra), run_dir=Path(root) / tag)
        # ... and 1-process runs of the one-shard entry (cut by the fixture), resumed by 2
        for name in ONE_TO_TWO:
            fit(_one_to_two_cfg(Path(root), one, name), run_dir=Path(root) / f"cut1-{name}", resume=True)
        out["pipeline"] = pipeline_from_shards(path, Path(root) / "pipeline2")  # tests/test_shard_pipeline.py
        torch.save(out, Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_now()


@pytest.fixture(scope="module")
def two_ranks(shard_entries, tmp_path_factory):
    path, one = shard_entries
    root = tmp_path_factory.mktemp("ddp_shards")
    save_config(small_cfg(root, *COMMON), root / "cli.yaml")  # the "ddp" run's config, for `rmtl train -c`
    for name in ONE_TO_TWO:  # one process, cut after CUT1 steps; the 2-process spawn resumes them
        fit(_one_to_two_cfg(root, one, name, f"train.max_steps={CUT1}"), run_dir=root / f"cut1-{name}")
    mp.spawn(_worker, args=(2, str(root / "init"), str(root), str(path), str(one)), nprocs=2, join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_process_sharded_pipeline_equals_one_process_running_both_streams(shard_entries, two_ranks, tmp_path):
    """(rmtl pipeline from shards: the run of the spawn above; the checks in test_shard_pipeline.py)"""
    root, outs = two_ranks
    check_two_process_pipeline(shard_entries[0], root / "pipeline2", [o["pipeline"] for o in outs], tmp_path / "one")


def test_metrics_from_two_ranks_shards_equal_one_process(shard_entries, two_ranks):
    path, _ = shard_entries
    _, outs = two_ranks
    full = load_log(path)
    torch.manual_seed(0)
    model = build("mmoe", full.spec, embed_dim=8, num_experts=3, expert_dims=[32], tower_dims=[16])
    assert 0 < outs[0]["local_val_rows"] < full.split("val").num_rows
    assert outs[1]["to_rank0"] is None  # the evaluation's rows go to rank 0 only
    for key, value in outs[0]["gathered"]["val"].items():
        np.testing.assert_array_equal(outs[0]["to_rank0"][key], value)
    for split in ("val", "test"):
        ref = evaluate(model, full.split(split))
        for out in outs:
            _assert_same_rows(out["gathered"][split], full, split, predict(model, full.split(split)))
            for task, mets in ref.items():
                for name, value in mets.items():
                    got = out["eval"][split][task][name]
                    assert got == pytest.approx(value, abs=METRIC_ATOL), (split, task, name)


def test_two_process_shard_training_runs_equal_steps_and_writes_one_set(shard_entries, two_ranks):
    path, _ = shard_entries
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
def test_two_rank_shard_gradients_equal_one_process_on_the_union_batch(shard_entries, two_ranks, tmp_path, name):
    """Each step's reduced gradient = one process's on the two local batches together, the
    last step included (there the smaller rank has fewer rows: its share is smaller)."""
    path, _ = shard_entries
    _, outs = two_ranks
    stream = ShardSource.open(path, 1, 2).train_stream(64)
    assert stream.step_rows(len(stream) - 1).tolist()[0] != stream.step_rows(len(stream) - 1).tolist()[1]
    single = _grad_run(tmp_path, name, prepared=load_log(path), callbacks=[UseUnionBatches(path)])
    assert single.shape[0] == outs[0]["grads"][name].shape[0] == len(stream)
    for out in outs:
        torch.testing.assert_close(out["grads"][name], single, rtol=1e-4, atol=1e-6)


def test_bad_shards_folder_exits_2_and_leaves_nothing(shard_entries, tmp_path, capsys):
    path, _ = shard_entries
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing", path.parent):
        code = main(["train", "-c", "quickstart", "--shards", str(bad), f"run_dir={tmp_path / 'run'}",
                     "--no-progress"])
        out, err = capsys.readouterr()
        err = err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and "meta.json" in err[0] and str(bad) in err[0]
        assert out == ""  # checked before the run dir is made and announced
        assert not (tmp_path / "run").exists()


def test_loading_a_sharded_entry_whole_is_refused_with_the_commands_that_read_it(shard_entries):
    """(Every command that starts a run reads data.shards -- tests/test_shard_pipeline.py for
    pipeline, agent and compare; load_data, which would load the whole log, refuses it.)"""
    from rmtl.config import DataConfig
    from rmtl.train import load_data

    path, _ = shard_entries
    with pytest.raises(ConfigError, match="data.shards .*`rmtl pipeline`.*`rmtl compare`"):
        load_data(DataConfig(source="kuairand", shards=str(path)))


# ----------------------------------------------------------------------------- another process count

def test_the_global_batches_do_not_depend_on_the_process_count(shard_entries):
    """Streams fixed, processes varied: at every step the ranks' rows, concatenated in rank
    order, are the global batch of one process running all streams; each rank reads only
    its streams' shards."""
    four, one = shard_entries
    for path, streams in ((four, 2), (four, 4), (one, 1)):
        ref = ShardSource.open(path, 0, 1).train_stream(64, seed=4, buffer_rows=300, streams=streams)
        for world in (1, 2, 3, 4):
            streams_of = []
            for epoch in (0, 1):
                ref.set_epoch(epoch)
                runs = []
                for r in range(world):
                    stream = ShardSource.open(path, r, world).train_stream(64, seed=4, buffer_rows=300,
                                                                           streams=streams)
                    stream.set_epoch(epoch)
                    assert len(stream) == len(ref)
                    runs.append([(b.rows.numpy(), _share()) for b in stream])
                    streams_of.append(stream.mine)
                for t, batch in enumerate(ref):
                    parts = [run[t] for run in runs]
                    joined = np.concatenate([p[0] for p in parts])
                    np.testing.assert_array_equal(joined, batch.rows.numpy())
                    assert sum(p[1] for p in parts) == pytest.approx(1.0)
                    for rows, share in parts:
                        assert share == len(rows) / len(batch)
            mine = [s for ms in streams_of[:world] for s in ms]  # every stream read, once when W <= S
            assert mine == list(range(streams)) if world <= streams else sorted(set(mine)) == list(range(streams))


def _share() -> float:
    from rmtl import distributed

    return distributed.current_share()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


RESUME_ATOL = 1e-5  # float32 sums in another order (one mean vs share-weighted halves); measured <= 6e-7


def test_a_two_process_shard_run_resumed_by_one_process_ends_at_the_uninterrupted_weights(shard_entries, two_ranks,
                                                                                           tmp_path):
    path, _ = shard_entries
    root, outs = two_ranks
    cut = ckpt.load_user_file(root / "cut2" / "train" / "last.pt", "test")
    assert cut["loop"]["step"] == CUT and cut["callbacks"]["shard_streams"] == {"streams": 2}
    shutil.copytree(root / "cut2", tmp_path / "cut2")
    code = main(["train", "--resume", "--run-dir", str(tmp_path / "cut2"), "train.max_steps=null", "--no-progress"])
    assert code == 0  # `rmtl train --resume` in one process, config.yaml (with data.shards) from the run dir
    a = ckpt.load_user_file(tmp_path / "cut2" / "train" / "last.pt", "test")
    b = ckpt.load_user_file(root / "ddp" / "train" / "last.pt", "test")
    assert a["loop"]["step"] == b["loop"]["step"] and a["loop"]["epoch"] == b["loop"]["epoch"] == 2
    assert a["callbacks"]["shard_streams"] == {"streams": 2}  # the layout stays the run's
    assert _max_diff(a["model"], b["model"]) < RESUME_ATOL
    # the test metrics of the best weights agree too (the same rows, nearly the same weights)
    resumed = json.loads((tmp_path / "cut2" / "train" / "metrics.json").read_text())
    assert resumed["steps"] == outs[0]["steps"]
    for task, mets in outs[0]["metrics"]["test"].items():
        assert resumed["test"][task]["auc"] == pytest.approx(mets["auc"], abs=1e-3)


@pytest.mark.parametrize("name", list(ONE_TO_TWO))
def test_a_one_process_shard_run_resumed_by_two_processes_ends_at_the_uninterrupted_weights(
        shard_entries, two_ranks, tmp_path, name):
    """One stream shared by 2 processes (each reads the one shard, takes its half of every
    batch); every epoch's last batch has one row, so one process has none in that step (its
    share 0 must add exactly nothing: UW's own parameters get NaN gradients from a mean
    over no rows, which fails this test unless they are zeroed, not multiplied by 0)."""
    _, one = shard_entries
    root, _ = two_ranks
    n, batch = ShardSource.open(one).rows("train"), _one_to_two_batch(one)
    assert n % batch == 1
    straight = fit(_one_to_two_cfg(tmp_path, one, name), run_dir=tmp_path / "straight")
    a = ckpt.load_user_file(root / f"cut1-{name}" / "train" / "last.pt", "test")
    b = ckpt.load_user_file(tmp_path / "straight" / "train" / "last.pt", "test")
    assert a["loop"]["step"] == b["loop"]["step"] == straight.steps == 2 * -(-n // batch)
    assert a["callbacks"]["shard_streams"] == {"streams": 1}
    assert _max_diff(a["model"], b["model"]) < RESUME_ATOL


def test_a_dwa_shard_run_resumed_mid_epoch_by_one_process_keeps_the_epoch_losses(shard_entries, two_ranks, tmp_path):
    """last.pt holds the epoch's per-task loss sums over ALL processes (summed every step),
    so DWA's next weights are the uninterrupted run's; with rank 0's own partial sums (the
    earlier code) the resumed run's epoch-2 weights differ (checked: this test fails)."""
    path, _ = shard_entries
    root, _ = two_ranks
    shutil.copytree(root / "dwa-cut", tmp_path / "dwa-cut")
    cut = ckpt.load_user_file(tmp_path / "dwa-cut" / "train" / "last.pt", "test")
    assert cut["loop"]["step"] == DWA_CUT and cut["loop"]["epoch"] == 1
    assert cut["loop"]["epoch_rows"] == (DWA_CUT - 59) * 64  # both processes' rows (full steps)
    fit(_dwa_cfg(tmp_path, path), run_dir=tmp_path / "dwa-cut", resume=True)
    a = ckpt.load_user_file(tmp_path / "dwa-cut" / "train" / "last.pt", "test")
    b = ckpt.load_user_file(root / "dwa" / "train" / "last.pt", "test")
    assert a["loop"]["step"] == b["loop"]["step"] == 3 * 59
    torch.testing.assert_close(a["strategy"]["state_dict"]["history"], b["strategy"]["state_dict"]["history"],
                               rtol=1e-6, atol=0)  # the mean losses of epochs 1 and 2
    assert _max_diff(a["model"], b["model"]) < RESUME_ATOL


def test_one_process_with_two_streams_is_the_two_process_run(shard_entries, two_ranks, tmp_path):
    """data.shard_streams fixes the global batches up front: one process running both
    streams trains the 2-process run (up to float summation order)."""
    path, _ = shard_entries
    root, outs = two_ranks
    one = fit(small_cfg(tmp_path, *COMMON, f"data.shards={path}", "data.shard_streams=2"), run_dir=tmp_path / "s2")
    assert one.steps == outs[0]["steps"]
    a = ckpt.load_user_file(tmp_path / "s2" / "train" / "last.pt", "test")
    b = ckpt.load_user_file(root / "ddp" / "train" / "last.pt", "test")
    assert a["callbacks"]["shard_streams"] == {"streams": 2}
    assert _max_diff(a["model"], b["model"]) < 1e-4  # every one of 118 steps summed in another order: 6.1e-6 measured


def test_a_resume_that_asks_for_other_streams_is_refused(shard_entries, two_ranks, tmp_path):
    path, _ = shard_entries
    root, _ = two_ranks
    shutil.copytree(root / "cut2", tmp_path / "cut2")
    with pytest.raises(ConfigError, match="data.shard_streams 4 differs from the 2 streams"):
        fit(small_cfg(tmp_path, *COMMON, f"data.shards={path}", "data.shard_streams=4"), run_dir=tmp_path / "cut2",
            resume=True)
