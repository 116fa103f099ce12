"""The training loop: learning, exact resume, atomic checkpoints, TensorBoard, `rmtl train` / `rmtl report`."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rmtl import checkpoint as ckpt
from rmtl.cli import main
from rmtl.config import load_config
from rmtl.data.sessionlog import SessionLog
from rmtl.data.spec import FeatureSpec
from rmtl.errors import DataError
from rmtl.report import read_scalars
from rmtl.train import evaluate, fit, predict

TASKS = ["ctr", "ctcvr"]


def tiny_log(n_sessions: int = 300, seed: int = 0) -> SessionLog:
    """Sessions of 3-7 rows; both labels depend on an item field and a dense feature."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 8, n_sessions)
    ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(ptr[-1])
    user = np.repeat(rng.integers(0, 60, n_sessions), lengths).astype(np.int64)
    item = rng.integers(1, 30, n).astype(np.int64)
    sparse = np.stack([user % 50 + 1, item, rng.integers(1, 6, n)], 1).astype(np.int64)
    dense = rng.standard_normal((n, 2)).astype(np.float32)
    item_effect = rng.standard_normal(31)[item]
    z1 = 1.5 * item_effect + dense[:, 0] - 1.0
    ctr = rng.random(n) < 1 / (1 + np.exp(-z1))
    z2 = z1 + dense[:, 1] - 0.5
    ctcvr = ctr & (rng.random(n) < 1 / (1 + np.exp(-z2)))
    spec = FeatureSpec(source="tiny", sparse_fields=["user_id", "item_id", "cat"], cardinalities=[51, 31, 6],
                       dense_fields=["d0", "d1"], tasks=TASKS, user_field="user_id", item_field="item_id")
    a, b = int(0.6 * n_sessions), int(0.8 * n_sessions)
    return SessionLog(spec=spec, session_ptr=ptr, user=user, item=item, time=np.arange(n, dtype=np.int64),
                      sparse=sparse, dense=dense, labels=np.stack([ctr, ctcvr], 1).astype(np.float32),
                      splits={"train": (0, a), "val": (a, b), "test": (b, n_sessions)})


@pytest.fixture(scope="module")
def log():
    return tiny_log()


def small_cfg(tmp_path, *extra):
    # fp32 (train.bf16=false): the equality tests compare float sums of one batch split with
    # another's; bf16 autocast (chosen automatically on CPUs with native bf16, e.g. AMX)
    # rounds each split differently, far beyond their tolerances
    return load_config(None, ["train.bf16=false",
        "model.name=mmoe", "model.options.embed_dim=8", "model.options.num_experts=3",
        "model.options.expert_dims=[32]", "model.options.tower_dims=[16]", "model.options.dropout=0.1",
        "train.batch_size=64", "train.lr=0.01", "train.log_every=5", "train.progress=false",
        "train.num_threads=1", f"run_dir={tmp_path}", *extra])


class UserBackbone(nn.Module):
    """A user's own module that does not subclass MultiTaskBackbone."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.emb = nn.Embedding(sum(spec.cardinalities), 8)
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(spec.cardinalities)[:-1]]))
        self.head = nn.Sequential(nn.Linear(8 * spec.num_sparse + spec.num_dense, 16), nn.ReLU(),
                                  nn.Linear(16, spec.num_tasks))

    def forward(self, sparse, dense):
        return self.head(torch.cat([self.emb(sparse + self.offsets).flatten(1), dense], 1))


def test_learns_better_than_constant(log, tmp_path):
    cfg = small_cfg(tmp_path, "train.epochs=20", "train.max_steps=120", "train.eval_every=40", "train.patience=null")
    result = fit(cfg, prepared=log)
    assert result.steps == 120
    for split in ("val", "test"):
        for task in TASKS:
            assert result.metrics[split][task]["auc"] > 0.7, (split, task, result.metrics[split][task])
    # constant predictor at the train base rate: the model's logloss must be lower
    base = log.split("train").labels.mean(0)
    test = log.split("test")
    for k, task in enumerate(TASKS):
        y = test.labels[:, k]
        const = -np.mean(y * np.log(base[k]) + (1 - y) * np.log(1 - base[k]))
        assert result.metrics["test"][task]["logloss"] < const
    # predict / evaluate agree with what fit reports, and the best checkpoint is loaded
    probs = predict(result.model, test, batch_size=100)
    assert probs.shape == (test.num_rows, 2) and ((probs > 0) & (probs < 1)).all()
    assert evaluate(result.model, test)["ctr"]["auc"] == pytest.approx(result.metrics["test"]["ctr"]["auc"])
    out = tmp_path / "train"
    assert {"last.pt", "best.pt", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    best = ckpt.load(result.best_checkpoint)
    assert best["step"] == result.best_step


def test_tensorboard_has_weights_losses_and_val(log, tmp_path):
    cfg = small_cfg(tmp_path, "train.max_steps=20", "train.eval_every=10", "strategy.name=uw")
    fit(cfg, prepared=log)
    scalars = read_scalars(tmp_path / "train", prefix="")
    for task in TASKS:
        assert len(scalars[f"weights/{task}"][0]) == 4  # every log_every=5 steps
        assert f"train/loss/{task}" in scalars
        assert f"val/{task}/auc" in scalars
        assert f"final/test/{task}/gauc" in scalars
        assert f"gates/{task}/expert_0" in scalars  # MMoE gate usage
    assert "val/mean_auc" in scalars


def test_user_module_and_early_stopping(log, tmp_path):
    cfg = small_cfg(tmp_path, "train.epochs=50", "train.eval_every=5", "train.patience=2", "train.lr=0.05")
    torch.manual_seed(0)
    result = fit(cfg, prepared=log, model=UserBackbone(log.spec))
    assert result.stopped_early and result.steps < 50 * 15
    # stopped at the second validation in a row without a better mean AUC
    assert result.best_step >= 5 and result.steps == result.best_step + 2 * 5
    assert result.metrics["val"]["ctr"]["auc"] > 0.6


def _weights(path):
    return ckpt.load(path)["model"]


def test_resume_after_kill_equals_uninterrupted(log, tmp_path):
    extra = ("train.epochs=3", "train.eval_every=7", "train.checkpoint_every=4", "strategy.name=uw",
             "train.patience=null")
    full = fit(small_cfg(tmp_path / "full", *extra), prepared=log)

    # a run killed at step 23 (mid-epoch; the last checkpoint is step 21)
    cfg = small_cfg(tmp_path / "killed", *extra)
    from rmtl.weighting import build_strategy

    strategy = build_strategy("uw", 2)
    inner = strategy.backward

    def dies_at_23(losses, model, **kw):
        if kw["context"]["step"] == 22:
            raise KeyboardInterrupt
        return inner(losses, model, **kw)

    strategy.backward = dies_at_23
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, prepared=log, strategy=strategy)
    assert ckpt.load(tmp_path / "killed" / "train" / "last.pt")["loop"]["step"] == 21

    resumed = fit(cfg, prepared=log, resume=True)
    assert resumed.steps == full.steps
    a, b = _weights(tmp_path / "full/train/last.pt"), _weights(tmp_path / "killed/train/last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ua = ckpt.load(tmp_path / "full/train/last.pt")["strategy"]["state_dict"]
    ub = ckpt.load(tmp_path / "killed/train/last.pt")["strategy"]["state_dict"]
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    assert resumed.metrics == full.metrics
    # TensorBoard shows one curve: what the killed run logged after its checkpoint is purged
    full_tb = read_scalars(tmp_path / "full" / "train")
    killed_tb = read_scalars(tmp_path / "killed" / "train")
    assert killed_tb["weights/ctr"] == full_tb["weights/ctr"]


def test_extending_a_finished_run(log, tmp_path):
    """max_steps 10 then resumed to 20 equals 20 at once (the stop falls on an evaluation)."""
    extra = ("train.eval_every=5", "train.patience=null")
    fit(small_cfg(tmp_path / "a", "train.max_steps=20", *extra), prepared=log)
    fit(small_cfg(tmp_path / "b", "train.max_steps=10", *extra), prepared=log)
    fit(small_cfg(tmp_path / "b", "train.max_steps=20", *extra), prepared=log, resume=True)
    a, b = _weights(tmp_path / "a/train/last.pt"), _weights(tmp_path / "b/train/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"step": 1}, path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(DataError, match="last.pt: cannot write .disk full"):  # the target named, one line
        ckpt.save_atomic({"step": 2}, path)
    assert ckpt.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_cli_train_and_report(tmp_path, capsys):
    runs = []
    for name in ("ew", "rlw"):
        run_dir = tmp_path / name
        # overrides on both sides of the options
        code = main(["train", "-c", "quickstart", f"strategy.name={name}", "--run-dir", str(run_dir), "--no-progress",
                     f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic.users=150", "data.synthetic.items=60",
                     "train.batch_size=128", "train.max_steps=12", "train.eval_every=6",
                     "train.log_every=3", "model.options.expert_dims=[16]", "train.num_threads=1"])
        assert code == 0
        assert load_config(run_dir / "config.yaml").strategy.name == name  # resolved config saved
        runs.append(str(run_dir))
    out = capsys.readouterr().out
    assert "ctcvr" in out and "auc" in out and "12 steps" in out

    png = tmp_path / "report.png"
    assert main(["report", *runs, "--out", str(png)]) == 0
    table = capsys.readouterr().out
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = table.splitlines()[0]
    assert "ew" in header and "rlw" in header
    assert "ctr session_logloss" in table and "ctcvr gauc" in table


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "-c", "quickstart", "train.lrr=1", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "did you mean train.lr" in err and "Traceback" not in err
    assert main(["train", "-c", "quickstart", "model.name=mmeo", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.name" in err and "unknown backbone 'mmeo'" in err and "mmoe" in err
    assert main(["train", "-c", "quickstart", "strategy.name=pcgard", "--run-dir", str(tmp_path)]) == 2
    assert "unknown strategy 'pcgard'" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_bf16_autocast_and_grad_clip_train(log, tmp_path):
    cfg = small_cfg(tmp_path, "train.max_steps=30", "train.eval_every=15", "train.bf16=true",
                    "train.grad_clip=1.0", "train.optimizer=adamw", "train.weight_decay=0.01")
    result = fit(cfg, prepared=log)
    assert result.steps == 30
    assert all(np.isfinite(m["logloss"]) for m in result.metrics["test"].values())
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast keeps fp32 weights


class PerSampleWeights(nn.Module):
    """A per-sample strategy (like the RMTL critic): weight 1 + label, returned as [B, K]."""

    def __init__(self):
        super().__init__()
        self.calls = 0  # plain state that last.pt keeps

    def backward(self, losses, model, *, shared=None, context=None):
        weights = 1.0 + context["batch"].labels
        (weights * losses).mean(0).sum().backward()
        self.calls += 1
        return weights

    def last_logs(self):
        return {"calls": float(self.calls)}


def test_per_sample_weights_histograms_and_mtl_gain(log, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = fit(load_config(None, ["model.name=singletask", "model.options.embed_dim=8", "train.max_steps=10",
                                  "train.eval_every=5", "train.batch_size=64", "train.progress=false",
                                  f"run_dir={tmp_path / 'single'}"]), prepared=log)
    cfg = small_cfg(tmp_path / "multi", "train.max_steps=10", "train.eval_every=5",
                    f"baseline_run={tmp_path / 'single'}")
    result = fit(cfg, prepared=log, strategy=PerSampleWeights())
    acc = EventAccumulator(str(tmp_path / "multi" / "train"))
    acc.Reload()
    assert {"weights_hist/ctr", "weights_hist/ctcvr"} <= set(acc.Tags()["histograms"])
    assert "strategy/calls" in acc.Tags()["scalars"]
    assert ckpt.load(tmp_path / "multi/train/last.pt")["strategy"]["plain"]["calls"] == 10
    gain = result.mtl_gain
    expected = (result.metrics["test"]["ctr"]["auc"] - base.metrics["test"]["ctr"]["auc"]) / base.metrics["test"]["ctr"]["auc"]
    assert gain["per_task"]["ctr"]["auc"] == pytest.approx(expected)
    import json
    assert json.loads((tmp_path / "multi/train/metrics.json").read_text())["mtl_gain"]["mean"] == pytest.approx(gain["mean"])


def test_single_task_model_trains_and_evaluates_its_own_column(log, tmp_path):
    """SingleTask built for one task predicts one column: the loop and the metrics use that
    task's labels only (here the second task, so a column mix-up would show)."""
    cfg = load_config(None, ["model.name=singletask", "model.options.embed_dim=8", "model.options.task=ctcvr",
                             "train.batch_size=64", "train.lr=0.01", "train.max_steps=60", "train.eval_every=30",
                             "train.patience=null", "train.progress=false", "train.num_threads=1",
                             f"run_dir={tmp_path}"])
    result = fit(cfg, prepared=log)
    assert set(result.metrics["test"]) == {"ctcvr"}
    assert result.metrics["test"]["ctcvr"]["auc"] > 0.7
    test = log.split("test")
    probs = predict(result.model, test)
    assert probs.shape == (test.num_rows, 1)
    assert evaluate(result.model, test)["ctcvr"]["auc"] == pytest.approx(result.metrics["test"]["ctcvr"]["auc"])


def test_gradnorm_resume_keeps_the_layer_it_found_on_a_plain_module(log, tmp_path):
    """GradNorm finds W of a plain nn.Module from its first batch; last.pt carries the name,
    so the resumed run measures the same W (not one rediscovered on another batch) and ends
    exactly where the uninterrupted run ends."""
    from rmtl.weighting import build_strategy

    extra = ("strategy.name=gradnorm", "train.max_steps=8", "train.eval_every=4", "train.patience=null")
    torch.manual_seed(0)
    straight = fit(small_cfg(tmp_path / "straight", *extra), prepared=log, model=UserBackbone(log.spec))
    torch.manual_seed(0)
    cfg = small_cfg(tmp_path / "cut", *extra, "train.max_steps=4")
    fit(cfg, prepared=log, model=UserBackbone(log.spec))
    last = tmp_path / "cut" / "train" / "last.pt"
    saved = ckpt.load(last)
    assert saved["strategy"]["plain"]["found_layer"] == "head.0.weight"  # the last shared matrix
    torch.manual_seed(0)
    strategy = build_strategy("gradnorm", 2)
    resumed = fit(small_cfg(tmp_path / "cut", *extra), prepared=log, model=UserBackbone(log.spec),
                  strategy=strategy, resume=True)
    assert strategy.found_layer == "head.0.weight" and resumed.steps == straight.steps == 8
    a = ckpt.load(last)
    b = ckpt.load(tmp_path / "straight" / "train" / "last.pt")
    for key in ("model", "strategy"):
        for name, value in b[key].items() if key == "model" else b[key]["state_dict"].items():
            assert torch.equal((a[key] if key == "model" else a[key]["state_dict"])[name], value), name
    # the carried name is what the resumed run uses: a checkpoint naming another shared layer keeps it
    saved["strategy"]["plain"]["found_layer"] = "emb.weight"
    ckpt.save_atomic(saved, last)
    strategy = build_strategy("gradnorm", 2)
    fit(small_cfg(tmp_path / "cut", *extra), prepared=log, model=UserBackbone(log.spec), strategy=strategy,
        resume=True)
    assert strategy.found_layer == "emb.weight"
