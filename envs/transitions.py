"""All transitions of a SessionLog split in ONE vectorised call.

A transition is (state_row, action, reward [K], next_row, done): states are ROW INDICES
into the log, never copies of feature rows. Because the next state of an offline replay
is the next logged row whatever the action, the whole table follows from the session
offsets: next_row = row + 1, except the last event of a session, whose next_row is
itself with done = 1 (exactly what SessionEnv returns after the last step).

Behaviour policies:
- "noisy": the given predictions (e.g. the pretrained backbone's) + Gaussian noise of
  std ``noise_std``, clipped to [0, 1];
- "given": the given actions unchanged (equivalent to "noisy" with noise_std=0);
- "random": uniform in [0, 1] (what the RMTL reference code uses).

``context`` names session-context features (rmtl.envs.context); they come back as
``Transitions.context`` [N, C], one row per log row, so a state s = row r reads
``context[r]`` and its next state ``context[next_row[r]]``: the same numbers SessionEnv
shows in its observation's "context".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rmtl.data.sessionlog import SessionLog
from rmtl.errors import ConfigError, DataError
from rmtl.envs.context import session_context
from rmtl.envs.rewards import check_reward_kind, task_rewards

POLICIES = ("auto", "noisy", "given", "random")


@dataclass
class Transitions:
    state_row: np.ndarray  # int64 [N]
    action: np.ndarray  # float32 [N, K], in [0, 1]
    reward: np.ndarray  # float32 [N, K], per task, <= 0
    next_row: np.ndarray  # int64 [N]
    done: np.ndarray  # float32 [N], 1 at the last event of a session
    context: np.ndarray | None = None  # float32 [N, C] session context per ROW (None = none asked for)

    def __len__(self) -> int:
        return int(self.state_row.shape[0])


def next_rows(session_ptr: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(next_row int64 [N], done float32 [N]) from CSR session offsets."""
    ptr = np.asarray(session_ptr, dtype=np.int64)
    nxt = np.arange(1, num_rows + 1, dtype=np.int64)
    done = np.zeros(num_rows, dtype=np.float32)
    last = ptr[1:][ptr[1:] > ptr[:-1]] - 1  # last row of every non-empty session
    nxt[last] = last
    done[last] = 1.0
    return nxt, done


def behaviour_actions(num_rows: int, num_tasks: int, actions: np.ndarray | None, *, policy: str,
                      noise_std: float, rng: np.random.Generator) -> np.ndarray:
    if policy not in POLICIES:
        raise ConfigError(f"unknown behaviour policy '{policy}'; known: {', '.join(POLICIES)}", key="policy")
    if policy == "auto":
        policy = "random" if actions is None else "noisy"
    if policy == "random":
        return rng.random((num_rows, num_tasks), dtype=np.float32)
    if actions is None:
        raise ConfigError(f"behaviour policy '{policy}' needs actions (predictions [N, K])", key="actions")
    a = np.asarray(actions, dtype=np.float32)
    if a.shape != (num_rows, num_tasks):
        raise DataError(f"actions have shape {a.shape}; expected [rows, tasks] = [{num_rows}, {num_tasks}]", column="actions")
    if not np.all(np.isfinite(a)):
        raise DataError("actions contain NaN or infinity", column="actions")
    if policy == "noisy" and noise_std > 0:
        a = a + rng.standard_normal(a.shape, dtype=np.float32) * np.float32(noise_std)
    return np.clip(a, np.float32(0.0), np.float32(1.0))


def build_transitions(log: SessionLog, actions: np.ndarray | None = None, *, policy: str = "auto",
                      noise_std: float = 0.1, seed: int = 0, reward: str = "bce",
                      context: tuple[str, ...] | list[str] = ()) -> Transitions:
    """Every transition of ``log`` (usually a split view) in one call; see the module docstring.

    ``policy="auto"`` means "noisy" when ``actions`` are given, else "random".
    """
    check_reward_kind(reward)
    if noise_std < 0:
        raise ConfigError(f"expected noise_std >= 0, got {noise_std}", key="noise_std")
    n, k = log.labels.shape
    rng = np.random.default_rng(seed)
    action = behaviour_actions(n, k, actions, policy=policy, noise_std=noise_std, rng=rng)
    nxt, done = next_rows(log.session_ptr, n)
    return Transitions(
        state_row=np.arange(n, dtype=np.int64),
        action=action,
        reward=task_rewards(log.labels, action, reward),
        next_row=nxt,
        done=done,
        context=session_context(log, context) if context else None,
    )
