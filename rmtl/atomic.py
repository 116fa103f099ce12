"""Atomic file writes: write to a temporary name beside the target, then rename.

A reader (or a crashed run) never sees half a file under the final name, and a failed
write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on a clean exit it replaces ``path``
    (mode 0644, like any ordinary output), on an error it is removed. ``suffix`` matters to
    writers that pick a format by extension (matplotlib) or append one (numpy's savez)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, default=float) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=default))
