"""The training loop as a Trainer whose ``fit`` reads top to bottom.

    trainer = Trainer(train_cfg, model, strategy, log, out_dir=..., callbacks=default_callbacks(train_cfg))
    result = trainer.fit()

One step: forward -> per-sample per-task BCE [B, K] (+ the model's auxiliary loss) ->
``strategy.backward`` -> ``on_after_backward`` -> clip -> optimizer step. Around the steps:
epoch ends (``strategy.epoch_end``), validation with best-score tracking, and the stop
decision. Everything else (bar, TensorBoard, checkpoints, early stopping, metrics.json)
is a callback (rmtl.callbacks), and the files of one fit live in ``out_dir``.
``rmtl.train.fit`` is the one-call API that builds all of this from a RunConfig.

Distributed training plugs in without changing this file: ``rank`` / ``world_size`` come
from torch.distributed when it is initialised, file-writing callbacks act only on rank 0,
``on_after_backward`` is where gradients are reduced, and ``iterator`` (any object with
``set_epoch``, ``__len__`` and ``__iter__`` yielding Batches) may be replaced by a sharded
one before ``fit``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rmtl import checkpoint as ckpt
from rmtl import distributed
from rmtl.backbones.base import HasAuxiliaryLoss, ReportsGateUsage, check_logits, forward_with_shared
from rmtl.callbacks import Callback, CallbackList, EvalOutput, StepOutput, TrainWindow
from rmtl.config import TrainConfig
from rmtl.data.batches import BatchIterator
from rmtl.data.sessionlog import SessionLog
from rmtl.errors import ConfigError, DataError
from rmtl.device import choose_bf16, keep_freed_memory
from rmtl.metrics import mean_metric, mtl_gain
from rmtl.optim import clip_grad_norm_, make_optimizer, row_sparse_enabled, row_sparse_gradients
from rmtl.predict import evaluate, predict, task_columns
from rmtl.weighting.base import EpochAware, LogsScalars


@dataclass
class TrainResult:
    model: nn.Module  # holds the best checkpoint's weights
    metrics: dict  # {"val": {task: {metric: v}}, "test": {...}}
    run_dir: Path  # the run's root folder
    best_checkpoint: Path | None
    out_dir: Path | None = None  # <run_dir>/<tag>
    steps: int = 0
    epochs: int = 0
    best_step: int = -1
    stopped_early: bool = False
    mtl_gain: dict | None = None


@dataclass
class LoopState:
    """Where the loop is; saved in last.pt so a resumed run continues exactly."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    stopped_early: bool = False
    last_eval_step: int = -1
    epoch_loss_sum: list = field(default_factory=list)  # per task, over all processes, for strategy.epoch_end
    epoch_rows: int = 0


class Trainer:
    """Trains ``model`` with ``strategy`` on ``log``'s train split, validating on val.

    ``config`` (optional) is the whole run config, kept for the callbacks (TensorBoard's
    hparams); ``baseline`` is a baseline run's metrics (its "test" gives the MTL gain);
    ``step_offset`` shifts the steps callbacks log (``global_step``) so consecutive fits
    share one axis, while ``state.step`` (what last.pt keeps) starts at 0 for every fit.
    """

    def __init__(self, train_cfg: TrainConfig, model: nn.Module, strategy: nn.Module, log: SessionLog, *,
                 out_dir: str | Path, device: torch.device | str = "cpu", seed: int = 0,
                 callbacks: Iterable[Callback] = (), tag: str = "train", step_offset: int = 0,
                 config: Any = None, baseline: dict | None = None, run_dir: str | Path | None = None):
        self.tc = train_cfg
        self.config = config
        self.tag = tag
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.run_dir = Path(run_dir) if run_dir is not None else self.out_dir.parent
        self.last_path, self.best_path = self.out_dir / "last.pt", self.out_dir / "best.pt"
        self.callbacks = CallbackList(callbacks)
        self.step_offset = int(step_offset)
        self.baseline = baseline
        self.rank, self.world_size = distributed.rank(), distributed.world_size()

        self.train_log, self.val_log, self.test_log = log.split("train"), log.split("val"), log.split("test")
        self.columns = task_columns(model, log.spec.num_tasks)
        self.all_columns = self.columns == list(range(log.spec.num_tasks))
        self.tasks = [log.spec.tasks[c] for c in self.columns]
        self.num_tasks = len(self.tasks)

        self.model = model.to(self.device)
        self.strategy = strategy.to(self.device)
        self.optimizer = make_optimizer(train_cfg, model, strategy)
        self.clip_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.bf16, self.precision_reason = choose_bf16(train_cfg.bf16, self.device)
        self.autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        # optional hooks, resolved once (typed protocols, not attribute probes in the hot loop)
        self.auxiliary_loss = model.auxiliary_loss if isinstance(model, HasAuxiliaryLoss) else None
        self.epoch_end_hook = strategy.epoch_end if isinstance(strategy, EpochAware) else None
        self.logs_hook = strategy.last_logs if isinstance(strategy, LogsScalars) else None
        self.reports_gates = isinstance(model, ReportsGateUsage)

        self.predictor = predict  # how val / test rows are predicted (rmtl.distributed shards them)
        self.evaluator = evaluate  # metrics of a split (rmtl.data.shard_stream gathers them over ranks)
        self.iterator = BatchIterator(self.train_log, train_cfg.batch_size, shuffle=True, seed=seed,
                                      device=self.device)
        self.state = LoopState(epoch_loss_sum=[0.0] * self.num_tasks)
        self.resumed = False
        self.should_stop = False
        self.best_checkpoint: Path | None = None  # set by the checkpoint callback when it restores best.pt

    # ------------------------------------------------------------------ what callbacks read
    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def global_step(self) -> int:
        return self.step_offset + self.state.step

    @property
    def batches_per_epoch(self) -> int:
        return len(self.iterator)

    @property
    def planned(self) -> int:
        planned = self.tc.epochs * self.batches_per_epoch
        return planned if self.tc.max_steps is None else min(planned, self.tc.max_steps)

    def request_stop(self, *, early: bool = False) -> None:
        """Ends the loop after the current step (``early``: counts as an early stop)."""
        self.should_stop = True
        if early:
            self.state.stopped_early = True

    # ------------------------------------------------------------------ the fit
    def fit(self, *, resume: bool = False) -> TrainResult:
        """Train (continuing from ``last.pt`` when ``resume``), then evaluate the best weights."""
        if resume:
            self.restore(self.last_path)
        self.should_stop = self.state.stopped_early or self.state.step >= self.planned
        memory = keep_freed_memory() if self.device.type == "cpu" else None  # see rmtl.device
        if self.is_main_process:  # one line, so a run's log says which precision it trained in
            print(f"[rmtl] {self.tag}: {'bf16 autocast' if self.bf16 else 'fp32'} ({self.precision_reason})"
                  + (f"; {memory}" if memory else ""), file=sys.stderr, flush=True)
        try:
            with row_sparse_gradients(self.model, row_sparse_enabled(self.tc)):  # lazy-Adam tables (rmtl.optim)
                self.callbacks.call("on_fit_start", self)
                self._window_start()
                while not self.should_stop and self.state.epoch < self.tc.epochs:
                    self.run_epoch()
                if self.state.last_eval_step != self.state.step and self.state.best_step < 0:
                    self.validate(scheduled=False)  # e.g. resumed a finished run that never validated
                self.callbacks.call("on_train_end", self)
                result = self.final_result()
                self.callbacks.call("on_fit_end", self, result)
        finally:
            self.callbacks.call("teardown", self)
        return result

    def run_epoch(self) -> None:
        st = self.state
        self.iterator.set_epoch(st.epoch)
        self.callbacks.call("on_epoch_start", self)
        for batch in islice(iter(self.iterator), st.batch_in_epoch, None):
            out = self.training_step(batch)
            self._account(out)
            if st.step % self.tc.log_every == 0:
                self._log_window(out.weights)
            out.epoch_done = st.batch_in_epoch >= self.batches_per_epoch
            if out.epoch_done:
                self.end_epoch()
            out.evaluated = self.validate_if_due(out.epoch_done)
            self.callbacks.call("on_step_end", self, out)
            if self.should_stop or out.epoch_done:
                break

    def training_step(self, batch) -> StepOutput:
        """Forward, per-sample per-task losses, the strategy's backward, optimizer step."""
        self.model.train()
        with self.autocast:
            logits, shared = forward_with_shared(self.model, batch.sparse, batch.dense)
        check_logits(logits, len(batch), self.num_tasks)
        labels = batch.labels if self.all_columns else batch.labels[:, self.columns]
        losses = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
        aux = self.auxiliary_loss() if self.auxiliary_loss is not None else None
        if aux is not None:  # e.g. AITM's calibration: spread over the task columns
            losses = losses + aux.float() / self.num_tasks
        self.optimizer.zero_grad(set_to_none=True)
        weights = self.strategy.backward(losses, self.model, shared=shared, context={
            "step": self.state.step, "epoch": self.state.epoch, "batch": batch, "logits": logits})
        self.callbacks.call("on_after_backward", self)
        if self.tc.grad_clip is not None:
            clip_grad_norm_(self.clip_params, self.tc.grad_clip)
        self.optimizer.step()
        return StepOutput(losses=losses.detach(), weights=weights, rows=len(batch))

    def end_epoch(self) -> None:
        st = self.state
        if self.epoch_end_hook is not None:  # the epoch's mean losses over all processes (_account)
            self.epoch_end_hook(torch.tensor(st.epoch_loss_sum, dtype=torch.float32) / max(st.epoch_rows, 1))
        self.callbacks.call("on_epoch_end", self)
        st.epoch += 1
        st.batch_in_epoch = 0
        st.epoch_loss_sum = [0.0] * self.num_tasks
        st.epoch_rows = 0

    def validate_if_due(self, epoch_done: bool) -> bool:
        """Validates on schedule (every ``eval_every`` steps, else at epoch ends) and at the
        last planned step; True when this step validated."""
        every = self.tc.eval_every
        due = (every is not None and self.state.step % every == 0) or (every is None and epoch_done)
        if due:
            self.validate(scheduled=True)
        if self.state.step >= self.planned:
            self.request_stop()
            if not due:  # the run's last weights must have their chance to be "best"
                self.validate(scheduled=False)
                due = True
        return due

    def validate(self, *, scheduled: bool = True) -> EvalOutput:
        """Metrics on val; tracks the best mean AUC (a NaN score never beats a number)."""
        st = self.state
        metrics = self.evaluator(self.model, self.val_log, self.tc.eval_batch_size, predictor=self.predictor)
        score = mean_metric(metrics, "auc")
        st.last_eval_step = st.step
        improved = (not math.isnan(score) and score > st.best_score) or st.best_step < 0
        if improved:
            st.best_score = score if not math.isnan(score) else -math.inf
            st.best_step = st.step
        evaluation = EvalOutput(metrics=metrics, score=score, improved=improved, scheduled=scheduled)
        self.callbacks.call("on_eval_end", self, evaluation)
        return evaluation

    def final_result(self) -> TrainResult:
        """Val and test metrics of the model as it is now (the best weights, when a callback restored them)."""
        metrics = {"val": self.evaluator(self.model, self.val_log, self.tc.eval_batch_size, predictor=self.predictor),
                   "test": self.evaluator(self.model, self.test_log, self.tc.eval_batch_size, predictor=self.predictor)}
        gain = mtl_gain(metrics["test"], self.baseline["test"]) if self.baseline else None
        st = self.state
        return TrainResult(model=self.model, metrics=metrics, run_dir=self.run_dir,
                           best_checkpoint=self.best_checkpoint, out_dir=self.out_dir, steps=st.step,
                           epochs=st.epoch, best_step=st.best_step, stopped_early=st.stopped_early, mtl_gain=gain)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict:
        """Everything a resumed run needs (what last.pt holds)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "strategy": ckpt.module_state(self.strategy), "loop": asdict(self.state),
                "callbacks": self.callbacks.state_dict(), "rng": ckpt.rng_state(), "tasks": self.tasks}

    def restore(self, path: Path) -> None:
        if not path.exists():
            raise ConfigError(f"cannot resume: {path} does not exist")
        saved = ckpt.load_user_file(path, "checkpoint to resume from")  # on CPU: RNG states must stay there
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            ckpt.load_module_state(self.strategy, saved["strategy"])
            loop = dict(saved["loop"])
            callback_states = dict(saved.get("callbacks", {}))
            if "bad_evals" in loop:  # last.pt written before early stopping became a callback
                callback_states.setdefault("early_stopping", {"bad_evals": loop.pop("bad_evals")})
            self.state = LoopState(**loop)
            self.callbacks.load_state_dict(callback_states)
            ckpt.set_rng_state(saved["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise DataError(f"not a last.pt of this run's model and strategy ({str(err).splitlines()[0]}); "
                            "delete it to start over", path=path) from None
        self.resumed = True

    # ------------------------------------------------------------------ the train window (TensorBoard, bar)
    def _window_start(self) -> None:
        self._window_loss = torch.zeros(self.num_tasks, dtype=torch.float64, device=self.device)
        self._window_rows, self._window_t0 = 0, time.perf_counter()

    def _account(self, out: StepOutput) -> None:
        st = self.state
        batch_loss = out.losses.sum(0).double()
        self._window_loss += batch_loss
        self._window_rows += out.rows
        sums, rows = batch_loss.tolist(), out.rows
        if self.epoch_end_hook is not None:  # summed over processes every step, so last.pt (rank 0's)
            sums, rows = distributed.all_reduce_epoch(sums, rows)  # holds the global sums: any count resumes them
        st.epoch_loss_sum = [a + b for a, b in zip(st.epoch_loss_sum, sums)]
        st.epoch_rows += rows
        st.step += 1
        st.batch_in_epoch += 1

    def _log_window(self, weights: torch.Tensor | None) -> None:
        elapsed = time.perf_counter() - self._window_t0
        window = TrainWindow(
            step=self.global_step, mean_losses=(self._window_loss / max(self._window_rows, 1)).float(),
            weights=weights, strategy_logs=self.logs_hook() if self.logs_hook is not None else {},
            gate_usage=self.model.last_gate_usage if self.reports_gates else None,
            samples_per_sec=self._window_rows / elapsed if elapsed > 0 else None)
        self.callbacks.call("on_log", self, window)
        self._window_start()
