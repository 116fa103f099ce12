"""SessionEnv: a logged session replayed as a Gymnasium episode.

An episode is one session of a SessionLog (sampled under the reset seed, or taken in
order for evaluation). The observation is the current event's features; the action is
the predicted probability per task; the reward per task is the negative BCE (or minus
the absolute error) against the logged label. The next state is the next logged row of
the session whatever the action (offline replay), and the episode terminates after the
session's last event.

With ``context`` (names from rmtl.envs.context), the observation also has "context": the
row's session-context features (position, time since start, earlier positives, ...),
the same numbers build_transitions and the critics use.
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rmtl.data.sessionlog import SessionLog
from rmtl.errors import ConfigError, DataError
from rmtl.envs.context import context_bounds, session_context
from rmtl.envs.rewards import check_reward_kind, task_rewards

ORDERS = ("random", "sequential")


def _task_weights(weights: Sequence[float] | None, num_tasks: int) -> np.ndarray:
    if weights is None:
        return np.ones(num_tasks, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    if w.shape != (num_tasks,) or not np.all(np.isfinite(w)):
        raise ConfigError(f"expected {num_tasks} finite numbers (one per task), got {list(np.asarray(weights).reshape(-1))}",
                          key="task_weights")
    return w


def dense_bounds(log: SessionLog) -> tuple[np.ndarray, np.ndarray]:
    """Finite per-column bounds of the dense features (a Box needs finite bounds to be checker-clean)."""
    if log.dense.shape[1] == 0:
        return np.full(1, -1.0, np.float32), np.full(1, 1.0, np.float32)
    if log.num_rows == 0:
        raise DataError("the log has no rows", column="dense")
    if not np.all(np.isfinite(log.dense)):
        raise DataError("dense features contain NaN or infinity; expected finite values", column="dense")
    low = log.dense.min(axis=0).astype(np.float32)
    high = log.dense.max(axis=0).astype(np.float32)
    return low, np.maximum(high, low)


class SessionEnv(gym.Env):
    """Gymnasium env over one split of a SessionLog (see the module docstring).

    info of reset/step: ``row`` (the row the observation shows), ``session``; step also
    gives ``task_rewards`` [K] (float32), ``labels`` [K] and ``judged_row`` (the row the
    action was scored against).
    """

    metadata = {"render_modes": []}

    def __init__(self, log: SessionLog, *, task_weights: Sequence[float] | None = None, reward: str = "bce",
                 order: str = "random", max_sessions: int | None = None, context: Sequence[str] = ()):
        super().__init__()
        if order not in ORDERS:
            raise ConfigError(f"unknown order '{order}'; known: {', '.join(ORDERS)}", key="order")
        self.reward_kind = check_reward_kind(reward)
        self.order = order
        self.log = log
        self.num_tasks = log.labels.shape[1]
        self.task_weights = _task_weights(task_weights, self.num_tasks)
        num_sessions = log.num_sessions
        if max_sessions is not None:
            if int(max_sessions) <= 0:
                raise ConfigError(f"expected a positive number, got {max_sessions}", key="max_sessions")
            num_sessions = min(num_sessions, int(max_sessions))
        if num_sessions == 0:
            raise DataError("the log has no sessions to replay", column="session_ptr")
        self.num_sessions = num_sessions
        self._ptr = np.asarray(log.session_ptr, dtype=np.int64)
        self._has_dense = log.dense.shape[1] > 0

        cards = np.asarray([max(int(c), 1) for c in log.spec.cardinalities], dtype=np.int64)
        low, high = dense_bounds(log)
        obs = {"sparse": spaces.MultiDiscrete(cards), "dense": spaces.Box(low=low, high=high, dtype=np.float32)}
        self._context = session_context(log, context) if context else None
        if self._context is not None:
            c_low, c_high = context_bounds(self._context)
            obs["context"] = spaces.Box(low=c_low, high=c_high, dtype=np.float32)
        self.observation_space = spaces.Dict(obs)
        self.action_space = spaces.Box(low=0.0, high=1.0, shape=(self.num_tasks,), dtype=np.float32)

        self._next_session = 0  # cursor of the sequential order
        self._session = 0
        self._row = 0
        self._end = 0

    # -- helpers -------------------------------------------------------------------------
    def _obs(self, row: int) -> dict[str, np.ndarray]:
        dense = self.log.dense[row] if self._has_dense else np.zeros(1, np.float32)
        obs = {"sparse": np.asarray(self.log.sparse[row], dtype=np.int64).copy(),
               "dense": np.asarray(dense, dtype=np.float32).copy()}
        if self._context is not None:
            obs["context"] = self._context[row].copy()
        return obs

    # -- gymnasium API -------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "session" in options:  # replay one given session (evaluation, tests)
            session = int(options["session"])
            if not 0 <= session < self.num_sessions:
                raise ConfigError(f"expected a session in [0, {self.num_sessions}), got {session}", key="session")
        elif self.order == "random":
            session = int(self.np_random.integers(self.num_sessions))
        else:
            if seed is not None:  # a seeded reset restarts the sequential pass, so it is reproducible
                self._next_session = 0
            session = self._next_session
            self._next_session = (self._next_session + 1) % self.num_sessions
        self._session = session
        self._row = int(self._ptr[session])
        self._end = int(self._ptr[session + 1])
        return self._obs(self._row), {"row": self._row, "session": session}

    def step(self, action):
        action = np.asarray(action, dtype=np.float32).reshape(self.num_tasks)
        judged = self._row
        labels = self.log.labels[judged]
        rewards = task_rewards(labels, action, self.reward_kind)
        terminated = judged + 1 >= self._end
        if not terminated:
            self._row = judged + 1
        # the observation after the last event repeats it (the transitions' next_row does the same)
        info = {"row": self._row, "judged_row": judged, "session": self._session,
                "task_rewards": rewards, "labels": np.asarray(labels, dtype=np.float32).copy()}
        reward = float(np.dot(self.task_weights, rewards))
        return self._obs(self._row), reward, bool(terminated), False, info
