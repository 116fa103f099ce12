"""Cutting a user's time-ordered events into sessions, vectorised."""

from __future__ import annotations

import numpy as np


def assign_sessions(user_codes: np.ndarray, time_ms: np.ndarray, gap_seconds: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Session id per event and the order that sorts events by (user, time).

    A new session starts at a user's first event and wherever the gap to the user's
    previous event exceeds ``gap_seconds``; ``None`` means one session per user (as the
    RMTL reference code does). Returns ``(session, order)``: ``session[i]`` is the session
    id of event i (ids are dense, ascending along ``order``), ``order`` the stable
    permutation sorting by (user, time).
    """
    user_codes = np.asarray(user_codes)
    time_ms = np.asarray(time_ms, dtype=np.int64)
    order = group_time_order(user_codes, time_ms)
    u = user_codes[order]
    t = time_ms[order]
    new = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        same_user = u[1:] == u[:-1]
        if gap_seconds is None:
            new[1:] = ~same_user
        else:
            new[1:] = ~same_user | ((t[1:] - t[:-1]) > int(round(gap_seconds * 1000)))
    sorted_session = np.cumsum(new, dtype=np.int64) - 1
    session = np.empty(len(order), dtype=np.int64)
    session[order] = sorted_session
    return session, order


def group_time_order(group: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
    """Stable permutation sorting by (group, time); same result as np.lexsort((time_ms, group)).

    Packs both keys into one int64 when they fit and does a single stable argsort,
    ~2.5x faster than lexsort at millions of rows.
    """
    group = np.asarray(group)
    time_ms = np.asarray(time_ms, dtype=np.int64)
    if len(group) == 0 or group.dtype.kind not in "iu":
        return np.lexsort((time_ms, group))
    g_min, g_max = int(group.min()), int(group.max())
    t_min, t_max = int(time_ms.min()), int(time_ms.max())
    span = t_max - t_min + 1
    if (g_max - g_min + 1) * span >= 2**62:
        return np.lexsort((time_ms, group))
    key = (group.astype(np.int64) - g_min) * span + (time_ms - t_min)
    return np.argsort(key, kind="stable")
