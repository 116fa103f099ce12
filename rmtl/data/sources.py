"""Data sources by name: what ``prepare`` needs to know about a raw source, in one place.

A source is a reader (raw files -> RawEvents, see raw.py) plus a few facts: an optional
synthetic writer in the same raw schema (the embedded default when no data_dir is
given) with its default sizes, the default order and fractions of the split, and
what the reader takes (session_gap= when it cuts sessions itself, strict=). Readers and writers are "module:function"
strings imported on first use, so listing the sources imports no reader.

Adding a source is one new file (the reader) and one entry below, or at run time:

    from rmtl.data.sources import DataSource, register_source
    register_source("tenrec", DataSource(reader="mypkg.tenrec:read_tenrec"))

See docs/adding-a-data-source.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from rmtl.errors import ConfigError, unknown_name
from rmtl.registry import import_target

SPLIT_ORDERS = ("time", "random")


@dataclass(frozen=True)
class DataSource:
    # read(path, **reader_options) -> RawEvents; a "module:function" string or the function
    reader: str | Callable
    # write(out_dir, *, users, items, seed, **options) -> {name: path} of raw files the reader
    # reads back; None = no embedded default (the user must give data_dir)
    synthetic_writer: str | Callable | None = None
    synthetic_sizes: Mapping[str, Any] = field(default_factory=dict)  # users / items of the embedded default
    split_order: str = "time"  # default order of sessions before the 6:2:2 split: time | random
    split_ratios: tuple = (0.6, 0.2, 0.2)  # default train / val / test fractions of the rows
    reader_takes_session_gap: bool = False  # the reader cuts sessions itself (labels that must not cross them)
    reader_takes_strict: bool = False  # the reader takes strict= (`rmtl prepare --strict`: a missing file is an error)

    def __post_init__(self):
        if self.split_order not in SPLIT_ORDERS:
            raise ConfigError(f"split_order must be one of {', '.join(SPLIT_ORDERS)}, got {self.split_order!r}")
        for what, target in (("reader", self.reader), ("synthetic_writer", self.synthetic_writer)):
            if isinstance(target, str) and target.count(":") != 1:
                raise ConfigError(f"{what} must look like 'package.module:function', got {target!r}")
            if target is not None and not isinstance(target, str) and not callable(target):
                raise ConfigError(f"{what} must be a function or 'package.module:function', got {target!r}")


_SOURCES: dict[str, DataSource] = {
    "retailrocket": DataSource(reader="rmtl.data.retailrocket:read_retailrocket",
                               synthetic_writer="rmtl.data.synth_retailrocket:write_retailrocket",
                               synthetic_sizes={"users": 5000, "items": 1000}, reader_takes_session_gap=True),
    "kuairand": DataSource(reader="rmtl.data.kuairand:read_kuairand",
                           synthetic_writer="rmtl.data.synth_kuairand:write_kuairand",
                           synthetic_sizes={"users": 1000, "items": 2000}, reader_takes_session_gap=True,
                           reader_takes_strict=True),
    # 50/25/25 as configs/census.yaml (with .data and .test both given, .test is the test split)
    "census": DataSource(reader="rmtl.data.census:read_census", split_order="random", split_ratios=(0.5, 0.25, 0.25),
                         reader_takes_strict=True),
}


def source_names() -> list[str]:
    """Registered source names, sorted."""
    return sorted(_SOURCES)


def synthetic_names() -> list[str]:
    """The sources with a synthetic writer (an embedded default), sorted."""
    return sorted(n for n, s in _SOURCES.items() if s.synthetic_writer is not None)


def get_source(name: str) -> DataSource:
    """The DataSource registered under ``name`` (unknown: a ConfigError listing the known)."""
    if name not in _SOURCES:
        raise unknown_name("data source", name, _SOURCES)
    return _SOURCES[name]


def register_source(name: str, source: DataSource, *, replace: bool = False) -> None:
    """Add ``source`` under ``name``; a name already there is only replaced when ``replace``."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a data source name must be a non-empty string, got {name!r}")
    if not isinstance(source, DataSource):
        raise ConfigError(f"data source '{name}' must be a DataSource, got {type(source).__name__}")
    if name in _SOURCES and not replace:
        raise ConfigError(f"data source '{name}' is already registered; pass replace=True to override")
    _SOURCES[name] = source


def reader(name: str) -> Callable:
    """The reader function of source ``name`` (imported on first use)."""
    target = get_source(name).reader
    return import_target(target, "data source", name) if isinstance(target, str) else target


def synthetic_writer(name: str) -> Callable:
    """The synthetic writer of source ``name``; a source without one is a ConfigError."""
    target = get_source(name).synthetic_writer
    if target is None:
        raise unknown_name("synthetic schema", name, synthetic_names())
    return import_target(target, "synthetic writer of", name) if isinstance(target, str) else target


def default_split_order(name: str) -> str:
    """The source's default split order; "time" for a name that is not registered (a
    RawEvents built by hand)."""
    return _SOURCES[name].split_order if name in _SOURCES else "time"


def default_split_ratios(name: str) -> tuple:
    """The source's default (train, val, test) fractions; 6:2:2 for a name not registered."""
    return tuple(_SOURCES[name].split_ratios) if name in _SOURCES else (0.6, 0.2, 0.2)
