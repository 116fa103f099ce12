"""FusionEnv: the multi-task fusion MDP of BatchRL-MTF as a Gymnasium env.

One episode is one user session (a logged KuaiRand-schema session); each step is a
request: the action alpha [K] (Box[action_low, action_high]^K) weights the ranker's
task predictions in f = sum_k alpha_k log(o_k + beta), the top items are shown, the
user responds (logged labels where logged, else the user-response model) and may
leave (patience model). See rmtl.fusion.simulator for the dynamics and observation.

``FusionEnv()`` with no argument builds the embedded default: a small synthetic
KuaiRand log (tasks FUSION_TASKS) and a user-response model fitted on its train split.
Pass ``simulator=FusionSimulator(...)`` for your own log, models and options.
``info`` of step: ``feedback`` [K] (summed over the shown items), ``depth`` (requests
so far), ``patience``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rmtl.fusion.simulator import FUSION_TASKS, OBS_LIMIT, FusionEnvConfig, FusionSimulator
from rmtl.fusion.user_model import UserResponseModel

DEFAULT_SYNTHETIC = {"users": 200, "items": 400}  # the embedded default world (also `rmtl fusion`'s default)


def split_rows(log, name: str) -> np.ndarray:
    """Global row indices of split ``name``."""
    first, last = log.splits[name]
    return np.arange(int(log.session_ptr[first]), int(log.session_ptr[last]), dtype=np.int64)


def split_sessions(log, name: str) -> np.ndarray:
    first, last = log.splits[name]
    return np.arange(first, last, dtype=np.int64)


def default_simulator(*, synthetic: dict | None = None, cache_dir: str | None = None, env: dict | None = None,
                      seed: int = 0, user_model: dict | None = None) -> FusionSimulator:
    """The embedded default world: synthetic KuaiRand logs -> user model -> train-split simulator."""
    from rmtl.data.prepare import prepare

    synthetic = dict(synthetic or {**DEFAULT_SYNTHETIC, "seed": 0})
    prepared = prepare("kuairand", None, cache_dir=cache_dir, synthetic=synthetic,
                       reader_options={"tasks": list(FUSION_TASKS)}, seed=seed)
    log = prepared.log
    train = split_rows(log, "train")
    model = UserResponseModel.fit(log, train, seed=seed, **(user_model or {"epochs": 15}))
    return FusionSimulator(log, split_sessions(log, "train"), model, config=env, profile_rows=train, seed=seed)


class FusionEnv(gym.Env):
    """Gymnasium view (one session at a time) of a FusionSimulator."""

    metadata = {"render_modes": []}

    def __init__(self, simulator: FusionSimulator | None = None, **default_options: Any):
        super().__init__()
        self.sim = simulator if simulator is not None else default_simulator(**default_options)
        cfg: FusionEnvConfig = self.sim.cfg
        k = self.sim.num_tasks
        self.observation_space = spaces.Box(-OBS_LIMIT, OBS_LIMIT, shape=(self.sim.obs_dim,), dtype=np.float32)
        self.action_space = spaces.Box(cfg.action_low, cfg.action_high, shape=(k,), dtype=np.float32)
        self.tasks = list(self.sim.tasks)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.sim.rng = self.np_random  # one seeded stream for session choice, negatives and responses
        if options and "session" in options:
            session = np.asarray([int(options["session"])])
        else:
            session = self.sim.sample_sessions(1)
        obs = self.sim.reset(session)[0]
        return obs, {"session": int(session[0]), "user": int(self.sim.user[0])}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.sim.step(np.asarray(action, np.float32)[None, :])
        out = {"feedback": info["feedback"][0], "depth": int(self.sim.t[0]), "patience": float(self.sim.patience[0])}
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), out
