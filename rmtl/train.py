"""The weighting loop: batches in, per-sample per-task losses, strategy backward,
optimizer step, validation with early stopping, checkpoints, TensorBoard.

    result = fit(load_config("quickstart"))
    result.metrics["test"]["ctr"]["auc"]

All artefacts of one ``fit`` live in ``<run_dir>/<tag>/``: ``last.pt`` (everything a
resumed run needs), ``best.pt`` (the weights with the best mean validation AUC),
``metrics.json`` (final val/test metrics of the best weights) and the TensorBoard
event files. The RMTL agent calls ``fit`` twice in one run dir (tags "pretrain" and
"finetune"), which is why the tag is a folder.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rmtl import checkpoint as ckpt
from rmtl.atomic import write_json
from rmtl.backbones.base import check_logits, forward_with_shared
from rmtl.config import DataConfig, ModelConfig, RunConfig, StrategyConfig, TrainConfig
from rmtl.data.batches import BatchIterator
from rmtl.data.sessionlog import SessionLog
from rmtl.errors import ConfigError, DataError
from rmtl.metrics import evaluate_predictions, mean_metric, mtl_gain
from rmtl.tblog import TrainLogger

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    bad_evals: int = 0
    stopped_early: bool = False
    last_eval_step: int = -1
    epoch_loss_sum: list = field(default_factory=list)  # per task, for strategy.epoch_end
    epoch_rows: int = 0


# ----------------------------------------------------------------------------- data and parts

def resolve_data_dir(data_dir: str | None) -> Path | None:
    """None stays None (embedded default); a relative path is tried against the current
    directory first, then against the repository root (so configs/census.yaml works from anywhere)."""
    if data_dir is None:
        return None
    path = Path(os.path.expanduser(str(data_dir)))
    if path.is_absolute() or path.exists():
        return path
    alt = REPO_ROOT / path
    return alt if alt.exists() else path


def load_data(data: DataConfig, seed: int = 0):
    """The Prepared data of a DataConfig (through rmtl.data.prepare)."""
    from rmtl.data.prepare import prepare  # imported late: the data core is a separate part

    data_dir = resolve_data_dir(data.data_dir)
    kwargs: dict[str, Any] = dict(
        cache_dir=data.cache_dir, session_gap=data.session_gap, split_ratios=tuple(data.split_ratios),
        split_order=data.split_order, min_count=data.min_count,
        seed=data.seed if data.seed is not None else seed,
        reader_options=dict(data.reader_options), use_cache=data.use_cache,
    )
    if data_dir is None and data.synthetic:
        kwargs["synthetic"] = dict(data.synthetic)
    return prepare(data.source, data_dir, **kwargs)


def _resolved(text: str) -> str:
    """A RunConfig built in Python (not by load_config) may still hold ${now:...}."""
    if "${" not in text:
        return text
    from omegaconf import OmegaConf

    return str(OmegaConf.create({"v": text}).v)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_log(prepared) -> SessionLog:
    if isinstance(prepared, SessionLog):
        return prepared
    log = getattr(prepared, "log", None)
    if not isinstance(log, SessionLog):
        raise TypeError("prepared must be a Prepared (with .log) or a SessionLog")
    return log


def build_model(model_cfg: ModelConfig, spec) -> nn.Module:
    from rmtl import backbones

    return backbones.build(model_cfg.name, spec, **dict(model_cfg.options))


def build_strategy(strategy_cfg: StrategyConfig, num_tasks: int) -> nn.Module:
    from rmtl import weighting

    return weighting.build_strategy(strategy_cfg.name, num_tasks, **dict(strategy_cfg.options))


def check_names(cfg: RunConfig, *, need_model: bool = True, need_strategy: bool = True) -> None:
    """ConfigError (naming model.name / strategy.name and the known names) for unknown names."""
    from rmtl import backbones, weighting
    from rmtl.errors import unknown_name

    if need_model and cfg.model.name not in backbones.available():
        err = unknown_name("backbone", cfg.model.name, backbones.available())
        raise ConfigError(str(err), key="model.name")
    if need_strategy and cfg.strategy.name not in weighting.available_strategies():
        err = unknown_name("strategy", cfg.strategy.name, weighting.available_strategies())
        raise ConfigError(str(err), key="strategy.name")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine; use cpu or auto", key="train.device")
    return torch.device(name)


def make_optimizer(tc: TrainConfig, model: nn.Module, strategy: nn.Module) -> torch.optim.Optimizer:
    seen: set[int] = set()
    params = []
    for p in list(model.parameters()) + list(strategy.parameters()):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[tc.optimizer]
    try:  # the fused kernel is several times faster than the per-tensor default on CPU
        return cls(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # old torch, or a device / dtype it does not cover
        return cls(params, lr=tc.lr, weight_decay=tc.weight_decay)


# ----------------------------------------------------------------------------- prediction

def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, log_split: SessionLog, batch_size: int = 8192) -> np.ndarray:
    """Probabilities [N, K] for every row of a split, in row order (eval mode, no grad)."""
    device = _model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, log_split.num_rows, batch_size):
            sparse = torch.from_numpy(log_split.sparse[lo:lo + batch_size]).to(device)
            dense = torch.from_numpy(log_split.dense[lo:lo + batch_size]).to(device)
            logits = model(sparse, dense)
            out.append(torch.sigmoid(logits.float()).cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, len(task_columns(model, log_split.spec.num_tasks))), dtype=np.float32)
    return torch.cat(out).numpy()


def task_columns(model: nn.Module, num_tasks: int) -> list[int]:
    """The label columns the model predicts, in its output order: all of them, unless the
    model says otherwise (a SingleTask built for one task exposes ``task_columns``)."""
    return list(getattr(model, "task_columns", range(num_tasks)))


def evaluate(model: nn.Module, log_split: SessionLog, batch_size: int = 8192) -> dict[str, dict[str, float]]:
    """{task: {auc, logloss, session_logloss, gauc}} of the model on one split."""
    probs = predict(model, log_split, batch_size=batch_size)
    cols = task_columns(model, log_split.spec.num_tasks)
    return evaluate_predictions(log_split.labels[:, cols], probs, log_split.session_of_row(), log_split.user,
                                [log_split.spec.tasks[c] for c in cols])


# ----------------------------------------------------------------------------- the loop

def _checkpoint_paths(out_dir: Path) -> tuple[Path, Path]:
    return out_dir / "last.pt", out_dir / "best.pt"


def fit(cfg: RunConfig, *, prepared=None, model: nn.Module | None = None, strategy: nn.Module | None = None,
        run_dir: str | os.PathLike | None = None, resume: bool = False, tag: str = "train") -> TrainResult:
    """Train ``model`` (or the configured backbone) with ``strategy`` (or the configured one).

    ``prepared`` is a Prepared (or a SessionLog with train/val/test splits); None loads
    ``cfg.data``. ``resume=True`` continues from ``<run_dir>/<tag>/last.pt`` and ends with
    exactly the weights an uninterrupted run would have.
    """
    tc = cfg.train
    ckpt.seed_everything(cfg.seed)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    check_names(cfg, need_model=model is None, need_strategy=strategy is None)  # before a slow data load

    log = _as_log(prepared if prepared is not None else load_data(cfg.data, cfg.seed))
    for name in ("train", "val", "test"):
        if name not in log.splits:
            raise DataError(f"the session log has no '{name}' split (has {sorted(log.splits)})")
    train_log, val_log, test_log = log.split("train"), log.split("val"), log.split("test")
    if train_log.num_rows == 0:
        raise DataError("the train split is empty")
    model = model if model is not None else build_model(cfg.model, log.spec)
    columns = task_columns(model, log.spec.num_tasks)
    all_columns = columns == list(range(log.spec.num_tasks))
    tasks = [log.spec.tasks[c] for c in columns]
    num_tasks = len(tasks)
    strategy = strategy if strategy is not None else build_strategy(cfg.strategy, num_tasks)
    model.to(device)
    strategy.to(device)
    optimizer = make_optimizer(tc, model, strategy)

    root = Path(run_dir if run_dir is not None else _resolved(cfg.run_dir))
    out_dir = _mkdir(root / tag)
    last_path, best_path = _checkpoint_paths(out_dir)

    state = LoopState(epoch_loss_sum=[0.0] * num_tasks)
    if not resume and best_path.exists():
        best_path.unlink()  # a fresh run into a used folder must never end with an older run's weights
    if resume:
        if not last_path.exists():
            raise ConfigError(f"cannot resume: {last_path} does not exist")
        saved = ckpt.load_user_file(last_path, "checkpoint to resume from")  # on CPU: RNG states must stay there
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            ckpt.load_module_state(strategy, saved["strategy"])
            state = LoopState(**saved["loop"])
            ckpt.set_rng_state(saved["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"not a last.pt of this run's model and strategy ({str(err).splitlines()[0]}); "
                            "delete it to start over", path=last_path) from None

    iterator = BatchIterator(train_log, tc.batch_size, shuffle=True, seed=cfg.seed, device=device)
    batches_per_epoch = len(iterator)
    planned = tc.epochs * batches_per_epoch
    if tc.max_steps is not None:
        planned = min(planned, tc.max_steps)

    # purge_step: TensorBoard hides older events at or after this step (a fresh run hides all of a
    # previous run in the same folder; a resumed run hides what came after its checkpoint)
    logger = TrainLogger(out_dir, tasks, purge_step=state.step + 1 if resume else 0)
    show_bar = tc.progress and sys.stderr.isatty()
    bar = tqdm(total=planned, initial=state.step, disable=not show_bar, desc=tag, dynamic_ncols=True)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=tc.bf16)
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]

    window_loss = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    window_rows, window_t0 = 0, time.perf_counter()

    def save_last() -> None:
        ckpt.save_atomic({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "strategy": ckpt.module_state(strategy), "loop": asdict(state), "rng": ckpt.rng_state(),
            "tasks": tasks,
        }, last_path)

    def validate() -> bool:
        """Evaluate on val, keep the best weights; True when patience has run out."""
        metrics = evaluate(model, val_log, tc.eval_batch_size)
        score = mean_metric(metrics, "auc")
        logger.metrics("val", state.step, metrics)
        logger.scalar("val/mean_auc", score, state.step)
        state.last_eval_step = state.step
        if not math.isnan(score) and score > state.best_score or state.best_step < 0:
            state.best_score = score if not math.isnan(score) else -math.inf
            state.best_step = state.step
            state.bad_evals = 0
            ckpt.save_atomic({"model": model.state_dict(), "step": state.step, "val": metrics}, best_path)
            return False
        state.bad_evals += 1
        return tc.patience is not None and state.bad_evals >= max(tc.patience, 1)

    stop = state.stopped_early or state.step >= planned
    try:
        while not stop and state.epoch < tc.epochs:
            iterator.set_epoch(state.epoch)
            for batch in islice(iter(iterator), state.batch_in_epoch, None):
                model.train()
                with autocast:
                    logits, shared = forward_with_shared(model, batch.sparse, batch.dense)
                check_logits(logits, len(batch), num_tasks)
                labels = batch.labels if all_columns else batch.labels[:, columns]
                losses = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
                aux = model.auxiliary_loss() if hasattr(model, "auxiliary_loss") else None
                if aux is not None:  # e.g. AITM's calibration: spread over the task columns
                    losses = losses + aux.float() / num_tasks
                optimizer.zero_grad(set_to_none=True)
                weights = strategy.backward(losses, model, shared=shared, context={
                    "step": state.step, "epoch": state.epoch, "batch": batch, "logits": logits})
                if tc.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(clip_params, tc.grad_clip)
                optimizer.step()

                batch_loss = losses.detach().sum(0).double()
                window_loss += batch_loss
                window_rows += len(batch)
                state.epoch_loss_sum = [a + b for a, b in zip(state.epoch_loss_sum, batch_loss.tolist())]
                state.epoch_rows += len(batch)
                state.step += 1
                state.batch_in_epoch += 1
                bar.update(1)

                if state.step % tc.log_every == 0:
                    elapsed = time.perf_counter() - window_t0
                    rate = window_rows / elapsed if elapsed > 0 else None
                    mean_losses = (window_loss / max(window_rows, 1)).float()
                    logs = strategy.last_logs() if hasattr(strategy, "last_logs") else {}
                    logger.train_window(state.step, mean_losses, weights, logs,
                                        getattr(model, "last_gate_usage", None), rate)
                    bar.set_postfix(loss=f"{float(mean_losses.mean()):.4f}", sps=f"{rate or 0:.0f}")
                    window_loss.zero_()
                    window_rows, window_t0 = 0, time.perf_counter()

                epoch_done = state.batch_in_epoch >= batches_per_epoch
                if epoch_done:
                    if hasattr(strategy, "epoch_end"):
                        strategy.epoch_end(torch.tensor(state.epoch_loss_sum, dtype=torch.float32)
                                           / max(state.epoch_rows, 1))
                    state.epoch += 1
                    state.batch_in_epoch = 0
                    state.epoch_loss_sum = [0.0] * num_tasks
                    state.epoch_rows = 0

                evaluated = False
                if (tc.eval_every is not None and state.step % tc.eval_every == 0) or \
                        (tc.eval_every is None and epoch_done):
                    evaluated = True
                    if validate():
                        state.stopped_early = True
                        stop = True
                if state.step >= planned:
                    stop = True
                    if not evaluated:  # the run's last weights must have their chance to be "best"
                        evaluated = True
                        validate()
                if stop or evaluated or (tc.checkpoint_every is not None and state.step % tc.checkpoint_every == 0):
                    save_last()
                if stop or epoch_done:
                    break
    finally:
        bar.close()

    if state.last_eval_step != state.step and not best_path.exists():
        validate()  # e.g. resumed a finished run that never validated
    best = ckpt.load_user_file(best_path, "best checkpoint") if best_path.exists() else None
    if best is not None:
        try:
            model.load_state_dict(best["model"])
        except (KeyError, TypeError, RuntimeError) as err:
            raise DataError(f"not a best.pt of this run's model ({str(err).splitlines()[0]}); delete it and resume",
                            path=best_path) from None
    metrics = {"val": evaluate(model, val_log, tc.eval_batch_size),
               "test": evaluate(model, test_log, tc.eval_batch_size)}
    for split, mets in metrics.items():
        logger.metrics(f"final/{split}", state.step, mets)
    gain = _baseline_gain(cfg.baseline_run, metrics["test"], tag)
    if gain is not None:
        logger.scalar("final/test/mtl_gain", gain["mean"], state.step)
    logger.close()

    summary = {"tag": tag, "tasks": tasks, "steps": state.step, "epochs": state.epoch,
               "best_step": state.best_step, "stopped_early": state.stopped_early,
               "model": type(model).__name__, "strategy": type(strategy).__name__, **metrics}
    if gain is not None:
        summary["mtl_gain"] = gain
    _write_json(summary, out_dir / "metrics.json")
    return TrainResult(model=model, metrics=metrics, run_dir=root, best_checkpoint=best_path if best else None,
                       out_dir=out_dir, steps=state.step, epochs=state.epoch, best_step=state.best_step,
                       stopped_early=state.stopped_early, mtl_gain=gain)


def _baseline_gain(baseline_run: str | None, test_metrics: dict, tag: str) -> dict | None:
    if not baseline_run:
        return None
    base = read_run_metrics(baseline_run, tag)
    if base is None:
        raise ConfigError(f"no metrics.json under {baseline_run}", key="baseline_run")
    return mtl_gain(test_metrics, base["test"])


def read_run_metrics(run_dir: str | os.PathLike, tag: str | None = None) -> dict | None:
    """metrics.json of a run (the given tag, else 'train', else the only/last tag); None if absent."""
    root = Path(run_dir)
    if (root / "metrics.json").exists():
        return json.loads((root / "metrics.json").read_text())
    candidates = [root / t / "metrics.json" for t in ([tag] if tag else []) + ["train"]]
    candidates += sorted(root.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)[::-1]
    for path in candidates:
        if path.exists():
            return json.loads(path.read_text())
    return None


def _write_json(obj: dict, path: Path) -> None:
    write_json(path, obj)
