"""A lazy name -> class registry, shared by the backbones and the weighting strategies
(the data sources, rmtl.data.sources, use its ``import_target``).

Entries are classes or "package.module:Class" strings imported on first use, so listing
the names imports nothing and a module that is not there only matters when its name is built.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from rmtl.errors import ConfigError, unknown_name

_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def import_target(target: str, kind: str, name: str) -> Any:
    """The object a "package.module:attr" string names, imported now. A missing module or
    attribute is a ConfigError naming the ``kind`` and ``name`` it was registered under."""
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # the module itself is missing (a registry problem), not one of its own imports
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ConfigError(f"{kind} '{name}' is registered as '{target}' but module '{module_name}' "
                              "does not exist (not installed or not written yet)") from None
        raise
    obj = getattr(module, attr, None)
    if obj is None:
        raise ConfigError(f"{kind} '{name}': module '{module_name}' has no '{attr}'")
    return obj


def accepted_options(cls: type, passed: int = 1) -> list[str] | None:
    """Keyword options of ``cls.__init__`` after self and the ``passed`` positional arguments
    the caller supplies itself (spec, num_tasks); None when it takes **kwargs (anything goes)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params[passed:] if p.kind in _KEYWORD]


class Registry:
    """Names -> classes for one kind of part ("backbone", "strategy").

    ``entries`` is kept (not copied) as the store; ``option_prefix`` is the config key the
    options live under (errors name ``<option_prefix>.<option>``); targets must subclass
    ``base`` when given; ``no_option`` is the unknown-option message.
    """

    def __init__(self, kind: str, option_prefix: str, entries: dict[str, str | type], *, base: type | None = None,
                 no_option: str = "{kind} '{name}' has no option '{option}'; accepted options: {accepted}"):
        self.kind, self.option_prefix, self.entries, self.base, self.no_option = (
            kind, option_prefix, entries, base, no_option)

    def available(self) -> list[str]:
        return sorted(self.entries)

    def register(self, name: str, target: str | type, *, replace: bool) -> None:
        """Add ``target`` (a class or a "module:Class" string) under ``name``; a name already
        there is only replaced when ``replace`` is true."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if isinstance(target, str):
            if target.count(":") != 1:
                raise ConfigError(f"{self.kind} target must look like 'package.module:Class', got {target!r}")
        elif not (inspect.isclass(target) and issubclass(target, self.base or object)):
            what = f"a {self.base.__name__} subclass" if self.base else "a class"
            raise ConfigError(f"{self.kind} target must be {what} or 'module:Class', got {target!r}")
        if name in self.entries and not replace:
            raise ConfigError(f"{self.kind} '{name}' is already registered ({self.entries[name]!r}); "
                              "pass replace=True to override")
        self.entries[name] = target

    def name_of(self, obj: Any) -> str | None:
        """The name ``obj``'s class is registered under (None when it is not), without importing anything."""
        cls = type(obj)
        path = f"{cls.__module__}:{cls.__qualname__}"
        return next((name for name, target in sorted(self.entries.items()) if target is cls or target == path), None)

    def resolve(self, name: str) -> type:
        """The class registered under ``name`` (imports its module on first use)."""
        if name not in self.entries:
            raise unknown_name(self.kind, name, self.entries)
        target = self.entries[name]
        return target if not isinstance(target, str) else import_target(target, self.kind, name)

    def check_options(self, name: str, cls: type, options: dict[str, Any], passed: int) -> None:
        """A ConfigError naming ``<option_prefix>.<option>`` for an option ``cls`` does not take."""
        accepted = accepted_options(cls, passed)
        for option in options if accepted is not None else ():
            if option not in accepted:
                listed = ", ".join(sorted(accepted)) or "(none)"
                raise ConfigError(self.no_option.format(kind=self.kind, name=name, option=option, accepted=listed),
                                  key=f"{self.option_prefix}.{option}")

    def build(self, name: str, *args: Any, **options: Any) -> Any:
        """``cls(*args, **options)`` for the class under ``name``, options checked first."""
        cls = self.resolve(name)
        self.check_options(name, cls, options, passed=len(args))
        return cls(*args, **options)
