"""Strategies by name. Entries are "module:Class" strings, imported on first use, so
adding a strategy is one line here (or one ``register_strategy`` call in user code)."""

from __future__ import annotations

from rmtl import registry
from rmtl.weighting.base import Strategy

_REGISTRY: dict[str, str | type] = {
    "ew": "rmtl.weighting.ew:EqualWeighting",
    "fixed": "rmtl.weighting.fixed:FixedWeighting",
    "uw": "rmtl.weighting.uw:UncertaintyWeighting",
    "dwa": "rmtl.weighting.dwa:DynamicWeightAverage",
    "gradnorm": "rmtl.weighting.gradnorm:GradNorm",
    "rlw": "rmtl.weighting.rlw:RandomLossWeighting",
    "pcgrad": "rmtl.weighting.pcgrad:PCGrad",
    "gradvac": "rmtl.weighting.gradvac:GradVac",
    "cagrad": "rmtl.weighting.cagrad:CAGrad",
    "mgda": "rmtl.weighting.mgda:MGDA",
    "imtl": "rmtl.weighting.imtl:IMTL",
    "nash_mtl": "rmtl.weighting.nash_mtl:NashMTL",
    "rmtl": "rmtl.weighting.rmtl_critic:RMTLStrategy",
    "drgrad": "rmtl.weighting.drgrad:DRGradStrategy",
}
_STRATEGIES = registry.Registry("strategy", "strategy.options", _REGISTRY, base=Strategy)


def available_strategies() -> list[str]:
    return _STRATEGIES.available()


def register_strategy(name: str, target: str | type, *, replace: bool = False) -> None:
    """Add a strategy: ``target`` is a Strategy subclass or a "module:Class" string."""
    _STRATEGIES.register(name, target, replace=replace)


def strategy_name(strategy) -> str | None:
    """The registered name of the strategy's class (None for one that is not registered)."""
    return _STRATEGIES.name_of(strategy)


def strategy_class(name: str) -> type:
    """The class registered under ``name`` (imports its module on first use)."""
    return _STRATEGIES.resolve(name)


def accepted_options(cls: type) -> list[str] | None:
    """Keyword options the class's constructor takes after num_tasks (None: it takes any **kwargs)."""
    return registry.accepted_options(cls, passed=1)


def build_strategy(name: str, num_tasks: int, **options) -> Strategy:
    """The strategy ``name`` for ``num_tasks`` tasks; unknown names or options are ConfigErrors."""
    return _STRATEGIES.build(name, num_tasks, **options)
