"""Synthetic raw logs in the real schemas: one entry point over the per-schema writers.

The writers (synth_retailrocket.py, synth_kuairand.py) write files that the real readers
read unchanged, so the embedded default exercises exactly the code that real data does.
"""

from __future__ import annotations

from pathlib import Path

from rmtl.data import sources


def schemas() -> list[str]:
    """The sources with a synthetic writer (rmtl.data.sources registers them)."""
    return sources.synthetic_names()


def writer(schema: str):
    """The writer function of a schema (unknown schema -> ConfigError listing the known)."""
    return sources.synthetic_writer(schema)


def writer_version(schema: str) -> str:
    """A short digest of the writer's source: the embedded default is rewritten when the
    writer changes, so an old cached copy never hides a new generator."""
    import hashlib
    import inspect

    module = inspect.getmodule(writer(schema))
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:8]


def write_synthetic(schema: str, out_dir: str | Path, **kw) -> dict[str, Path]:
    """Write synthetic raw files of ``schema`` into ``out_dir``; returns name -> path.

    ``users`` / ``items`` default to the source's ``synthetic_sizes``; other keywords (seed,
    task_correlation, ...) go to the schema's writer unchanged.
    """
    fn = writer(schema)
    args = {**sources.get_source(schema).synthetic_sizes, **kw}
    return fn(out_dir, **args)
