"""Session dynamics for the synthetic writers: outcomes that depend on what came before.

Without them every impression is an independent draw from fixed user / item factors, so
nothing in a session's past says anything about its future and a critic's "future value"
can only come from the ids. With strength s > 0, per session:

    h_0 ~ N(0, H0^2)                                              latent intent
    P(click_t) = sigmoid(x_t + s * (h_t - FATIGUE * t))           x_t: the writer's static logit
    h_{t+1} = RHO * h_t + KAPPA * click_t + NOISE * N(0, 1)       clicks raise intent
    P(leave after t) = sigmoid(LEAVE0 - s * (LEAVE_H * h_t + LEAVE_C * click_t))

so session length depends on behaviour (low intent and no click: the user leaves), clicks
cluster (lag-1 correlation), and the click rate moves with position. s = 0 draws exactly
what the writers drew before (same uniforms, nobody leaves early): the negative control.
The writers add their schema's own links (carts after earlier views of a category,
purchases that lean on intent) scaled by the same s.

The simulation is vectorised over sessions and loops over positions only.
"""

from __future__ import annotations

import numpy as np

from rmtl.errors import ConfigError

STRENGTH_RANGE = (0.0, 3.0)
H0, RHO, KAPPA, NOISE = 0.7, 0.7, 1.2, 0.4
FATIGUE = 0.08
LEAVE0, LEAVE_H, LEAVE_C = float(np.log(0.06 / 0.94)), 1.0, 1.0


def check_strength(value, key: str = "dynamics") -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a number in [{STRENGTH_RANGE[0]}, {STRENGTH_RANGE[1]}], got {value!r}",
                          key=key) from None
    if not STRENGTH_RANGE[0] <= s <= STRENGTH_RANGE[1]:
        raise ConfigError(f"expected a number in [{STRENGTH_RANGE[0]}, {STRENGTH_RANGE[1]}], got {value!r}", key=key)
    return s


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def positions(session: np.ndarray) -> np.ndarray:
    """Index of each row within its session (rows of a session contiguous and in time order)."""
    session = np.asarray(session)
    start = np.flatnonzero(np.r_[True, session[1:] != session[:-1]])
    lengths = np.diff(np.r_[start, len(session)])
    return np.arange(len(session)) - np.repeat(start, lengths)


def simulate(uniform: np.ndarray, logit: np.ndarray, session: np.ndarray, strength: float,
             seed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(click bool [n], keep bool [n], intent float [n]) for rows grouped by session in time order.

    ``uniform`` are the writer's own U(0,1) draws (click = uniform < p), so strength 0 gives
    its old draws bit for bit; the dynamics' extra noise comes from ``seed``'s own generator.
    keep is False for rows after the user left; intent is h_t (0 when strength is 0)."""
    n = len(logit)
    if strength == 0 or n == 0:
        return uniform < _sigmoid(logit), np.ones(n, bool), np.zeros(n)
    rng = np.random.default_rng(seed)
    session = np.asarray(session)
    _, sess = np.unique(session, return_inverse=True)
    pos = positions(session)
    h = rng.normal(0.0, H0, int(sess.max()) + 1)
    alive = np.ones(len(h), bool)
    click = np.zeros(n, bool)
    keep = np.zeros(n, bool)
    intent = np.zeros(n)
    order = np.argsort(pos, kind="stable")
    bounds = np.searchsorted(pos[order], np.arange(int(pos.max()) + 2))
    for t in range(int(pos.max()) + 1):  # positions, not rows: every session moves one step at once
        idx = order[bounds[t]:bounds[t + 1]]
        idx = idx[alive[sess[idx]]]
        if len(idx) == 0:
            break
        s_ = sess[idx]
        keep[idx] = True
        intent[idx] = h[s_]
        c = uniform[idx] < _sigmoid(logit[idx] + strength * (h[s_] - FATIGUE * t))
        click[idx] = c
        leave = rng.random(len(idx)) < _sigmoid(LEAVE0 - strength * (LEAVE_H * h[s_] + LEAVE_C * c))
        h[s_] = RHO * h[s_] + KAPPA * c + NOISE * rng.normal(size=len(idx))
        alive[s_[leave]] = False
    return click, keep, intent


def simulate_calibrated(uniform, static: np.ndarray, session, strength: float, seed, rate: float,
                        intercept: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``simulate`` with logit intercept + static, the intercept moved once so the click rate of
    the kept rows is about ``rate`` again (the dynamics shift it). Returns (..., intercept)."""
    click, keep, intent = simulate(uniform, intercept + static, session, strength, seed)
    if strength == 0 or not keep.any():
        return click, keep, intent, intercept
    got = float(np.clip(click[keep].mean(), 1e-4, 1 - 1e-4))
    intercept = intercept + np.log(rate / (1 - rate)) - np.log(got / (1 - got))
    click, keep, intent = simulate(uniform, intercept + static, session, strength, seed)
    return click, keep, intent, intercept


def earlier_in_session(session: np.ndarray, key: np.ndarray) -> np.ndarray:
    """bool [n]: an earlier row of the same session has the same key (e.g. the item's category)."""
    session, key = np.asarray(session, np.int64), np.asarray(key, np.int64)
    combo = session * (int(key.max()) + 1 if len(key) else 1) + key
    _, first = np.unique(combo, return_index=True)
    seen = np.ones(len(key), bool)
    seen[first] = False  # rows are in time order within a session, so the first index is the earliest
    return seen


def summary(labels: np.ndarray, session: np.ndarray, max_position: int = 10) -> dict:
    """{lag1: within-session lag-1 correlation of the labels, ctr_by_position: [rate at 0..max]}."""
    labels = np.asarray(labels, dtype=np.float64)
    session = np.asarray(session)
    same = session[1:] == session[:-1]
    a, b = labels[:-1][same], labels[1:][same]
    lag1 = float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")
    pos = positions(session)
    top = min(int(pos.max()) if len(pos) else 0, max_position)
    ctr = [float(labels[pos == t].mean()) for t in range(top + 1)]
    return {"lag1": lag1, "ctr_by_position": ctr}


def raw_summary(raw, gap_ms: int = 1_800_000) -> dict:
    """``summary`` of a reader's RawEvents (first task): sessions as the reader cut them, else
    per user with a ``gap_ms`` inactivity gap."""
    frame = raw.frame
    if "session" in frame.columns:
        frame = frame.sort_values(["session", "time"], kind="stable")
        session = frame["session"].to_numpy()
    else:
        frame = frame.sort_values(["user", "time"], kind="stable")
        user, time = frame["user"].to_numpy(), frame["time"].to_numpy()
        session = np.cumsum(np.r_[True, (user[1:] != user[:-1]) | (np.diff(time) > gap_ms)])
    return summary(frame[raw.tasks[0]].to_numpy(), session)
