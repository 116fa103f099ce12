"""Synthetic raw logs in the real schemas: one entry point over the per-schema writers.

The writers (synth_retailrocket.py, synth_kuairand.py) write files that the real readers
read unchanged, so the embedded default exercises exactly the code that real data does.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from rmtl.errors import unknown_name

# schema -> "module:function" (imported lazily: a schema's writer loads only when used)
WRITERS = {
    "retailrocket": "rmtl.data.synth_retailrocket:write_retailrocket",
    "kuairand": "rmtl.data.synth_kuairand:write_kuairand",
}
# Sizes of the embedded default: big enough to train on, small enough to write in seconds.
DEFAULT_SIZES = {
    "retailrocket": {"users": 5000, "items": 1000},
    "kuairand": {"users": 1000, "items": 2000},
}


def schemas() -> list[str]:
    return sorted(WRITERS)


def writer(schema: str):
    """The writer function of a schema (unknown schema -> ConfigError listing the known)."""
    if schema not in WRITERS:
        raise unknown_name("synthetic schema", schema, WRITERS)
    module, func = WRITERS[schema].split(":")
    return getattr(importlib.import_module(module), func)


def writer_version(schema: str) -> str:
    """A short digest of the writer's source: the embedded default is rewritten when the
    writer changes, so an old cached copy never hides a new generator."""
    import hashlib
    import inspect

    module = inspect.getmodule(writer(schema))
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:8]


def write_synthetic(schema: str, out_dir: str | Path, **kw) -> dict[str, Path]:
    """Write synthetic raw files of ``schema`` into ``out_dir``; returns name -> path.

    ``users`` / ``items`` default to DEFAULT_SIZES[schema]; other keywords (seed,
    task_correlation, ...) go to the schema's writer unchanged.
    """
    fn = writer(schema)
    args = {**DEFAULT_SIZES[schema], **kw}
    return fn(out_dir, **args)
