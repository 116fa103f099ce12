"""Baseline fusion policies: fixed weights, the cross-entropy method, SB3 TD3 online.

- ``constant_policy(alpha)`` (rmtl.fusion.data): equal weights or any fixed weighting.
- ``cem_search``: the cross-entropy method over one constant alpha, each candidate scored
  by its mean simulated session reward; the whole population x sessions runs as ONE
  batched simulator rollout per iteration.
- ``train_td3``: Stable-Baselines3 TD3 trained online on FusionEnv (short budget).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from rmtl.fusion.data import constant_policy, rollout
from rmtl.fusion.simulator import FusionSimulator
from rmtl.errors import ConfigError

Policy = Callable[[np.ndarray], np.ndarray]


def cem_search(sim: FusionSimulator, *, iterations: int = 6, population: int = 24, sessions: int = 48,
               elite_frac: float = 0.25, init_mean=None, init_std: float = 0.5, min_std: float = 0.05,
               seed: int = 0, on_iteration: Callable[[int, np.ndarray, float], None] | None = None) -> np.ndarray:
    """Best constant alpha [K] found by CEM in ``sim`` (the training simulator)."""
    if iterations < 1 or population < 2 or sessions < 1:
        raise ConfigError("expected iterations >= 1, population >= 2, sessions >= 1", key="cem")
    if not 0 < elite_frac <= 1:
        raise ConfigError(f"expected 0 < elite_frac <= 1, got {elite_frac}", key="cem.elite_frac")
    rng = np.random.default_rng(seed)
    k, low, high = sim.num_tasks, sim.cfg.action_low, sim.cfg.action_high
    mean = np.zeros(k) if init_mean is None else np.asarray(init_mean, np.float64).copy()
    std = np.full(k, float(init_std))
    n_elite = max(1, int(round(elite_frac * population)))
    for it in range(int(iterations)):
        cand = np.clip(mean + std * rng.standard_normal((population, k)), low, high)
        chosen = sim.sample_sessions(sessions)  # the same sessions for every candidate: common random numbers
        batch_sessions = np.tile(chosen, population)
        alphas = np.repeat(cand, sessions, axis=0).astype(np.float32)
        returns, _, _ = rollout(sim, lambda obs, a=alphas: a, batch_sessions)
        score = returns.reshape(population, sessions).mean(1)
        elite = cand[np.argsort(-score)[:n_elite]]
        mean, std = elite.mean(0), np.maximum(elite.std(0), min_std)
        if on_iteration is not None:
            on_iteration(it, mean, float(score.max()))
    return mean.astype(np.float32)


def cem_policy(sim: FusionSimulator, **options) -> Policy:
    return constant_policy(cem_search(sim, **options))


def train_td3(sim: FusionSimulator, *, timesteps: int = 3000, learning_starts: int = 500, seed: int = 0,
              hidden: int = 64, action_noise: float = 0.2, learning_rate: float = 1e-3,
              on_step: Callable[[int], None] | None = None) -> Policy:
    """SB3 TD3 trained online on a FusionEnv over ``sim``; returns its deterministic policy.
    ``on_step(n)`` is told every 50 environment steps (progress)."""
    import torch
    from stable_baselines3 import TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.noise import NormalActionNoise

    class Progress(BaseCallback):
        def _on_step(self) -> bool:
            if on_step is not None and self.num_timesteps % 50 == 0:
                on_step(50)
            return True

    from rmtl.fusion.env import FusionEnv

    env = FusionEnv(sim)
    k = sim.num_tasks
    noise = NormalActionNoise(np.zeros(k), action_noise * np.ones(k))
    model = TD3("MlpPolicy", env, learning_rate=learning_rate, learning_starts=int(learning_starts),
                batch_size=128, gamma=0.95, action_noise=noise, seed=seed, verbose=0, device="cpu",
                policy_kwargs={"net_arch": [hidden, hidden]})
    threads = torch.get_num_threads()
    model.learn(total_timesteps=int(timesteps), callback=Progress())
    torch.set_num_threads(threads)

    def act(obs: np.ndarray) -> np.ndarray:
        action, _ = model.predict(np.asarray(obs, np.float32), deterministic=True)
        return np.asarray(action, np.float32).reshape(len(obs), k)

    act.model = model  # type: ignore[attr-defined]
    return act
