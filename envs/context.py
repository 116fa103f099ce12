"""Session context of every row, computed from the log in one vectorised pass.

In offline replay the next state does not depend on the action, so a critic can only tell
one prediction's future cost from another's through what the state says about the rest
of the session. The row features alone say nothing about where in its session a row sits
or what happened before it; these features do. Each uses only rows EARLIER in the same
session (never the row's own labels), so they leak nothing the model could not know.

Groups (``CONTEXT_FEATURES``; columns in this order):
- position: log1p(index of the row in its session)
- elapsed:  log1p(seconds since the session's first event)
- gap:      log1p(seconds since the previous event; 0 at the first)
- history:  per task, log1p(positives earlier in the session)
- last:     per task, the previous row's label (0 at the first)

SessionEnv, build_transitions, the critics and the RMTL weights all read this one function.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rmtl.data.sessionlog import SessionLog
from rmtl.errors import ConfigError

CONTEXT_FEATURES = ("position", "elapsed", "gap", "history", "last")


def check_context(names: Sequence[str] | None, key: str = "agent.context") -> tuple[str, ...]:
    names = tuple(names or ())
    unknown = [n for n in names if n not in CONTEXT_FEATURES]
    if unknown:
        raise ConfigError(f"unknown session-context feature '{unknown[0]}'; known: {', '.join(CONTEXT_FEATURES)}",
                          key=key)
    if len(set(names)) != len(names):
        raise ConfigError(f"a session-context feature is listed twice: {list(names)}", key=key)
    return names


def context_dim(names: Sequence[str], num_tasks: int) -> int:
    return sum(num_tasks if n in ("history", "last") else 1 for n in check_context(names))


def context_columns(names: Sequence[str], tasks: Sequence[str]) -> list[str]:
    """Column names of ``session_context`` (for logs and observation docs)."""
    cols: list[str] = []
    for n in check_context(names):
        cols += [f"{n}/{t}" for t in tasks] if n in ("history", "last") else [n]
    return cols


def session_context(log: SessionLog, names: Sequence[str]) -> np.ndarray:
    """float32 [N, C] context of every row of ``log`` (usually a split view); C = 0 for no names."""
    names = check_context(names)
    n, k = log.labels.shape
    if not names:
        return np.zeros((n, 0), np.float32)
    ptr = np.asarray(log.session_ptr, dtype=np.int64)
    lengths = np.diff(ptr)
    start = np.repeat(ptr[:-1], lengths)  # first row of each row's session
    pos = np.arange(n, dtype=np.int64) - start
    first = pos == 0
    time = np.asarray(log.time, dtype=np.float64)
    cols: list[np.ndarray] = []
    for name in names:
        if name == "position":
            cols.append(np.log1p(pos)[:, None])
        elif name == "elapsed":
            cols.append(np.log1p(np.maximum(time - time[start], 0.0) / 1000.0)[:, None])
        elif name == "gap":
            prev = np.r_[time[:1], time[:-1]]
            gap = np.where(first, 0.0, np.maximum(time - prev, 0.0) / 1000.0)
            cols.append(np.log1p(gap)[:, None])
        elif name == "history":
            y = np.asarray(log.labels, dtype=np.float64)
            c = np.cumsum(y, axis=0) - y  # positives before this row, over the whole log
            cols.append(np.log1p(c - c[start]))  # minus those before the session's first row
        elif name == "last":
            y = np.asarray(log.labels, dtype=np.float32)
            prev = np.r_[np.zeros((1, k), np.float32), y[:-1]]
            prev[first] = 0.0
            cols.append(prev)
    return np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=np.float32)


def context_bounds(context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finite Box bounds of a context array (upper >= lower; one dummy column when C = 0)."""
    if context.shape[1] == 0:
        return np.full(1, -1.0, np.float32), np.full(1, 1.0, np.float32)
    low = context.min(axis=0).astype(np.float32) if len(context) else np.zeros(context.shape[1], np.float32)
    high = context.max(axis=0).astype(np.float32) if len(context) else np.ones(context.shape[1], np.float32)
    return low, np.maximum(high, low)
