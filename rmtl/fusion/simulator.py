"""Batched session simulator behind FusionEnv (B sessions advance in one numpy call).

One episode = one logged session of a KuaiRand-schema SessionLog. Request t of the
session offers a candidate set: the ``window`` impressions logged at positions
[t*window, (t+1)*window) of the session (padding once the session's log runs out)
plus ``negatives`` items sampled by train popularity. The policy's action is the
fusion weights alpha [K]; candidates are ranked by the fused score of the ranker's
task predictions o and the top ``slate`` are shown. Feedback per shown item: the
logged labels where the item was logged in that request (``use_logged_labels``),
otherwise a draw from the responder (user-response model). One uniform number per
shown item drives all of its tasks (u < p_k), so rarer engagement implies the more
common one (a like comes with a click); tasks with a negative reward weight (hate)
use 1 - u, so they fall on other items.

Reward = feedback summed over the slate, dotted with ``reward_weights``.
Leave model (KuaiSim-like): patience starts at ``patience`` and each request costs
``base_cost`` plus ``poor_cost * clip(1 - reward / satisfying_reward, 0, 2)``; the session
ends (terminated) when patience reaches 0, or is truncated after ``max_depth`` requests.
So the session's depth depends on how satisfying the shown items were.

Observation [obs_dim] (float32, clipped to +-10):
  user profile   = the user's smoothed task rates in the train rows [K], log activity [1]
  recent history = exponentially decayed mean feedback of shown items [K],
                   patience left / initial [1], request index / max_depth [1]
  request context= dense features of the request's (last) logged row [D],
                   mean ranker prediction over the candidates [K]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import numpy as np

from rmtl.data.sessionlog import SessionLog
from rmtl.fusion.user_model import UserResponseModel
from rmtl.errors import ConfigError, DataError
from rmtl.fusion.functions import fuse_and_rank, get_fusion

OBS_LIMIT = 10.0
MAX_SHORTFALL = 2.0  # a slate with negative reward (hate) costs at most twice a merely unrewarding one

# The one definition of the fusion world's tasks (KuaiRand aliases) and their reward weights;
# rmtl.fusion.config and the embedded default env read them from here.
FUSION_TASKS = ["ctr", "long_view", "like", "follow", "comment", "forward", "hate"]
DEFAULT_REWARD_WEIGHTS = {"ctr": 0.25, "long_view": 1.0, "like": 2.0, "follow": 4.0, "comment": 2.0,
                          "forward": 2.0, "hate": -8.0}


@dataclass
class FusionEnvConfig:  # also the `env:` section of `rmtl fusion`'s config (types OmegaConf can check)
    window: int = 4  # logged impressions offered per request
    negatives: int = 8  # sampled candidates per request (by train popularity)
    slate: int = 3  # items shown per request
    max_depth: int = 20  # requests per session at most (truncation)
    patience: float = 6.0  # initial patience of the leave model
    base_cost: float = 0.5  # patience every request costs
    poor_cost: float = 1.5  # extra cost of a request whose reward is below satisfying_reward
    satisfying_reward: Optional[float] = None  # None = 1.5 x slate x mean logged per-impression reward
    reward_weights: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_REWARD_WEIGHTS))  # task -> weight
    beta: float = 1e-3  # fusion offset: log(o + beta)
    fusion: str = "log_sum"  # log_sum | product | weighted_sum
    history_decay: float = 0.7  # weight of the old history summary at each request
    use_logged_labels: bool = True  # logged labels for logged (user, item) pairs
    action_low: float = -1.0  # alpha bounds
    action_high: float = 1.0

    @classmethod
    def from_any(cls, value) -> "FusionEnvConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = set(cls.__dataclass_fields__)
            for key in value:
                if key not in known:
                    raise ConfigError(f"unknown FusionEnv option; known: {', '.join(sorted(known))}", key=str(key))
            return cls(**value)
        raise ConfigError(f"expected a FusionEnvConfig or a dict, got {type(value).__name__}", key="env")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_config(cfg: FusionEnvConfig) -> None:
    for key in ("window", "negatives", "slate", "max_depth"):
        if int(getattr(cfg, key)) < 1:
            raise ConfigError(f"expected a positive integer, got {getattr(cfg, key)}", key=f"env.{key}")
    if cfg.slate > cfg.negatives:
        raise ConfigError(f"slate ({cfg.slate}) must not exceed negatives ({cfg.negatives}), so every request "
                          "has enough candidates", key="env.slate")
    if not cfg.patience > 0 or cfg.base_cost < 0 or cfg.poor_cost < 0:
        raise ConfigError("expected patience > 0 and non-negative costs", key="env.patience")
    if not 0 <= cfg.history_decay < 1:
        raise ConfigError(f"expected a value in [0, 1), got {cfg.history_decay}", key="env.history_decay")
    if not cfg.action_low < cfg.action_high:
        raise ConfigError("expected action_low < action_high", key="env.action_low")
    get_fusion(cfg.fusion)


def reward_vector(tasks: list[str], weights: dict) -> np.ndarray:
    """[K] reward weight per task; keys must be task names (defaults for absent tasks are ignored)."""
    extra = set(weights) - set(tasks) - set(DEFAULT_REWARD_WEIGHTS)
    if extra:
        raise ConfigError(f"unknown task(s) {sorted(extra)}; the log's tasks are {', '.join(tasks)}",
                          key="env.reward_weights")
    w = np.asarray([float(weights.get(t, 0.0)) for t in tasks], dtype=np.float32)
    if not np.isfinite(w).all() or not (w != 0).any():
        raise ConfigError(f"expected finite weights, at least one non-zero, got {dict(zip(tasks, w.tolist()))}",
                          key="env.reward_weights")
    return w


def user_profiles(log: SessionLog, rows: np.ndarray, prior: float = 5.0) -> np.ndarray:
    """float32 [U, K+1]: smoothed task rates of each user over ``rows`` and log1p(count) / 5."""
    num_users = int(log.user.max()) + 1
    users = log.user[rows]
    labels = log.labels[rows].astype(np.float64)
    base = labels.mean(0) if len(rows) else np.zeros(labels.shape[1])
    count = np.bincount(users, minlength=num_users).astype(np.float64)
    sums = np.stack([np.bincount(users, weights=labels[:, k], minlength=num_users)
                     for k in range(labels.shape[1])], axis=1)  # loop over tasks only
    rates = (sums + prior * base) / (count[:, None] + prior)
    return np.concatenate([rates, np.log1p(count)[:, None] / 5.0], axis=1).astype(np.float32)


class FusionSimulator:
    """B fusion sessions stepped together (see the module docstring).

    ``ranker`` supplies the fused predictions o and ``responder`` the user's answers; any object
    with ``.predict(users, items) -> [..., K]`` and ``.num_tasks`` fits (a UserResponseModel,
    a BackboneRanker). ``log`` is the whole SessionLog; ``sessions`` the (global) session indices episodes
    are drawn from; ``profile_rows`` the rows user profiles and item popularity come from
    (the train split: no future leaks into the state).
    """

    def __init__(self, log: SessionLog, sessions: np.ndarray, ranker: UserResponseModel,
                 responder: UserResponseModel | None = None, config: FusionEnvConfig | dict | None = None,
                 profile_rows: np.ndarray | None = None, seed: int | None = None):
        self.cfg = FusionEnvConfig.from_any(config)
        _check_config(self.cfg)
        self.log = log
        self.sessions = np.asarray(sessions, dtype=np.int64)
        if len(self.sessions) == 0:
            raise DataError("no sessions to simulate", column="session_ptr")
        self.ranker = ranker
        self.responder = responder if responder is not None else ranker
        self.tasks = list(log.spec.tasks)
        self.num_tasks = len(self.tasks)
        if ranker.num_tasks != self.num_tasks or self.responder.num_tasks != self.num_tasks:
            raise ConfigError(f"user models must predict the log's {self.num_tasks} tasks", key="user_model")
        self.reward_w = reward_vector(self.tasks, self.cfg.reward_weights)
        self.negative_task = self.reward_w < 0
        profile_rows = np.arange(log.num_rows) if profile_rows is None else np.asarray(profile_rows, np.int64)
        self.profiles = user_profiles(log, profile_rows)
        num_items = int(log.item.max()) + 1
        pop = np.bincount(log.item[profile_rows], minlength=num_items).astype(np.float64) + 1.0
        self.item_cdf = np.cumsum(pop / pop.sum())
        self.ptr = np.asarray(log.session_ptr, dtype=np.int64)
        if self.cfg.satisfying_reward is None:
            row_reward = float((log.labels[profile_rows] @ self.reward_w).mean()) if len(profile_rows) else 1.0
            self.satisfying = max(1.5 * self.cfg.slate * row_reward, 1e-3)
        else:
            self.satisfying = float(self.cfg.satisfying_reward)
        self.num_dense = log.dense.shape[1]
        self.obs_dim = 3 * self.num_tasks + 3 + self.num_dense
        self.rng = np.random.default_rng(seed)
        self.batch = 0

    # ------------------------------------------------------------------ episodes

    def reset(self, sessions: np.ndarray) -> np.ndarray:
        """Start one episode per given global session index; returns obs [B, obs_dim]."""
        sessions = np.asarray(sessions, dtype=np.int64).reshape(-1)
        b = len(sessions)
        self.batch = b
        self.session = sessions
        self.start = self.ptr[sessions]
        self.end = self.ptr[sessions + 1]
        self.user = self.log.user[self.start]
        self.t = np.zeros(b, dtype=np.int64)
        self.patience = np.full(b, float(self.cfg.patience))
        self.history = np.zeros((b, self.num_tasks), dtype=np.float32)
        self.active = np.ones(b, dtype=bool)
        self._next_request()
        return self.observe()

    def _next_request(self) -> None:
        """Candidates of request t of every episode: logged window + popularity negatives."""
        cfg, b = self.cfg, self.batch
        first = self.start + self.t * cfg.window
        rows = first[:, None] + np.arange(cfg.window)[None, :]
        logged = rows < self.end[:, None]
        rows = np.minimum(rows, self.end[:, None] - 1)
        negs = np.searchsorted(self.item_cdf, self.rng.random((b, cfg.negatives)), side="right")
        negs = np.minimum(negs, len(self.item_cdf) - 1)
        items = np.concatenate([np.where(logged, self.log.item[rows], 0), negs], axis=1)
        self.cand_items = items
        self.cand_mask = np.concatenate([logged, np.ones((b, cfg.negatives), dtype=bool)], axis=1)
        self.cand_logged = np.concatenate([logged, np.zeros((b, cfg.negatives), dtype=bool)], axis=1)
        self.cand_rows = np.concatenate([np.where(logged, rows, -1), np.full((b, cfg.negatives), -1)], axis=1)
        self.cand_o = self.ranker.predict(self.user[:, None], items)  # [B, C, K]
        self.context_row = np.minimum(first, self.end - 1)

    def observe(self) -> np.ndarray:
        cfg = self.cfg
        m = self.cand_mask[:, :, None].astype(np.float32)
        o_mean = (self.cand_o * m).sum(1) / m.sum(1)
        parts = [
            self.profiles[self.user],
            self.history,
            (self.patience / cfg.patience)[:, None],
            (self.t / cfg.max_depth)[:, None],
            self.log.dense[self.context_row],
            o_mean,
        ]
        obs = np.concatenate([np.asarray(p, np.float32) for p in parts], axis=1)
        return np.clip(np.nan_to_num(obs), -OBS_LIMIT, OBS_LIMIT).astype(np.float32)

    def step(self, alpha: np.ndarray):
        """Show the top ``slate`` by the fused score under ``alpha`` [B, K]; returns
        (obs, reward [B], terminated [B], truncated [B], info). Finished episodes stay
        finished (zero reward) until the next reset."""
        cfg, b = self.cfg, self.batch
        alpha = np.clip(np.asarray(alpha, np.float32).reshape(b, self.num_tasks), cfg.action_low, cfg.action_high)
        _, shown = fuse_and_rank(self.cand_o, alpha, self.cand_mask, beta=cfg.beta, kind=cfg.fusion, top=cfg.slate)
        items = np.take_along_axis(self.cand_items, shown, 1)
        logged = np.take_along_axis(self.cand_logged, shown, 1)
        rows = np.take_along_axis(self.cand_rows, shown, 1)
        p = self.responder.predict(self.user[:, None], items)  # [B, S, K]
        u = self.rng.random((b, cfg.slate, 1))
        u = np.where(self.negative_task, 1.0 - u, u)
        feedback = (u < p).astype(np.float32)
        if cfg.use_logged_labels:
            feedback = np.where(logged[:, :, None], self.log.labels[np.maximum(rows, 0)], feedback)
        reward = feedback.sum(1) @ self.reward_w
        reward = np.where(self.active, reward, 0.0).astype(np.float32)
        shortfall = np.clip(1.0 - reward / self.satisfying, 0.0, MAX_SHORTFALL)
        self.patience = np.where(self.active, self.patience - cfg.base_cost - cfg.poor_cost * shortfall,
                                 self.patience)
        self.history = np.where(self.active[:, None],
                                cfg.history_decay * self.history + (1 - cfg.history_decay) * feedback.mean(1),
                                self.history).astype(np.float32)
        self.t = self.t + self.active
        terminated = self.active & (self.patience <= 0)
        truncated = self.active & ~terminated & (self.t >= cfg.max_depth)
        info = {"feedback": np.where(self.active[:, None], feedback.sum(1), 0.0).astype(np.float32),
                "shown_items": items, "shown_logged": logged, "was_active": self.active.copy()}
        self.active = self.active & ~terminated & ~truncated
        self._next_request()
        return self.observe(), reward, terminated, truncated, info

    def sample_sessions(self, n: int) -> np.ndarray:
        return self.sessions[self.rng.integers(0, len(self.sessions), size=n)]
