"""``fit``: the one call that trains a backbone with a weighting strategy from a RunConfig.

    result = fit(load_config("quickstart"))
    result.metrics["test"]["ctr"]["auc"]

It loads the data, builds the model and the strategy from their registries and hands
them to the Trainer (rmtl.trainer) with the standard callbacks (rmtl.callbacks).

All artefacts of one ``fit`` live in ``<run_dir>/<tag>/``: ``last.pt`` (everything a
resumed run needs), ``best.pt`` (the weights with the best mean validation AUC),
``metrics.json`` (final val/test metrics of the best weights) and the TensorBoard
event files. The RMTL agent calls ``fit`` twice in one run dir (tags "pretrain" and
"finetune"), which is why the tag is a folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from rmtl import checkpoint as ckpt
from rmtl import distributed
from rmtl.atomic import read_json
from rmtl.callbacks import Callback, default_callbacks
from rmtl.config import DataConfig, ModelConfig, RunConfig, StrategyConfig
from rmtl.data import shard_parts, shard_stream
from rmtl.data.prepare import as_session_log
from rmtl.device import resolve_device
from rmtl.errors import ConfigError, DataError
from rmtl.predict import evaluate, predict, task_columns  # noqa: F401  (the public names stay here)
from rmtl.trainer import LoopState, Trainer, TrainResult, make_optimizer  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    from rmtl.data.prepare import prepare

    if data.shards:  # streamed by fit (load_shards); the other commands need the whole log
        raise ConfigError(SHARDS_REFUSED, key="data.shards")
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


SHARDS_REFUSED = ("data.shards is streamed by `rmtl train`, `rmtl pipeline`, `rmtl agent` and `rmtl compare`, "
                  "not loaded whole (drop data.shards and give data.source / data.data_dir, or "
                  "rmtl.data.shards.load_log the entry)")


def check_shards(cfg: RunConfig, *, reads_shards: bool) -> None:
    """What a command checks before it writes anything: ``data.shards`` names a sharded entry
    (meta.json with the three splits) when the command ``reads_shards``, and is refused
    otherwise (DataError / ConfigError naming the folder or the key)."""
    if not cfg.data.shards:
        return
    if not reads_shards:
        raise ConfigError(SHARDS_REFUSED, key="data.shards")
    shard_stream.ShardSource.open(resolve_data_dir(cfg.data.shards))


def load_everywhere(cfg: RunConfig, prepared=None):
    """The SessionLog of ``prepared`` (None: of cfg.data) on every rank. Under torchrun rank 0
    prepares first (it alone fills the cache), then the others read it, and a failure on
    any rank stops all of them with one line (distributed.all_or_none)."""
    log = None
    for turn in ("main", "others"):
        with distributed.all_or_none("loading the data"):
            if distributed.is_main() == (turn == "main"):
                log = as_session_log(prepared if prepared is not None else load_data(cfg.data, cfg.seed))
        if not distributed.active():
            break
    return log


def _resolved(text: str) -> str:
    """A RunConfig built in Python (not by load_config) may still hold ${now:...}."""
    if "${" not in text:
        return text
    from omegaconf import OmegaConf

    return str(OmegaConf.create({"v": text}).v)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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

    from rmtl.data.sources import source_names

    if cfg.data.source not in source_names():
        raise ConfigError(str(unknown_name("data source", cfg.data.source, source_names())), key="data.source")
    if need_model and cfg.model.name not in backbones.available():
        err = unknown_name("backbone", cfg.model.name, backbones.available())
        raise ConfigError(str(err), key="model.name")
    if need_strategy and cfg.strategy.name not in weighting.available_strategies():
        err = unknown_name("strategy", cfg.strategy.name, weighting.available_strategies())
        raise ConfigError(str(err), key="strategy.name")


# ----------------------------------------------------------------------------- the one-call API

def fit(cfg: RunConfig, *, prepared=None, model: nn.Module | None = None, strategy: nn.Module | None = None,
        run_dir: str | os.PathLike | None = None, resume: bool = False, tag: str = "train",
        callbacks: Sequence[Callback] = (), step_offset: int = 0) -> TrainResult:
    """Train ``model`` (or the configured backbone) with ``strategy`` (or the configured one).

    ``prepared`` is a Prepared (or a SessionLog with train/val/test splits); None loads
    ``cfg.data``. ``resume=True`` continues from ``<run_dir>/<tag>/last.pt`` and ends with
    exactly the weights an uninterrupted run would have. ``callbacks`` run after the
    standard ones (rmtl.callbacks.default_callbacks); ``step_offset`` starts this fit's
    TensorBoard axis there (the pipeline's fine-tuning continues its pretraining's axis).
    """
    tc = cfg.train
    ckpt.seed_everything(cfg.seed)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = distributed.local_device(resolve_device(tc.device))
    distributed.init(device)  # torchrun: join the process group (no-op in one process)
    check_names(cfg, need_model=model is None, need_strategy=strategy is None)  # before a slow data load
    baseline = _baseline_metrics(cfg.baseline_run, tag)  # a missing baseline fails before training, not after

    stream = None
    if cfg.data.shards and prepared is None:  # each process streams its own shards
        log, stream = load_shards(cfg, device, resume=resume)
    else:
        log = load_everywhere(cfg, prepared)
    for name in ("train", "val", "test"):
        if name not in log.splits:
            raise DataError(f"the session log has no '{name}' split (has {sorted(log.splits)})")
    if stream is None and log.split("train").num_rows == 0:
        raise DataError("the train split is empty")
    model = model if model is not None else build_model(cfg.model, log.spec)
    if strategy is None:
        strategy = build_strategy(cfg.strategy, len(task_columns(model, log.spec.num_tasks)))
    if hasattr(strategy, "bind_log"):  # rmtl: each train row's leak-free critic set and session context
        if stream is None:
            strategy.bind_log(log.split("train"), model)
        elif hasattr(strategy, "bind_parts"):  # this process's streamed rows, bound at the fit's start
            callbacks = [*callbacks, shard_parts.BindTrainParts(strategy, stream, model)]
        else:
            raise ConfigError(f"strategy {cfg.strategy.name} needs the whole train split in memory; "
                              "it does not train from data.shards", key="strategy.name")

    root = Path(run_dir if run_dir is not None else _resolved(cfg.run_dir))
    out_dir = _mkdir(root / tag) if distributed.is_main() else root / tag  # rank 0 writes the files
    trainer = Trainer(tc, model, strategy, log, out_dir=out_dir, run_dir=root, device=device,
                      seed=cfg.seed, callbacks=[*default_callbacks(tc), *callbacks], tag=tag,
                      step_offset=step_offset, config=cfg, baseline=baseline)
    if stream is not None:  # this rank's own batches, metrics gathered over ranks
        shard_stream.setup(trainer, stream)
    else:  # under torchrun: this rank's slices of the global batches, gradient all-reduce
        distributed.setup(trainer)
    return trainer.fit(resume=resume)


def load_shards(cfg: RunConfig, device, *, resume: bool = False):
    """(a SessionLog without rows for the Trainer's construction, this rank's train ShardStream)
    of cfg.data.shards; a failure on any rank stops all of them with one line
    (distributed.all_or_none). A resumed run's stream is laid out by its last.pt
    (shard_stream.StreamLayout), a new one's by data.shard_streams (default: one stream per process)."""
    with distributed.all_or_none("loading the shards"):
        source = shard_stream.ShardSource.open(resolve_data_dir(cfg.data.shards), distributed.rank(),
                                               distributed.world_size())
        log = source.empty_log()
        stream = source.train_stream(cfg.train.batch_size, seed=cfg.seed, buffer_rows=cfg.data.shard_buffer_rows,
                                     device=device, streams=cfg.data.shard_streams, resuming=resume)
    return log, stream


def _baseline_metrics(baseline_run: str | None, tag: str) -> dict | None:
    if not baseline_run:
        return None
    base = read_run_metrics(baseline_run, tag)
    if base is None:
        raise ConfigError(f"no metrics.json under {baseline_run}", key="baseline_run")
    return base


def read_run_metrics(run_dir: str | os.PathLike, tag: str | None = None) -> dict | None:
    """metrics.json of a run (the given tag, else 'train', else the only/last tag); None if absent."""
    root = Path(run_dir)
    if (root / "metrics.json").exists():
        return read_json(root / "metrics.json", "metrics file")
    candidates = [root / t / "metrics.json" for t in ([tag] if tag else []) + ["train"]]
    candidates += sorted(root.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)[::-1]
    for path in candidates:
        if path.exists():
            return read_json(path, "metrics file")
    return None

