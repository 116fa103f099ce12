"""Backbones by name. Entries are "module:Class" strings, imported on first use, so
adding an architecture is a one-line edit here (or ``register`` at run time)."""

from __future__ import annotations

from typing import Any

from torch import nn

from rmtl import registry
from rmtl.data.spec import FeatureSpec

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
_BACKBONES = registry.Registry("backbone", "model.options", _REGISTRY,
                               no_option="{kind} '{name}' has no option '{option}'; accepted: {accepted}")


def available() -> list[str]:
    """Registered backbone names, sorted."""
    return _BACKBONES.available()


def register(name: str, target: str | type) -> None:
    """Add (or replace) a backbone: ``target`` is a class or a "module:Class" string.
    The class is called as ``cls(spec, **options)``."""
    if not isinstance(target, (str, type)):
        raise TypeError("target must be a class or a 'module:Class' string")
    _BACKBONES.register(str(name), target, replace=True)  # backbones: the last registration wins


def name_of(model: nn.Module) -> str | None:
    """The registered name of the model's class (None for a user's own module)."""
    return _BACKBONES.name_of(model)


def resolve(name: str) -> type:
    """The class registered under ``name`` (imported on first use)."""
    return _BACKBONES.resolve(name)


def accepted_options(cls: type) -> list[str] | None:
    """Keyword options of ``cls(spec, ...)``; None when it takes **kwargs (anything goes)."""
    return registry.accepted_options(cls, passed=1)


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain lists / dicts (configs hand options over as such)."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def build(name: str, spec: FeatureSpec, **options: Any) -> nn.Module:
    """Build backbone ``name`` for ``spec``; unknown names and options are ConfigErrors."""
    cls = resolve(name)
    _BACKBONES.check_options(name, cls, options, passed=1)  # names first, then plain values (as before)
    return cls(spec, **{k: _plain(v) for k, v in options.items()})
