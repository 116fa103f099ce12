"""Atomic file writes: write to a temporary name beside the target, then rename.

A reader (or a crashed run) never sees half a file under the final name, and a failed
write leaves nothing behind.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


# Temporary names carry the writer's process id (".last.pt.p1234-abcd.tmp",
# ".tmp-p1234-<entry>-abcd"), so the next run can tell a dead writer's leftovers (kill -9)
# from a live writer's file and remove only the former.
_PID = re.compile(r"(?:^|[.-])p(\d+)-")
STALE_AFTER_SECONDS = 6 * 3600  # leftovers without a pid (older versions) go after this long


def temp_prefix(name: str) -> str:
    """The prefix of a temporary file beside ``name`` (for mkstemp / mkdtemp)."""
    return f".{name}.p{os.getpid()}-"


def remove_stale(folder: str | os.PathLike, pattern: str) -> int:
    """Delete the temporaries matching ``pattern`` in ``folder`` whose writer process is gone
    (or, without a pid in the name, older than STALE_AFTER_SECONDS). Returns how many went."""
    removed = 0
    now = time.time()
    for tmp in Path(folder).glob(pattern):
        try:
            found = _PID.search(tmp.name)
            if found:
                if _alive(int(found.group(1))):
                    continue
            elif now - tmp.lstat().st_mtime <= STALE_AFTER_SECONDS:
                continue
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed += 1
        except OSError:
            pass  # raced with its owner or another cleaner
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on a clean exit it replaces ``path``
    (mode 0644, like any ordinary output), on an error it is removed. ``suffix`` matters to
    writers that pick a format by extension (matplotlib) or append one (numpy's savez).
    Leftovers of a killed earlier writer of the same target are removed first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent, f".{glob.escape(path.name)}.p*-*{suffix}")
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=suffix, dir=path.parent)
    except OSError as err:
        from rmtl.errors import DataError

        raise DataError(f"cannot write ({err.strerror or err})", path=path) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except OSError as err:  # disk full, read-only or vanished folder: name the target, not the temporary
        from rmtl.errors import DataError

        raise DataError(f"cannot write ({err.strerror or err}); nothing was written", path=path) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, default=float) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=default))


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """A JSON file read back (e.g. metrics.json): a missing, truncated or non-UTF-8 file is one
    DataError naming it, not a traceback."""
    from rmtl.errors import DataError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"no such {what}", path=path) from None
    except json.JSONDecodeError as err:
        raise DataError(f"not a complete {what} (invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}); "
                        "the run that wrote it may have been cut short", path=path) from None
    except UnicodeDecodeError:
        raise DataError(f"not UTF-8 text; expected a {what}", path=path) from None
    except OSError as err:
        raise DataError(f"cannot read the {what} ({err.strerror or err})", path=path) from None
