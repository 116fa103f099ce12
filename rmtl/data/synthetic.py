"""Synthetic raw logs in the real schemas: one entry point over the per-schema writers.

The writers (synth_retailrocket.py, synth_kuairand.py) write files that the real readers
read unchanged, so the embedded default exercises exactly the code that real data does.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

from rmtl.data import sources


def schemas() -> list[str]:
    """The sources with a synthetic writer (rmtl.data.sources registers them)."""
    return sources.synthetic_names()


def writer(schema: str):
    """The writer function of a schema (unknown schema -> ConfigError listing the known)."""
    return sources.synthetic_writer(schema)


def source_digest(*paths: str | Path) -> str:
    """A short digest of source files' bytes. Writer modules call it at import time
    (``WRITER_DIGEST``), so the tag names the code that is loaded, not the file on disk."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:8]


_LATE_DIGESTS: dict[str, str] = {}  # writers without WRITER_DIGEST: taken on first ask, then fixed


def writer_version(schema: str) -> str:
    """A short digest of the writer's source as loaded: the embedded default is rewritten
    when the writer changes, so an old cached copy never hides a new generator. A writer
    edited on disk after import keeps its tag: a long-lived process still writes the old
    data, so it must not claim the new version."""
    module = inspect.getmodule(writer(schema))
    digest = getattr(module, "WRITER_DIGEST", None)
    if digest is None:
        digest = _LATE_DIGESTS.setdefault(module.__name__, source_digest(module.__file__))
    return digest


def write_synthetic(schema: str, out_dir: str | Path, **kw) -> dict[str, Path]:
    """Write synthetic raw files of ``schema`` into ``out_dir``; returns name -> path.

    ``users`` / ``items`` default to the source's ``synthetic_sizes``; other keywords (seed,
    task_correlation, ...) go to the schema's writer unchanged.
    """
    fn = writer(schema)
    args = {**sources.get_source(schema).synthetic_sizes, **kw}
    return fn(out_dir, **args)
