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

from rmtl.config import bounded, load_structured  # also registers the ${now:} resolver
from rmtl.errors import ConfigError
from rmtl.fusion.env import DEFAULT_SYNTHETIC
from rmtl.fusion.simulator import FUSION_TASKS, FusionEnvConfig

POLICIES = ("equal", "behaviour", "cem", "bcq", "td3")
RANKERS = ("user_model", "backbone")


@dataclass
class FusionDataSection:
    data_dir: Optional[str] = None  # None = the embedded synthetic KuaiRand logs
    cache_dir: Optional[str] = None  # None = the data core's default cache
    session_gap: Optional[float] = bounded(1800.0, low=0, low_open=True)
    tasks: List[str] = field(default_factory=lambda: list(FUSION_TASKS))  # KuaiRand task aliases
    synthetic: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SYNTHETIC))
    use_cache: bool = True


@dataclass
class UserModelSection:
    dim: int = bounded(8, low=1)  # training user model (also the ranker whose predictions are fused)
    epochs: int = bounded(15, low=1)
    lr: float = bounded(0.03, low=0, low_open=True)
    l2: float = bounded(0.01, low=0)
    heldout_dim: int = bounded(16, low=1)  # held-out user model: other size, seed and rows (train + val)
    heldout_seed_offset: int = bounded(101, low=0)


@dataclass
class RankerSection:
    kind: str = "user_model"  # user_model (the training user model's predictions) | backbone
    backbone: str = "mmoe"  # with kind=backbone: any rmtl.backbones name, fitted on the train split
    options: Dict[str, Any] = field(default_factory=dict)
    epochs: int = bounded(3, low=1)
    batch_size: int = bounded(512, low=1)
    lr: float = bounded(0.001, low=0, low_open=True)


@dataclass
class BehaviourSection:
    default_alpha: Dict[str, float] = field(default_factory=lambda: {
        "ctr": 0.3, "long_view": 1.0, "like": 0.5, "follow": 0.5, "comment": 0.5, "forward": 0.5, "hate": -1.0})
    noise: float = bounded(0.3, low=0)  # std of the Gaussian noise per task and request (then clipped to the action box)
    passes: int = bounded(3, low=1)  # logged rollouts over the train sessions
    heldout_passes: int = bounded(2, low=1)  # logged rollouts over the test sessions (the OPE data; 2 to 100
    # measured: more does not make DR rank better, docs/fusion.md "How much held-out log the order needs")
    propensity_draws: int = bounded(256, low=1)  # Monte Carlo draws behind each logged slate propensity


@dataclass
class BCQSection:
    steps: int = bounded(1000, low=1)
    batch_size: int = bounded(128, low=1)
    rho: float = bounded(0.15, low=0)
    gamma: float = bounded(0.95, low=0, high=1, high_open=True)
    tau: float = bounded(0.005, low=0, high=1, low_open=True)
    lmbda: float = bounded(0.75, low=0, high=1)
    hidden: int = bounded(64, low=1)
    lr: float = bounded(0.001, low=0, low_open=True)
    n_samples: int = bounded(10, low=1)
    log_every: int = bounded(50, low=1)


@dataclass
class CEMSection:
    iterations: int = bounded(5, low=1)
    population: int = bounded(16, low=1)
    sessions: int = bounded(32, low=1)
    elite_frac: float = bounded(0.25, low=0, high=1, low_open=True)
    init_std: float = bounded(0.5, low=0)


@dataclass
class TD3Section:
    timesteps: int = bounded(2000, low=0)  # 0 = skip TD3
    learning_starts: int = bounded(300, low=0)
    hidden: int = bounded(64, low=1)
    action_noise: float = bounded(0.2, low=0)


@dataclass
class FQESection:  # every FQE critic of the run (slate FQE, the DR estimate's critic, and FQE on alpha)
    steps: int = bounded(2000, low=1)
    batch_size: int = bounded(256, low=1)
    gamma: float = bounded(0.95, low=0, high=1, high_open=True)
    cql_alpha: float = bounded(0.1, low=0)  # CQL penalty of fqe_cql, reported as a lower bound
    hidden: int = bounded(64, low=1)
    lr: float = bounded(0.001, low=0, low_open=True)
    tau: float = bounded(0.05, low=0, high=1, low_open=True)  # target network update (0.01 left Q unconverged)


@dataclass
class OPESection:  # the offline value estimators (rmtl.fusion.estimators) and their validation
    default: str = "dr"  # THE value estimate: the first column, the one to trust (docs/fusion.md measurements)
    estimators: List[str] = field(default_factory=lambda: ["dr", "wpdis", "sfqe"])  # also fqe, fqe_cql
    resamples: int = bounded(200, low=2)  # bootstrap resamples of the held-out episodes (intervals, verdicts)
    z: float = bounded(2.0, low=0, low_open=True)  # a pair is "distinguishable" beyond z bootstrap s.e.


@dataclass
class EvalSection:
    repeats: int = bounded(3, low=1)  # simulator passes over the test sessions per policy
    truth_repeats: int = bounded(100, low=1)  # passes for each policy's true discounted value (the estimators' yardstick)
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
    ope: OPESection = field(default_factory=OPESection)
    eval: EvalSection = field(default_factory=EvalSection)
    policies: List[str] = field(default_factory=lambda: list(POLICIES))
    seed: int = bounded(0, low=0)
    num_threads: Optional[int] = bounded(1, low=1)  # torch threads; None = torch's default
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
    from rmtl.fusion.estimators import ESTIMATORS

    for name in cfg.ope.estimators:
        if name not in ESTIMATORS:
            raise ConfigError(f"unknown estimator '{name}'; known: {', '.join(ESTIMATORS)}", key="ope.estimators")
    if cfg.ope.default not in cfg.ope.estimators:
        raise ConfigError(f"the default estimator '{cfg.ope.default}' must be one of ope.estimators "
                          f"{list(cfg.ope.estimators)}", key="ope.default")
    if cfg.ranker.kind not in RANKERS:
        raise ConfigError(f"unknown ranker '{cfg.ranker.kind}'; known: {', '.join(RANKERS)}", key="ranker.kind")
    if cfg.td3.timesteps < 0:
        raise ConfigError(f"expected 0 (skip) or a positive integer, got {cfg.td3.timesteps}", key="td3.timesteps")
    if cfg.eval.label not in cfg.data.tasks:
        raise ConfigError(f"'{cfg.eval.label}' is not one of the tasks {cfg.data.tasks}", key="eval.label")
    for key in cfg.behaviour.default_alpha:  # defaults of tasks not in use are ignored
        if key not in cfg.data.tasks and key not in FUSION_TASKS:
            raise ConfigError(f"'{key}' is not one of the tasks {cfg.data.tasks}", key="behaviour.default_alpha")
