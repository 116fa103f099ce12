"""The Trainer's callback protocol: hook order, gradients at on_after_backward, rank-0-only
files, typed optional hooks, one TensorBoard axis across fits, hparams."""

from pathlib import Path

import pytest
import torch

from rmtl.backbones.base import HasAuxiliaryLoss, ReportsGateUsage, SharesRepresentation, SplitsParameters
from rmtl.callbacks import Callback, default_callbacks
from rmtl.config import load_config
from rmtl.report import read_scalars
from rmtl.train import build_model, fit
from rmtl.trainer import Trainer
from rmtl.weighting import build_strategy
from rmtl.weighting.base import EpochAware, LogsScalars

from test_train import UserBackbone, small_cfg, tiny_log


@pytest.fixture(scope="module")
def log():
    return tiny_log()


class Recorder(Callback):
    """Records every hook call and the gradient norm seen after each backward."""

    def __init__(self):
        self.calls = []
        self.grad_norms = []

    def _rec(name):
        def hook(self, trainer, *args):
            self.calls.append(name)
        return hook

    on_fit_start = _rec("fit_start")
    on_epoch_start = _rec("epoch_start")
    on_log = _rec("log")
    on_epoch_end = _rec("epoch_end")
    on_eval_end = _rec("eval_end")
    on_step_end = _rec("step_end")
    on_train_end = _rec("train_end")
    on_fit_end = _rec("fit_end")
    teardown = _rec("teardown")

    def on_after_backward(self, trainer):
        self.calls.append("after_backward")
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.stack([g.norm() for g in grads]).norm()))


def test_hooks_fire_in_order_and_see_gradients(log, tmp_path):
    rec = Recorder()
    cfg = small_cfg(tmp_path, "train.epochs=2", "train.patience=null")  # 2 epochs of 15 batches, eval per epoch
    result = fit(cfg, prepared=log, callbacks=[rec])
    c = rec.calls
    assert c[0] == "fit_start" and c[-3:] == ["train_end", "fit_end", "teardown"]
    assert c.count("epoch_start") == 2 and c.count("epoch_end") == 2 and c.count("eval_end") == 2
    assert c.count("after_backward") == c.count("step_end") == result.steps == 30
    assert c.count("log") == 30 // 5
    # within a step: backward first, step_end last; an epoch's end comes before its validation
    first_end = c.index("epoch_end")
    assert c[first_end + 1:first_end + 3] == ["eval_end", "step_end"]
    assert all(n > 0 for n in rec.grad_norms)


class ScaleGradients(Callback):
    """What a gradient reducer does in on_after_backward: rewrite .grad before the step."""

    def on_after_backward(self, trainer):
        for p in trainer.model.parameters():
            if p.grad is not None:
                p.grad.zero_()


def test_gradients_can_be_rewritten_before_the_step(log, tmp_path):
    cfg = small_cfg(tmp_path, "train.max_steps=3", "model.options.dropout=0.0")
    torch.manual_seed(0)
    model = build_model(cfg.model, log.spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(cfg, prepared=log, model=model, callbacks=[ScaleGradients()])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # zero gradients: Adam does not move


def test_only_rank_zero_writes_files(log, tmp_path):
    cfg = small_cfg(tmp_path, "train.max_steps=10", "train.eval_every=5")
    model = build_model(cfg.model, log.spec)
    out = tmp_path / "rank1"
    out.mkdir()
    trainer = Trainer(cfg.train, model, build_strategy("ew", 2), log, out_dir=out, seed=0,
                      callbacks=default_callbacks(cfg.train), config=cfg)
    trainer.rank = 1  # as under torch.distributed on a worker
    result = trainer.fit()
    assert result.steps == 10 and list(out.iterdir()) == []
    assert result.best_checkpoint is None


def test_typed_optional_hooks():
    spec = tiny_log(20).spec
    mmoe, aitm, user = build_model(load_config(None).model, spec), None, UserBackbone(spec)
    from rmtl import backbones

    aitm = backbones.build("aitm", spec)
    assert isinstance(mmoe, (SplitsParameters)) and isinstance(mmoe, SharesRepresentation)
    assert isinstance(mmoe, ReportsGateUsage) and not isinstance(mmoe, HasAuxiliaryLoss)
    assert isinstance(aitm, HasAuxiliaryLoss)
    assert not isinstance(user, (SplitsParameters, SharesRepresentation, ReportsGateUsage, HasAuxiliaryLoss))
    strategy = build_strategy("dwa", 2)
    assert isinstance(strategy, EpochAware) and isinstance(strategy, LogsScalars)


class DuckStrategy(torch.nn.Module):
    """A strategy that is not a Strategy subclass and has only backward()."""

    def backward(self, losses, model, *, shared=None, context=None):
        losses.mean(0).sum().backward()
        return torch.ones(losses.shape[1])


def test_duck_typed_strategy_without_optional_hooks(log, tmp_path):
    result = fit(small_cfg(tmp_path, "train.max_steps=12", "train.eval_every=6"), prepared=log,
                 strategy=DuckStrategy())
    assert result.steps == 12


def test_step_offset_continues_the_axis_and_hparams_are_written(log, tmp_path):
    cfg = small_cfg(tmp_path, "train.max_steps=10", "train.eval_every=5")
    first = fit(cfg, prepared=log, tag="pretrain")
    fit(cfg, prepared=log, model=first.model, tag="finetune", step_offset=first.steps)
    pre = read_scalars(tmp_path / "pretrain", prefix="")
    ft = read_scalars(tmp_path / "finetune", prefix="")
    assert pre["weights/ctr"][0] == [5, 10]
    assert ft["weights/ctr"][0] == [15, 20]  # continues where pretraining ended
    assert ft["val/mean_auc"][0] == [15, 20]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "finetune"))
    acc.Reload()
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins
    start = plugins["_hparams_/session_start_info"]
    assert b"model.name" in start and b"train.lr" in start
