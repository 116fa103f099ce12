"""Run configuration: structured dataclasses validated with OmegaConf.

``load_config("quickstart", ["train.lr=0.01"])`` reads a YAML file (a path, or a bare
name of one of the packaged configs in ``rmtl/configs``), checks every key against
the dataclasses below (a mistyped key is a ConfigError naming the full dotted key and
its close matches; a wrong type names the key and the expected type), applies
``key=value`` overrides and returns a plain ``RunConfig`` instance. ``load_structured``
does this for any dataclass schema; rmtl.fusion.config loads ``FusionConfig`` with it.
Free-form option dicts (``model.options``, ``strategy.options``,
``data.reader_options``, ``data.synthetic``) are checked by whoever consumes them.

Numbers: every float of every structured config must be finite (nan / inf are refused),
and a field declared with ``bounded(default, low=..., high=...)`` must lie in its range;
``load_structured`` checks both, so no schema needs its own range code.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The agent section's dataclass lives with the agent it configures (as FusionConfig lives in
# rmtl/fusion/); this module is the root of the run config tree that composes the sections.
from rmtl.agents.config import AgentConfig
from rmtl.atomic import write_text
from rmtl.errors import ConfigError

if not OmegaConf.has_resolver("now"):
    # ${now:%Y%m%d-%H%M%S} as in Hydra, so run_dir defaults to a fresh folder per run.
    def _now(fmt: str = "%Y%m%d-%H%M%S") -> str:
        return _dt.datetime.now().strftime(fmt)

    _register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    _register("now", _now)


def bounded(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, **kw) -> Any:
    """A dataclass field with a numeric range (inclusive unless ``*_open``); None values pass."""
    return field(default=default, metadata={"range": (low, high, low_open, high_open)}, **kw)


@dataclass
class DataConfig:
    source: str = "retailrocket"  # a registered data source: retailrocket | kuairand | census (rmtl.data.sources)
    data_dir: Optional[str] = None  # None = the embedded synthetic default; relative = to cwd, else to the repo
    cache_dir: Optional[str] = None  # None = the data core's default cache
    session_gap: Optional[float] = bounded(1800.0, low=0, low_open=True)  # seconds of inactivity that start a new session; None = one per user
    split_ratios: List[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    split_order: Optional[str] = None  # None = the source's default ("time"; census "random")
    min_count: int = bounded(1, low=1)  # sparse values seen fewer times in train become "unknown"
    seed: Optional[int] = bounded(None, low=0)  # split / synthetic seed; None = the run's seed
    use_cache: bool = True
    reader_options: Dict[str, Any] = field(default_factory=dict)
    # Options of the synthetic writer (users, items, task_correlation, ...). Used only
    # when data_dir is None; empty = the data core's embedded default.
    synthetic: Dict[str, Any] = field(default_factory=dict)
    # A sharded prepare's entry folder (`rmtl prepare --shards`): training streams each process's
    # own shards (rmtl.data.shard_stream) and the keys above are not used. None = the in-memory log.
    shards: Optional[str] = None
    shard_buffer_rows: int = bounded(1 << 18, low=1)  # rows shuffled together when streaming shards
    # Streams the train rows are cut into (docs/shards.md): they fix the run's global batches,
    # kept in last.pt, whatever the process count. None = the process count at the first start.
    shard_streams: Optional[int] = bounded(None, low=1)


@dataclass
class ModelConfig:
    name: str = "mmoe"
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StrategyConfig:
    name: str = "ew"
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    optimizer: str = "adam"  # adam | adamw
    lr: float = bounded(1e-3, low=0, low_open=True)
    weight_decay: float = bounded(0.0, low=0)
    batch_size: int = bounded(1024, low=1)
    eval_batch_size: int = bounded(8192, low=1)
    epochs: int = bounded(5, low=1)
    max_steps: Optional[int] = bounded(None, low=1)  # stop after this many optimizer steps (None = epochs decide)
    patience: Optional[int] = bounded(3, low=0)  # evaluations without a better mean val AUC before stopping; None = never
    eval_every: Optional[int] = bounded(None, low=1)  # steps between validations; None = once per epoch
    checkpoint_every: Optional[int] = bounded(None, low=1)  # steps between last.pt writes; None = at every validation
    # max global gradient norm; None = no clipping (a negative norm would reverse the gradient)
    grad_clip: Optional[float] = bounded(None, low=0, low_open=True)
    # bfloat16 autocast of the forward pass; None = auto: on where the CPU has native bf16
    # (AVX512-BF16 / AMX) or the GPU supports it, fp32 elsewhere (the choice is logged)
    bf16: Optional[bool] = None
    sparse_embedding: bool = True  # row-sparse embedding gradients + lazy Adam rows (rmtl.optim)
    device: str = "auto"  # auto | cpu | cuda
    num_threads: Optional[int] = bounded(None, low=1)  # torch intra-op threads; None = torch's default
    log_every: int = bounded(50, low=1)  # steps between TensorBoard train scalars
    progress: bool = True  # tqdm bar (also hidden when stderr is not a terminal)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    seed: int = bounded(0, low=0)
    run_dir: str = "runs/${model.name}-${strategy.name}-${now:%Y%m%d-%H%M%S}"  # model, strategy, start time
    baseline_run: Optional[str] = None  # run dir of a SingleTask run: its test metrics give the MTL gain


_CHOICES = {
    "train.optimizer": ("adam", "adamw"),
    "train.device": ("auto", "cpu", "cuda"),
}


# ----------------------------------------------------------------------------- key checks

def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_keys(values: Any, schema: type, prefix: str = "") -> None:
    """Every key of the nested mapping ``values`` must be a field of the dataclass ``schema``."""
    if not isinstance(values, dict):
        return
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown key{hint} (known keys here: {', '.join(prefix + k for k in known)})",
                              key=full)
        if _is_dataclass_type(hints.get(key)):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"expected a mapping of {hints[key].__name__} options, got {value!r}", key=full)
            _check_keys(value, hints[key], full + ".")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _expected_type(schema: type, key: str) -> str:
    node: Any = schema
    for part in key.split("."):
        if not _is_dataclass_type(node):
            return "a valid value"
        node = typing.get_type_hints(node).get(part)
    return _type_name(node) if node is not None else "a valid value"


def check_numbers(obj: Any, prefix: str = "") -> None:
    """Every float of the dataclass instance ``obj`` (nested sections, lists and dicts
    included) is finite, and every ``bounded`` field lies in its range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_numbers(value, key + ".")
            continue
        _check_finite(value, key)
        bounds = f.metadata.get("range")
        if bounds is not None and value is not None and not isinstance(value, bool):
            _check_range(value, bounds, key, nullable="Optional" in str(f.type))


def _check_finite(value: Any, key: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"expected a finite number, got {value}", key=key)
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")


def _check_range(value: float, bounds: tuple, key: str, nullable: bool = False) -> None:
    low, high, low_open, high_open = bounds
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        null = " (or null)" if nullable else ""
        raise ConfigError(f"expected a number {' and '.join(parts)}{null}, got {value:g}", key=key)


def _yaml_error(path: Path, err: Exception) -> ConfigError:
    """One line 'FILE:LINE:COLUMN: what' for a YAML syntax error."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    context = getattr(err, "context", None)
    return ConfigError(f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else ""))


def _merge(base: DictConfig, other, what: str, schema: type) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        detail = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"{what}: expected {_expected_type(schema, key)} ({detail})", key=key) from None


# ----------------------------------------------------------------------------- loading

# Packaged configs of other commands, by the schema that reads them (`rmtl fusion` reads
# fusion.yaml as a FusionConfig); every other packaged YAML is a RunConfig.
OTHER_COMMAND_CONFIGS = {"fusion": "FusionConfig"}


def packaged_configs(schema: type | None = None) -> list[str]:
    """Names (without .yaml) of the packaged configs that ``schema`` reads (None = RunConfig)."""
    root = resources.files("rmtl.configs")
    owner = getattr(schema, "__name__", "RunConfig")
    return sorted(p.name[:-5] for p in root.iterdir()
                  if p.name.endswith(".yaml") and OTHER_COMMAND_CONFIGS.get(p.name[:-5], "RunConfig") == owner)


def resolve_config_path(path_or_name: str | os.PathLike, schema: type | None = None) -> Path:
    """A YAML path as given, or a packaged config of ``schema`` by bare name (``quickstart``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith((".yaml", ".yml")) and len(path.parts) == 1 else str(path_or_name)
    names = packaged_configs(schema)
    if name in names:
        return Path(str(resources.files("rmtl.configs") / f"{name}.yaml"))
    raise ConfigError(f"no config file '{path_or_name}' and no packaged config of that name; "
                      f"packaged: {', '.join(names)}")


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=0.01)")
    key, value = item.split("=", 1)
    return key.strip(), value


def load_structured(schema: type, path_or_name: str | os.PathLike | None,
                    overrides: list[str] | None = None) -> Any:
    """An instance of the dataclass ``schema`` from a YAML file (or packaged name; None = all
    defaults) plus ``key=value`` overrides. Shared by run and fusion configs; value checks
    beyond types are the caller's (each config module has its own ``validate``)."""
    cfg = OmegaConf.structured(schema)
    if path_or_name is not None:
        path = resolve_config_path(path_or_name, schema)
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as err:
            raise _yaml_error(path, err) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; expected a YAML file") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None
        except Exception as err:  # OmegaConf's own checks (e.g. duplicate keys): first line only
            raise ConfigError(f"{path}: cannot read config: {str(err).splitlines()[0]}") from None
        raw = OmegaConf.to_container(loaded, resolve=False)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
        # Keys first: OmegaConf's own error for an unknown key has no close matches.
        _check_keys(raw, schema)
        cfg = _merge(cfg, loaded, f"in {path}", schema)
    for item in overrides or []:
        _split_override(item)  # a clear message for a missing '=' before from_dotlist's own
        dotted = OmegaConf.from_dotlist([item])
        _check_keys(OmegaConf.to_container(dotted, resolve=False), schema)
        cfg = _merge(cfg, dotted, f"override '{item}'", schema)
    try:
        out = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"cannot resolve: {str(err).splitlines()[0]}", key=key) from None
    check_numbers(out)
    return out


def load_config(path_or_name: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The validated RunConfig of a YAML file (or packaged name; None = all defaults) plus overrides."""
    run = load_structured(RunConfig, path_or_name, overrides)
    validate(run)
    return run


def validate(cfg: RunConfig) -> None:
    """Checks the values OmegaConf's types cannot express."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"expected one of {', '.join(choices)}, got '{value}'", key=key)
    ratios = list(cfg.data.split_ratios)
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError(f"expected three non-negative fractions (train, val, test) summing to 1, got {ratios}",
                          key="data.split_ratios")
    check_numbers(cfg)  # ranges of the bounded fields (also checked on load; cfg may be edited since)
    cfg.agent.validate()  # the agent section checks its own choices (agents/config.py)


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically: temporary file, then rename)."""
    return write_text(path, to_yaml(cfg))
