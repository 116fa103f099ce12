"""Logged fusion decisions: batched rollouts of a policy in a FusionSimulator.

A policy is any callable ``act(obs [B, S] float32) -> alpha [B, K]``. ``rollout`` runs
B sessions at once (one numpy step per request index, never one per session) and, on
request, records every decision as a transition of a ``FusionDataset``: the batch-RL
training data of BCQ (behaviour policy on train sessions) and the held-out data of FQE
and MTF-GAUC (behaviour policy on test sessions, against the held-out user model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
from rmtl.fusion.simulator import FusionSimulator
from rmtl.fusion.slates import SlateSpec, shown, slate_propensity

from rmtl.atomic import atomic_path
from rmtl.errors import ConfigError, DataError

Policy = Callable[[np.ndarray], np.ndarray]


@dataclass
class FusionDataset:
    obs: np.ndarray  # float32 [N, S]
    action: np.ndarray  # float32 [N, K]
    reward: np.ndarray  # float32 [N]
    next_obs: np.ndarray  # float32 [N, S]
    done: np.ndarray  # bool [N]: the session ended (left, or reached max_depth: depth is part of the state)
    first: np.ndarray  # bool [N]: the session's first request (its obs is an initial state)
    episode: np.ndarray  # int64 [N]
    user: np.ndarray  # int64 [N]
    req_rows: np.ndarray  # int64 [N, W]: logged rows offered in the request (-1 = none)
    req_o: np.ndarray  # float32 [N, W, K]: ranker predictions of those rows
    truncated: np.ndarray | None = None  # bool [N]: ended by max_depth, not by the user (None: no truncations)
    # What a real logger keeps for off-policy evaluation (None in files written before they were logged):
    cand_o: np.ndarray | None = None  # float32 [N, C, K]: ranker predictions of every candidate (window first)
    cand_mask: np.ndarray | None = None  # bool [N, C]: real candidates (False = padding)
    propensity: np.ndarray | None = None  # float64 [N]: P(behaviour shows the logged slate | request)

    OPTIONAL = ("truncated", "cand_o", "cand_mask", "propensity")

    def __post_init__(self) -> None:
        if self.truncated is None:
            self.truncated = np.zeros(len(self.reward), dtype=bool)

    def __len__(self) -> int:
        return int(len(self.reward))

    @property
    def initial_obs(self) -> np.ndarray:
        return self.obs[self.first]

    def save(self, path: str | os.PathLike) -> Path:
        """Write as .npz (temporary name, then rename)."""
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **{f.name: getattr(self, f.name) for f in fields(self)
                                        if getattr(self, f.name) is not None})
        return Path(path)

    @property
    def terminated(self) -> np.ndarray:
        """bool [N]: the user left (a true end), as opposed to a truncation at max_depth."""
        return self.done & ~self.truncated

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FusionDataset":
        """Read a ``save``d file (arrays only: allow_pickle=False, nothing in it runs); a missing, corrupt
        or foreign file is one DataError naming it."""
        if not Path(path).is_file():
            raise DataError("no such FusionDataset file (.npz)", path=path)
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [f.name for f in fields(cls) if f.name not in data.files and f.name not in cls.OPTIONAL]
                if missing:
                    raise DataError(f"not a FusionDataset file: missing array(s) {', '.join(missing)}", path=path)
                out = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data.files})
        except DataError:
            raise
        except Exception as err:  # not an .npz, truncated, or object arrays (refused: they would unpickle)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if "pickle" in first:  # numpy's message suggests loading it unsafely: we never do
                first = "it holds pickled objects, and only plain arrays are read"
            raise DataError(f"cannot read as a FusionDataset .npz ({first})", path=path) from None
        n = len(out.reward)
        bad = [f.name for f in fields(cls) if getattr(out, f.name) is not None and len(getattr(out, f.name)) != n]
        if bad:
            raise DataError(f"arrays {', '.join(bad)} do not have one row per decision ({n})", path=path)
        return out

    def subset(self, rows: np.ndarray) -> "FusionDataset":
        """The rows ``rows`` (every array indexed alike)."""
        return FusionDataset(**{f.name: getattr(self, f.name)[rows] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def has_candidates(self) -> bool:
        return self.cand_o is not None and self.cand_mask is not None


def constant_policy(alpha) -> Policy:
    """The same weighting for every request."""
    alpha = np.asarray(alpha, np.float32).reshape(-1)

    def act(obs: np.ndarray) -> np.ndarray:
        return np.tile(alpha, (len(obs), 1))

    act.alpha = alpha  # type: ignore[attr-defined]  (what rmtl.fusion.policies saves)
    return act


def behaviour_policy(default_alpha, noise: float, low: float, high: float, seed: int = 0,
                     propensity_draws: int = 256) -> Policy:
    """The logging policy: default weighting + independent N(0, noise^2) per task and request, clipped."""
    if noise < 0:
        raise ConfigError(f"expected a non-negative standard deviation, got {noise}", key="behaviour.noise")
    alpha = np.asarray(default_alpha, np.float32).reshape(-1)
    rng = np.random.default_rng(seed)

    def act(obs: np.ndarray) -> np.ndarray:
        return np.clip(alpha + noise * rng.standard_normal((len(obs), len(alpha))), low, high).astype(np.float32)

    act.distribution = {"default_alpha": alpha, "noise": float(noise), "low": float(low), "high": float(high),
                        "draws": np.random.default_rng([seed, 1]),  # type: ignore[attr-defined]
                        "num_draws": int(propensity_draws)}
    # (the logger logs its slates' propensities from it; own stream: the logged draws stay as they were)
    return act


def rollout(sim: FusionSimulator, act: Policy, sessions: np.ndarray, *, record: bool = False, gamma: float = 1.0):
    """Run one episode per session (all at once). Returns (returns [B], depth [B], dataset or None);
    ``gamma`` < 1 discounts the returns (sum_t gamma^t r_t: the value FQE estimates)."""
    obs = sim.reset(sessions)
    b = len(sessions)
    returns = np.zeros(b, dtype=np.float64)
    parts: dict[str, list] = {f.name: [] for f in fields(FusionDataset)}
    step = 0
    while sim.active.any():  # one iteration per request index, B sessions each
        active = sim.active.copy()
        rows, o = sim.cand_rows[:, :sim.cfg.window], sim.cand_o[:, :sim.cfg.window]
        action = np.asarray(act(obs), np.float32).reshape(b, sim.num_tasks)
        next_obs, reward, terminated, truncated, _ = sim.step(action)
        returns += float(gamma) ** step * reward
        if record:
            idx = np.flatnonzero(active)
            parts["obs"].append(obs[idx])
            parts["action"].append(np.clip(action[idx], sim.cfg.action_low, sim.cfg.action_high))
            parts["reward"].append(reward[idx])
            parts["next_obs"].append(next_obs[idx])
            parts["done"].append((terminated | truncated)[idx])
            parts["truncated"].append(truncated[idx])
            parts["first"].append(np.full(len(idx), step == 0))
            parts["episode"].append(idx.astype(np.int64))
            parts["user"].append(sim.user[idx])
            parts["req_rows"].append(rows[idx])
            parts["req_o"].append(o[idx])
            parts["cand_o"].append(sim.cand_o[idx].astype(np.float32))
            parts["cand_mask"].append(sim.cand_mask[idx])
        obs = next_obs
        step += 1
    dataset = None
    if record:
        dataset = FusionDataset(**{k: np.concatenate(v) for k, v in parts.items() if v})
        dist = getattr(act, "distribution", None)
        if dist is not None and len(dataset):  # the logger knows its distribution: log each slate's probability
            spec = SlateSpec.of(sim.cfg)
            logged = shown(dataset.cand_o, dataset.cand_mask, dataset.action, spec)
            dataset.propensity = slate_propensity(dataset.cand_o, dataset.cand_mask, logged, dist["default_alpha"],
                                                  dist["noise"], dist["low"], dist["high"], spec,
                                                  draws=dist["num_draws"], seed=int(dist["draws"].integers(1 << 31)))
    return returns, sim.t.copy(), dataset


def collect(sim: FusionSimulator, act: Policy, sessions: np.ndarray, passes: int = 1) -> FusionDataset:
    """Logged dataset of ``passes`` rollouts over ``sessions`` (episode ids stay unique)."""
    datasets = []
    for p in range(int(passes)):
        _, _, data = rollout(sim, act, sessions, record=True)
        data.episode = data.episode + p * len(sessions)
        datasets.append(data)
    return FusionDataset(**{f.name: np.concatenate([getattr(d, f.name) for d in datasets])
                            for f in fields(FusionDataset) if getattr(datasets[0], f.name) is not None})


def simulate(sim: FusionSimulator, act: Policy, sessions: np.ndarray, repeats: int = 1) -> dict[str, float]:
    """Mean total reward and session depth of ``act`` over ``repeats`` passes of ``sessions``."""
    totals, depths = [], []
    for _ in range(int(repeats)):
        ret, depth, _ = rollout(sim, act, sessions)
        totals.append(ret)
        depths.append(depth)
    total, depth = np.concatenate(totals), np.concatenate(depths)
    return {"total_reward": float(total.mean()), "depth": float(depth.mean()),
            "total_reward_se": float(total.std() / np.sqrt(len(total)))}
