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
    order = np.lexsort((time_ms, user_codes))
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
