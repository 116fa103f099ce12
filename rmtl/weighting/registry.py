"""Strategies by name. Entries are "module:Class" strings, imported on first use, so
adding a strategy is one line here (or one ``register_strategy`` call in user code)."""

from __future__ import annotations

import importlib
import inspect

from rmtl.errors import ConfigError, unknown_name
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


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def register_strategy(name: str, target: str | type, *, replace: bool = False) -> None:
    """Add a strategy: ``target`` is a Strategy subclass or a "module:Class" string."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a strategy name must be a non-empty string, got {name!r}")
    if isinstance(target, str):
        if target.count(":") != 1:
            raise ConfigError(f"strategy target must look like 'package.module:Class', got {target!r}")
    elif not (inspect.isclass(target) and issubclass(target, Strategy)):
        raise ConfigError(f"strategy target must be a Strategy subclass or 'module:Class', got {target!r}")
    if name in _REGISTRY and not replace:
        raise ConfigError(f"strategy '{name}' is already registered ({_REGISTRY[name]!r}); pass replace=True to override")
    _REGISTRY[name] = target


def strategy_class(name: str) -> type:
    """The class registered under ``name`` (imports its module on first use)."""
    if name not in _REGISTRY:
        raise unknown_name("strategy", name, _REGISTRY)
    target = _REGISTRY[name]
    if not isinstance(target, str):
        return target
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):  # the module itself is missing, not one of its imports
            raise ConfigError(f"strategy '{name}' is registered as '{target}' but module '{module_name}' "
                              "does not exist (not installed or not written yet)") from None
        raise
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"strategy '{name}': module '{module_name}' has no class '{class_name}'")
    return cls


def accepted_options(cls: type) -> list[str] | None:
    """Keyword options the class's constructor takes (None: it takes any **kwargs)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params
            if p.name != "num_tasks" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def build_strategy(name: str, num_tasks: int, **options) -> Strategy:
    """The strategy ``name`` for ``num_tasks`` tasks; unknown names or options are ConfigErrors."""
    cls = strategy_class(name)
    accepted = accepted_options(cls)
    if accepted is not None:
        for option in options:
            if option not in accepted:
                raise ConfigError(f"strategy '{name}' has no option '{option}'; accepted options: "
                                  f"{', '.join(sorted(accepted)) or '(none)'}", key=f"strategy.options.{option}")
    return cls(num_tasks, **options)
