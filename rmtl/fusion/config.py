"""Configuration of ``rmtl fusion`` (BatchRL-MTF): structured dataclasses + OmegaConf.

``load_fusion_config("fusion", ["bcq.steps=200"])`` reads a YAML file (a path or the
packaged ``configs/fusion.yaml``), checks every key against the dataclasses below with
rmtl.config's shared loader (a mistyped key is a ConfigError naming the dotted key and
its close matches), applies ``key=value`` overrides and returns a ``FusionConfig``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rmtl.config import load_structured  # also registers the ${now:} resolver
from rmtl.errors import ConfigError
from rmtl.fusion.env import DEFAULT_SYNTHETIC
from rmtl.fusion.simulator import FUSION_TASKS, FusionEnvConfig

POLICIES = ("equal", "behaviour", "cem", "bcq", "td3")
RANKERS = ("user_model", "backbone")


@dataclass
class FusionDataSection:
    data_dir: Optional[str] = None  # None = the embedded synthetic KuaiRand logs
    cache_dir: Optional[str] = None  # None = the data core's default cache
    session_gap: Optional[float] = 1800.0
    tasks: List[str] = field(default_factory=lambda: list(FUSION_TASKS))  # KuaiRand task aliases
    synthetic: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SYNTHETIC))
    use_cache: bool = True


@dataclass
class UserModelSection:
    dim: int = 8  # training user model (also the ranker whose predictions are fused)
    epochs: int = 15
    lr: float = 0.03
    l2: float = 0.01
    heldout_dim: int = 16  # held-out user model: other size, seed and rows (train + val)
    heldout_seed_offset: int = 101


@dataclass
class RankerSection:
    kind: str = "user_model"  # user_model (the training user model's predictions) | backbone
    backbone: str = "mmoe"  # with kind=backbone: any rmtl.backbones name, fitted on the train split
    options: Dict[str, Any] = field(default_factory=dict)
    epochs: int = 3
    batch_size: int = 512
    lr: float = 0.001


@dataclass
class BehaviourSection:
    default_alpha: Dict[str, float] = field(default_factory=lambda: {
        "ctr": 0.3, "long_view": 1.0, "like": 0.5, "follow": 0.5, "comment": 0.5, "forward": 0.5, "hate": -1.0})
    noise: float = 0.3  # std of the Gaussian noise per task and request (then clipped to the action box)
    passes: int = 3  # logged rollouts over the train sessions
    heldout_passes: int = 2  # logged rollouts over the test sessions (FQE / MTF-GAUC data)


@dataclass
class BCQSection:
    steps: int = 1000
    batch_size: int = 128
    rho: float = 0.15
    gamma: float = 0.95
    tau: float = 0.005
    lmbda: float = 0.75
    hidden: int = 64
    lr: float = 0.001
    n_samples: int = 10
    log_every: int = 50


@dataclass
class CEMSection:
    iterations: int = 5
    population: int = 16
    sessions: int = 32
    elite_frac: float = 0.25
    init_std: float = 0.5


@dataclass
class TD3Section:
    timesteps: int = 2000  # 0 = skip TD3
    learning_starts: int = 300
    hidden: int = 64
    action_noise: float = 0.2


@dataclass
class FQESection:
    steps: int = 1000
    batch_size: int = 256
    gamma: float = 0.95
    cql_alpha: float = 0.1  # CQL penalty of the default (conservative) estimate: a lower bound that ranks
    plain: bool = True  # also report plain FQE (cql_alpha = 0) and its errors against the truth
    hidden: int = 64
    lr: float = 0.001


@dataclass
class EvalSection:
    repeats: int = 3  # simulator passes over the test sessions per policy
    truth_repeats: int = 20  # passes for each policy's true discounted value (the estimators' yardstick)
    label: str = "long_view"  # valid consumption for MTF-GAUC
    equal_alpha: float = 0.5  # the "equal" baseline's weight for every task


@dataclass
class FusionConfig:
    data: FusionDataSection = field(default_factory=FusionDataSection)
    user_model: UserModelSection = field(default_factory=UserModelSection)
    ranker: RankerSection = field(default_factory=RankerSection)
    env: FusionEnvConfig = field(default_factory=FusionEnvConfig)  # the simulator's own options
    behaviour: BehaviourSection = field(default_factory=BehaviourSection)
    bcq: BCQSection = field(default_factory=BCQSection)
    cem: CEMSection = field(default_factory=CEMSection)
    td3: TD3Section = field(default_factory=TD3Section)
    fqe: FQESection = field(default_factory=FQESection)
    eval: EvalSection = field(default_factory=EvalSection)
    policies: List[str] = field(default_factory=lambda: list(POLICIES))
    seed: int = 0
    num_threads: Optional[int] = 1  # torch threads; None = torch's default
    run_dir: str = "runs/fusion-${now:%Y%m%d-%H%M%S}"


def load_fusion_config(path_or_name: str | os.PathLike | None = "fusion",
                       overrides: list[str] | None = None) -> FusionConfig:
    """The validated FusionConfig of a YAML file (or packaged name; None = defaults) plus overrides."""
    out = load_structured(FusionConfig, path_or_name, overrides)
    validate(out)
    return out


def validate(cfg: FusionConfig) -> None:
    for name in cfg.policies:
        if name not in POLICIES:
            raise ConfigError(f"unknown policy '{name}'; known: {', '.join(POLICIES)}", key="policies")
    if not cfg.policies:
        raise ConfigError("expected at least one policy", key="policies")
    positive = {"bcq.steps": cfg.bcq.steps, "bcq.batch_size": cfg.bcq.batch_size, "fqe.steps": cfg.fqe.steps,
                "fqe.batch_size": cfg.fqe.batch_size, "behaviour.passes": cfg.behaviour.passes,
                "behaviour.heldout_passes": cfg.behaviour.heldout_passes, "eval.repeats": cfg.eval.repeats, "eval.truth_repeats": cfg.eval.truth_repeats,
                "user_model.epochs": cfg.user_model.epochs, "bcq.log_every": cfg.bcq.log_every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"expected a positive integer, got {value}", key=key)
    if cfg.ranker.kind not in RANKERS:
        raise ConfigError(f"unknown ranker '{cfg.ranker.kind}'; known: {', '.join(RANKERS)}", key="ranker.kind")
    if cfg.td3.timesteps < 0:
        raise ConfigError(f"expected 0 (skip) or a positive integer, got {cfg.td3.timesteps}", key="td3.timesteps")
    if cfg.eval.label not in cfg.data.tasks:
        raise ConfigError(f"'{cfg.eval.label}' is not one of the tasks {cfg.data.tasks}", key="eval.label")
    for key in cfg.behaviour.default_alpha:  # defaults of tasks not in use are ignored
        if key not in cfg.data.tasks and key not in FUSION_TASKS:
            raise ConfigError(f"'{key}' is not one of the tasks {cfg.data.tasks}", key="behaviour.default_alpha")
