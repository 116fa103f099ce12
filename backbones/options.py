"""Validation of backbone options: one ConfigError naming the option on bad values."""

from __future__ import annotations

from typing import Any, Sequence

from rmtl.errors import ConfigError
from rmtl.backbones.layers import ACTIVATIONS


def dims(name: str, value: Any, *, allow_empty: bool = False) -> tuple[int, ...]:
    """A list of positive layer widths (an int is a one-layer list)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        out = tuple(int(v) for v in value)
        ok = all(int(v) == v and v > 0 for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok or (not out and not allow_empty):
        need = "a list of positive integers" + ("" if allow_empty else " (at least one)")
        raise ConfigError(f"expected {need}, got {value!r}", key=name)
    return out


def positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ConfigError(f"expected an integer >= {minimum}, got {value!r}", key=name)
    if int(value) < minimum:
        raise ConfigError(f"expected an integer >= {minimum}, got {value!r}", key=name)
    return int(value)


def probability(name: str, value: Any) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = -1.0
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"expected a number in [0, 1), got {value!r}", key=name)
    return p


def activation(name: str, value: Any) -> str:
    if value not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {value!r}; known: {', '.join(ACTIVATIONS)}", key=name)
    return str(value)


def common(embed_dim: Any, dropout: Any, act: Any, dense_dim: Any = None) -> tuple[int, float, str, int | None]:
    """The options every built-in backbone takes."""
    dd = None if dense_dim is None else positive_int("dense_dim", dense_dim)
    return positive_int("embed_dim", embed_dim), probability("dropout", dropout), activation("activation", act), dd


def task_index(spec_tasks: Sequence[str], value: Any, key: str = "task") -> int:
    """A task given by name or index -> its column index."""
    if isinstance(value, str) and value in spec_tasks:
        return list(spec_tasks).index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(spec_tasks):
        return int(value)
    raise ConfigError(f"expected one of the tasks {list(spec_tasks)} (or its index), got {value!r}", key=key)
