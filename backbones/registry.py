"""Backbones by name. Entries are "module:Class" strings, imported on first use, so
adding an architecture is a one-line edit here (or ``register`` at run time)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from rmtl.data.spec import FeatureSpec
from rmtl.errors import ConfigError, unknown_name

_REGISTRY: dict[str, str | type] = {
    "singletask": "rmtl.backbones.singletask:SingleTask",
    "shared_bottom": "rmtl.backbones.shared_bottom:SharedBottom",
    "omoe": "rmtl.backbones.omoe:OMoE",
    "mmoe": "rmtl.backbones.mmoe:MMoE",
    "ple": "rmtl.backbones.ple:PLE",
    "esmm": "rmtl.backbones.esmm:ESMM",
    "aitm": "rmtl.backbones.aitm:AITM",
    "stem": "rmtl.backbones.stem:STEM",
    "split_mmoe": "rmtl.backbones.split_tower:SplitMMoE",
}


def available() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def register(name: str, target: str | type) -> None:
    """Add (or replace) a backbone: ``target`` is a class or a "module:Class" string.
    The class is called as ``cls(spec, **options)``."""
    if not isinstance(target, (str, type)):
        raise TypeError("target must be a class or a 'module:Class' string")
    _REGISTRY[str(name)] = target


def resolve(name: str) -> type:
    """The class registered under ``name`` (imported on first use)."""
    if name not in _REGISTRY:
        raise unknown_name("backbone", name, _REGISTRY)
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def accepted_options(cls: type) -> list[str] | None:
    """Keyword options of ``cls(spec, ...)``; None when it takes **kwargs (anything goes)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, spec
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain lists / dicts (configs hand options over as such)."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def build(name: str, spec: FeatureSpec, **options: Any) -> nn.Module:
    """Build backbone ``name`` for ``spec``; unknown names and options are ConfigErrors."""
    cls = resolve(name)
    accepted = accepted_options(cls)
    if accepted is not None:
        for key in options:
            if key not in accepted:
                raise ConfigError(
                    f"backbone '{name}' has no option '{key}'; accepted: {', '.join(sorted(accepted))}",
                    key=f"model.options.{key}")
    return cls(spec, **{k: _plain(v) for k, v in options.items()})
