"""One family of errors that the command line turns into a single clear message."""

from __future__ import annotations

from pathlib import Path


class RmtlError(Exception):
    """Base class: the CLI prints ``str(err)`` and exits with status 2, no traceback."""


class DataError(RmtlError):
    """Bad input data: names the file and column (when known) and what was expected."""

    def __init__(self, message: str, *, path: str | Path | None = None, column: str | None = None):
        self.path = None if path is None else str(path)
        self.column = column
        where = []
        if self.path is not None:
            where.append(self.path)
        if column is not None:
            where.append(f"column '{column}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ConfigError(RmtlError):
    """Bad configuration: names the key and what was expected (e.g. the known names)."""

    def __init__(self, message: str, *, key: str | None = None):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)


def unknown_name(kind: str, name: str, known) -> ConfigError:
    """The standard 'unknown X' error listing the known names."""
    known = sorted(known)
    return ConfigError(f"unknown {kind} '{name}'; known: {', '.join(known)}")
