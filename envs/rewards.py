"""Per-task rewards of a predicted probability against the logged label.

ONE function serves the step-by-step env and the vectorised transition builder, so the
two produce the same numbers bit for bit (same dtype, same operations, same order).
"""

from __future__ import annotations

import numpy as np

from rmtl.errors import ConfigError

EPS = 1e-6  # actions are clipped to [EPS, 1 - EPS] before the log, so rewards stay finite
REWARD_KINDS = ("bce", "abs")


def check_reward_kind(kind: str) -> str:
    if kind not in REWARD_KINDS:
        raise ConfigError(f"unknown reward '{kind}'; known: {', '.join(REWARD_KINDS)}", key="reward")
    return kind


def task_rewards(labels: np.ndarray, actions: np.ndarray, kind: str = "bce") -> np.ndarray:
    """float32 rewards of the same shape as ``labels`` ([K] or [N, K]); all <= 0.

    bce: y log a + (1 - y) log(1 - a) with a clipped to [EPS, 1 - EPS] (negative BCE);
    abs: -|y - a| with a clipped to [0, 1].
    """
    y = np.asarray(labels, dtype=np.float32)
    a = np.asarray(actions, dtype=np.float32)
    if kind == "bce":
        a = np.clip(a, np.float32(EPS), np.float32(1.0 - EPS))
        # where() instead of y*log(a) + (1-y)*log(1-a): labels are 0/1, and one log per entry is faster
        return np.where(y > 0.5, np.log(a), np.log1p(-a)).astype(np.float32, copy=False)
    if kind == "abs":
        return (-np.abs(y - np.clip(a, np.float32(0.0), np.float32(1.0)))).astype(np.float32, copy=False)
    check_reward_kind(kind)
    raise AssertionError  # unreachable
