"""Callbacks: everything around the training loop that is not the loop itself.

The Trainer (rmtl.trainer) calls every hook of every callback, in list order:

    on_fit_start(trainer)                 after setup (and after a resume restored the state)
      on_epoch_start(trainer)             before the epoch's first (or first remaining) batch
        on_after_backward(trainer)        gradients are in .grad; before clipping and the optimizer step
        on_log(trainer, window)           every ``train.log_every`` steps: TrainWindow
        on_epoch_end(trainer)             the epoch's last batch is done (state.epoch not yet advanced)
        on_eval_end(trainer, evaluation)  after each validation: EvalOutput
        on_step_end(trainer, step)        last thing of every step: StepOutput (stop decided)
    on_train_end(trainer)                 the loop is over; before the final val / test evaluation
    on_fit_end(trainer, result)           TrainResult with the final metrics
    teardown(trainer)                     always, also after an exception (close files, bars)

A callback whose behaviour must survive a resume implements ``state_dict`` /
``load_state_dict``; the Trainer stores them in last.pt under the callback's ``name``.
Callbacks that write files do so only on the main process (``trainer.is_main_process``),
so the same list works unchanged under torch.distributed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

from rmtl import checkpoint as ckpt
from rmtl.atomic import write_json
from rmtl.errors import DataError

if TYPE_CHECKING:  # the trainer imports this module, not the other way round
    from rmtl.trainer import Trainer, TrainResult


# ----------------------------------------------------------------------------- what hooks receive

@dataclass
class StepOutput:
    losses: torch.Tensor  # [B, K] per-sample per-task losses, detached
    weights: torch.Tensor | None  # what strategy.backward returned: [K] or [B, K]
    rows: int  # batch size
    epoch_done: bool = False
    evaluated: bool = False


@dataclass
class TrainWindow:
    step: int  # the trainer's global step (step_offset + loop step)
    mean_losses: torch.Tensor  # [K] mean per-sample loss over the window
    weights: torch.Tensor | None  # the last step's weights
    strategy_logs: Mapping[str, float]
    gate_usage: torch.Tensor | None
    samples_per_sec: float | None


@dataclass
class EvalOutput:
    metrics: dict  # {task: {metric: value}} on val
    score: float  # mean val AUC over the tasks
    improved: bool  # the best score so far (the first validation always is)
    scheduled: bool  # False for the extra validation of a run's last step


# ----------------------------------------------------------------------------- the protocol

class Callback:
    """Base class with every hook a no-op; override the ones you need."""

    name: str = ""  # key of this callback's state in last.pt (defaults to the class name)

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_epoch_start(self, trainer: "Trainer") -> None: ...
    def on_after_backward(self, trainer: "Trainer") -> None: ...
    def on_log(self, trainer: "Trainer", window: TrainWindow) -> None: ...
    def on_epoch_end(self, trainer: "Trainer") -> None: ...
    def on_eval_end(self, trainer: "Trainer", evaluation: EvalOutput) -> None: ...
    def on_step_end(self, trainer: "Trainer", step: StepOutput) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...
    def on_fit_end(self, trainer: "Trainer", result: "TrainResult") -> None: ...
    def teardown(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict | None:
        return None  # nothing to keep across a resume

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def key(self) -> str:
        return self.name or type(self).__name__


class CallbackList:
    """Calls a hook on every callback in order."""

    def __init__(self, callbacks: Iterable[Callback]):
        self.callbacks = list(callbacks)
        keys = [c.key for c in self.callbacks]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(f"two callbacks share the state key(s) {sorted(dup)}; give them distinct .name")

    def __iter__(self):
        return iter(self.callbacks)

    def call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def state_dict(self) -> dict:
        return {cb.key: s for cb in self.callbacks if (s := cb.state_dict()) is not None}

    def load_state_dict(self, states: Mapping[str, dict]) -> None:
        for cb in self.callbacks:
            if cb.key in states:
                cb.load_state_dict(states[cb.key])


# ----------------------------------------------------------------------------- the standard ones

class EarlyStopping(Callback):
    """Stops at the ``patience``-th validation in a row without a better mean val AUC (0 and 1:
    at the first); None never stops. The extra end-of-run validation counts but never stops."""

    name = "early_stopping"

    def __init__(self, patience: int | None):
        self.patience = patience
        self.bad_evals = 0

    def on_eval_end(self, trainer, evaluation):
        self.bad_evals = 0 if evaluation.improved else self.bad_evals + 1
        if self.patience is not None and evaluation.scheduled and self.bad_evals >= max(self.patience, 1):
            trainer.request_stop(early=True)

    def state_dict(self):
        return {"bad_evals": self.bad_evals}

    def load_state_dict(self, state):
        self.bad_evals = int(state["bad_evals"])


class Checkpointing(Callback):
    """``best.pt`` at every improved validation, ``last.pt`` at every validation, every
    ``every`` steps and at the end; the best weights are loaded back when the loop ends."""

    name = "checkpointing"

    def __init__(self, every: int | None = None):
        self.every = every

    def on_fit_start(self, trainer):
        if not trainer.resumed and trainer.is_main_process and trainer.best_path.exists():
            trainer.best_path.unlink()  # a fresh run into a used folder must never end with an older run's weights

    def on_eval_end(self, trainer, evaluation):
        if evaluation.improved and trainer.is_main_process:
            ckpt.save_atomic({"model": trainer.model.state_dict(), "step": trainer.state.step,
                              "val": evaluation.metrics}, trainer.best_path)

    def on_step_end(self, trainer, step):
        due = self.every is not None and trainer.state.step % self.every == 0
        if (trainer.should_stop or step.evaluated or due) and trainer.is_main_process:
            ckpt.save_atomic(trainer.checkpoint_state(), trainer.last_path)

    def on_train_end(self, trainer):
        if trainer.best_path.exists():
            best = ckpt.load_user_file(trainer.best_path, "best checkpoint")
            try:
                trainer.model.load_state_dict(best["model"])
            except (KeyError, TypeError, RuntimeError) as err:
                raise DataError(f"not a best.pt of this run's model ({str(err).splitlines()[0]}); delete it and resume",
                                path=trainer.best_path) from None
            trainer.best_checkpoint = trainer.best_path


class ProgressBar(Callback):
    """A tqdm bar of the steps with the window's loss and samples/s (only on a terminal)."""

    def __init__(self):
        self.bar = None

    def on_fit_start(self, trainer):
        from tqdm.auto import tqdm

        show = trainer.is_main_process and sys.stderr.isatty()
        self.bar = tqdm(total=trainer.planned, initial=trainer.state.step, disable=not show, desc=trainer.tag,
                        dynamic_ncols=True)

    def on_step_end(self, trainer, step):
        self.bar.update(1)

    def on_log(self, trainer, window):
        self.bar.set_postfix(loss=f"{float(window.mean_losses.mean()):.4f}", sps=f"{window.samples_per_sec or 0:.0f}")

    def teardown(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoard(Callback):
    """Train windows, validations, final metrics and the run's hparams (config + final
    metrics) as TensorBoard events in the fit's folder; tags in rmtl.tblog. Steps are the
    trainer's global steps, so the fits of one pipeline share one axis."""

    def __init__(self):
        self.logger = None

    def on_fit_start(self, trainer):
        if not trainer.is_main_process:
            return
        from rmtl.tblog import TrainLogger

        # purge_step: TensorBoard hides older events at or after this step (a fresh run hides all of a
        # previous run in the same folder; a resumed run hides what came after its checkpoint)
        purge = trainer.global_step + 1 if trainer.resumed else trainer.step_offset
        self.logger = TrainLogger(trainer.out_dir, trainer.tasks, purge_step=purge)

    def on_log(self, trainer, window):
        if self.logger is not None:
            self.logger.train_window(window.step, window.mean_losses, window.weights, window.strategy_logs,
                                     window.gate_usage, window.samples_per_sec)

    def on_eval_end(self, trainer, evaluation):
        if self.logger is not None:
            self.logger.metrics("val", trainer.global_step, evaluation.metrics)
            self.logger.scalar("val/mean_auc", evaluation.score, trainer.global_step)

    def on_fit_end(self, trainer, result):
        if self.logger is None:
            return
        for split, mets in result.metrics.items():
            self.logger.metrics(f"final/{split}", trainer.global_step, mets)
        if result.mtl_gain is not None:
            self.logger.scalar("final/test/mtl_gain", result.mtl_gain["mean"], trainer.global_step)
        if trainer.config is not None:
            self.logger.hparams(trainer.config, result.metrics)

    def teardown(self, trainer):
        if self.logger is not None:
            self.logger.close()
            self.logger = None


class MetricsFile(Callback):
    """``metrics.json``: the final val / test metrics of the best weights and the loop's summary,
    with the registered model and strategy names and the seed (what ``rmtl report`` labels by)."""

    def on_fit_end(self, trainer, result):
        if not trainer.is_main_process:
            return
        from rmtl import backbones, weighting

        model, strategy = type(trainer.model).__name__, type(trainer.strategy).__name__
        summary = {"tag": trainer.tag, "tasks": trainer.tasks, "steps": result.steps, "epochs": result.epochs,
                   "best_step": result.best_step, "stopped_early": result.stopped_early,
                   "model": model, "strategy": strategy,
                   "model_name": backbones.name_of(trainer.model) or model,
                   "strategy_name": weighting.strategy_name(trainer.strategy) or strategy,
                   "seed": getattr(trainer.config, "seed", None), **result.metrics}
        if result.mtl_gain is not None:
            summary["mtl_gain"] = result.mtl_gain
        write_json(Path(trainer.out_dir) / "metrics.json", summary)


def default_callbacks(train_cfg) -> list[Callback]:
    """What ``fit`` uses: bar (when ``progress``), TensorBoard, early stopping, checkpoints, metrics.json."""
    cbs: list[Callback] = [ProgressBar()] if train_cfg.progress else []
    return cbs + [TensorBoard(), EarlyStopping(train_cfg.patience), Checkpointing(train_cfg.checkpoint_every),
                  MetricsFile()]
