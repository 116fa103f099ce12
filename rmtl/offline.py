"""Offline-RL data out and back in: Minari datasets and d3rlpy MDPDataset arrays.

Both the logged fusion decisions (rmtl.fusion.data.FusionDataset) and the RMTL session
transitions (a SessionLog + rmtl.envs.transitions.Transitions) become one ``StepTable``:
one row per step, each episode's rows contiguous and in step order, terminations (the
user left / the session ended) told apart from truncations (max_depth reached).

- ``to_minari(table, dataset_id, root=...)`` / ``from_minari(dataset_id, root=...)``
  (needs the optional ``minari`` package: ``pip install -e ".[offline]"``). Per-step
  extras (user, offered rows, per-task rewards, ...) travel as Minari infos.
- ``d3rlpy_arrays(table)`` is the keyword set of ``d3rlpy.dataset.MDPDataset(...)``
  (observations, actions, rewards [N, 1], terminals, timeouts), plus the arrays d3rlpy
  does not keep (next observations, episode ids, extras), so ``save_d3rlpy_npz`` /
  ``load_d3rlpy_npz`` round-trip without loss and without d3rlpy installed;
  ``to_d3rlpy(table)`` builds the MDPDataset where d3rlpy is installed and ``from_d3rlpy``
  reads one back (d3rlpy itself drops each episode's final next observation).
- ``fusion_steps`` / ``steps_to_fusion`` and ``session_steps`` convert.

Session transitions: observation = the row's sparse codes (as float32, exact below 2^24)
then its dense features; reward = the sum of the per-task rewards (the per-task ones are
the extra ``task_rewards``); the last event of a session terminates its episode.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rmtl.atomic import atomic_path
from rmtl.errors import ConfigError, DataError

EXACT_FLOAT32_INT = 2 ** 24


@dataclass
class StepTable:
    obs: np.ndarray  # float32 [N, S]
    action: np.ndarray  # float32 [N, A]
    reward: np.ndarray  # float32 [N]
    next_obs: np.ndarray  # float32 [N, S]
    terminated: np.ndarray  # bool [N]: the episode ends here for good
    truncated: np.ndarray  # bool [N]: the episode is cut here (time limit)
    episode: np.ndarray  # int64 [N], contiguous runs in step order
    extras: dict = field(default_factory=dict)  # name -> [N, ...] per-step arrays

    def __len__(self) -> int:
        return int(len(self.reward))

    def bounds(self) -> np.ndarray:
        """Row offsets [E + 1] of the episodes (CSR)."""
        starts = np.flatnonzero(np.r_[True, self.episode[1:] != self.episode[:-1]])
        return np.r_[starts, len(self)].astype(np.int64)

    def check(self) -> "StepTable":
        ends = self.bounds()[1:] - 1
        last = np.zeros(len(self), bool)
        last[ends] = True
        if (self.terminated & self.truncated).any():
            raise DataError("a step is both terminated and truncated", column="terminated")
        if ((self.terminated | self.truncated) & ~last).any():
            raise DataError("an episode ends before its last step (episodes must be contiguous)", column="episode")
        return self


# ----------------------------------------------------------------------------- sources

FUSION_OPE_EXTRAS = ("cand_o", "cand_mask", "propensity")  # FusionDataset's optional off-policy evaluation logs


def fusion_steps(data) -> StepTable:
    """A FusionDataset (rows interleaved across episodes by request index) as a StepTable."""
    order = np.argsort(data.episode, kind="stable")  # keeps each episode's step order
    truncated = data.truncated[order].astype(bool)
    return StepTable(obs=data.obs[order], action=data.action[order], reward=data.reward[order].astype(np.float32),
                     next_obs=data.next_obs[order], terminated=data.done[order].astype(bool) & ~truncated,
                     truncated=truncated, episode=data.episode[order].astype(np.int64),
                     extras={"user": data.user[order], "req_rows": data.req_rows[order],
                             "req_o": data.req_o[order],
                             **{k: getattr(data, k)[order] for k in FUSION_OPE_EXTRAS
                                if getattr(data, k) is not None}}).check()


def steps_to_fusion(table: StepTable):
    """The FusionDataset of a StepTable made by ``fusion_steps`` (episode-contiguous order)."""
    from rmtl.fusion.data import FusionDataset

    missing = {"user", "req_rows", "req_o"} - set(table.extras)
    if missing:
        raise DataError(f"not fusion data: extras {sorted(missing)} missing", column="extras")
    first = np.zeros(len(table), bool)
    first[table.bounds()[:-1]] = True
    n, req_rows = len(table), np.asarray(table.extras["req_rows"]).reshape(len(table), -1)
    req_o = np.asarray(table.extras["req_o"]).reshape(n, req_rows.shape[1], -1)  # Minari keeps extras 2-D
    ope = {}
    if "cand_mask" in table.extras:  # the off-policy evaluation logs, when the data has them
        mask = np.asarray(table.extras["cand_mask"]).reshape(n, -1).astype(bool)
        ope["cand_mask"] = mask
        ope["cand_o"] = np.asarray(table.extras["cand_o"], np.float32).reshape(n, mask.shape[1], -1)
    if "propensity" in table.extras:
        ope["propensity"] = np.asarray(table.extras["propensity"], np.float64).reshape(n)
    return FusionDataset(**ope, obs=table.obs, action=table.action, reward=table.reward, next_obs=table.next_obs,
                         done=table.terminated | table.truncated, first=first, episode=table.episode,
                         user=np.asarray(table.extras["user"]).reshape(n), req_rows=req_rows, req_o=req_o,
                         truncated=table.truncated)


def session_steps(log, transitions) -> StepTable:
    """RMTL session transitions of ``log`` (the split view they were built on) as a StepTable."""
    if int(log.sparse.max(initial=0)) >= EXACT_FLOAT32_INT:
        raise DataError(f"sparse codes reach {int(log.sparse.max())}: float32 observations are exact only below "
                        f"2^24", column="sparse")
    rows, nxt = transitions.state_row, transitions.next_row
    features = np.concatenate([log.sparse.astype(np.float32), log.dense.astype(np.float32)], axis=1)
    session = np.searchsorted(np.asarray(log.session_ptr, np.int64), rows, side="right") - 1
    task_rewards = np.asarray(transitions.reward, np.float32)
    return StepTable(obs=features[rows], action=np.asarray(transitions.action, np.float32),
                     reward=task_rewards.sum(1), next_obs=features[nxt],
                     terminated=np.asarray(transitions.done) > 0, truncated=np.zeros(len(rows), bool),
                     episode=session.astype(np.int64),
                     extras={"row": rows.astype(np.int64), "task_rewards": task_rewards}).check()


# ----------------------------------------------------------------------------- d3rlpy

def d3rlpy_arrays(table: StepTable) -> dict[str, np.ndarray]:
    """MDPDataset(**{k: v for k in MDP_KEYS}) arguments, plus what d3rlpy drops (for the round trip)."""
    out = {"observations": table.obs, "actions": table.action, "rewards": table.reward.reshape(-1, 1),
           "terminals": table.terminated.astype(np.float32), "timeouts": table.truncated.astype(np.float32),
           "next_observations": table.next_obs, "episode": table.episode}
    out.update({f"extra_{k}": v for k, v in table.extras.items()})
    return out


MDP_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def save_d3rlpy_npz(table: StepTable, path: str | os.PathLike) -> Path:
    """The arrays of ``d3rlpy_arrays`` as one .npz (temporary name, then rename)."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **d3rlpy_arrays(table))
    return Path(path)


def load_d3rlpy_npz(path: str | os.PathLike) -> StepTable:
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in (*MDP_KEYS, "next_observations", "episode") if k not in z.files]
        if missing:
            raise DataError(f"not an rmtl d3rlpy export: missing array(s) {', '.join(missing)}", path=path)
        return StepTable(obs=z["observations"], action=z["actions"], reward=z["rewards"].reshape(-1),
                         next_obs=z["next_observations"], terminated=z["terminals"] > 0, truncated=z["timeouts"] > 0,
                         episode=z["episode"],
                         extras={k[len("extra_"):]: z[k] for k in z.files if k.startswith("extra_")}).check()


def to_d3rlpy(table: StepTable):
    """A d3rlpy MDPDataset (episodes split at terminals | timeouts)."""
    try:
        from d3rlpy.dataset import MDPDataset
    except ImportError:
        raise ConfigError("d3rlpy is not installed (it is optional: pip install d3rlpy); "
                          "save_d3rlpy_npz writes the same arrays without it", key="d3rlpy") from None
    arrays = d3rlpy_arrays(table)
    return MDPDataset(**{k: arrays[k] for k in MDP_KEYS})


def from_d3rlpy(dataset) -> StepTable:
    """A StepTable from a d3rlpy MDPDataset (its episodes; a non-terminated episode ends truncated).
    d3rlpy keeps no observation after an episode's last step: that step's next_obs repeats its obs,
    and extras are not in MDPDataset (``load_d3rlpy_npz`` keeps both)."""
    parts: dict[str, list] = {k: [] for k in ("obs", "action", "reward", "next_obs", "terminated", "truncated",
                                              "episode")}
    for e, ep in enumerate(dataset.episodes):  # one entry per episode, d3rlpy's unit
        obs = np.asarray(ep.observations, np.float32)
        t = len(obs)
        end = np.zeros(t, bool)
        end[-1] = True
        parts["obs"].append(obs)
        parts["next_obs"].append(np.concatenate([obs[1:], obs[-1:]]))
        parts["action"].append(np.asarray(ep.actions, np.float32))
        parts["reward"].append(np.asarray(ep.rewards, np.float32).reshape(t))
        parts["terminated"].append(end & bool(ep.terminated))
        parts["truncated"].append(end & (not bool(ep.terminated)))
        parts["episode"].append(np.full(t, e, np.int64))
    return StepTable(**{k: np.concatenate(v) for k, v in parts.items()}).check()


# ----------------------------------------------------------------------------- Minari

@contextmanager
def _minari_root(root: str | os.PathLike | None):
    """Minari finds datasets under $MINARI_DATASETS_PATH; point it at ``root`` for the call."""
    if root is None:
        yield
        return
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(Path(root).resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _minari():
    try:
        import minari
        from minari.data_collector import EpisodeBuffer
    except ImportError:
        raise ConfigError("minari is not installed (optional: pip install -e \".[offline]\")", key="minari") from None
    return minari, EpisodeBuffer


def _as_2d(a: np.ndarray) -> np.ndarray:
    """Minari's arrow infos need a per-step shape of at least one axis."""
    a = np.asarray(a)
    return a.reshape(len(a), -1)


def to_minari(table: StepTable, dataset_id: str, *, root: str | os.PathLike | None = None,
              description: str = "rmtl offline-RL export", algorithm_name: str = "logged behaviour policy",
              action_low: float | None = None, action_high: float | None = None):
    """Write ``table`` as the Minari dataset ``dataset_id`` (under ``root`` or Minari's default
    folder, arrow format); episodes as in the table, extras as per-step infos."""
    import warnings

    from gymnasium import spaces

    minari, EpisodeBuffer = _minari()
    bounds = table.bounds()
    low = float(table.action.min()) if action_low is None else action_low
    high = float(table.action.max()) if action_high is None else action_high
    obs_space = spaces.Box(-np.inf, np.inf, shape=table.obs.shape[1:], dtype=np.float32)
    act_space = spaces.Box(low, high, shape=table.action.shape[1:], dtype=np.float32)
    extras = {k: _as_2d(v) for k, v in table.extras.items()}
    buffers = []
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):  # one buffer per episode (Minari's unit)
        # observations: T + 1 (the steps' states, then the last next state); infos: T + 1 too
        infos = {k: np.concatenate([v[a:b], v[b - 1:b]]) for k, v in extras.items()}
        infos["episode"] = np.full((b - a + 1, 1), table.episode[a], np.int64)
        buffers.append(EpisodeBuffer(id=e, observations=np.concatenate([table.obs[a:b], table.next_obs[b - 1:b]]),
                                     actions=table.action[a:b], rewards=table.reward[a:b].astype(np.float64),
                                     terminations=table.terminated[a:b], truncations=table.truncated[a:b],
                                     infos=infos))
    with _minari_root(root), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Minari's advice on author / email / env spec
        return minari.create_dataset_from_buffers(dataset_id, buffers, observation_space=obs_space,
                                                  action_space=act_space, algorithm_name=algorithm_name,
                                                  description=description, data_format="arrow")


def from_minari(dataset_id: str, *, root: str | os.PathLike | None = None) -> StepTable:
    """A StepTable from a Minari dataset (ours, or any with Box observations and actions)."""
    minari, _ = _minari()
    with _minari_root(root):
        dataset = minari.load_dataset(dataset_id)
        episodes = list(dataset.iterate_episodes())
    parts: dict[str, list] = {k: [] for k in ("obs", "action", "reward", "next_obs", "terminated", "truncated",
                                              "episode")}
    extras: dict[str, list] = {}
    for ep in episodes:
        t = len(ep.rewards)
        parts["obs"].append(ep.observations[:t])
        parts["next_obs"].append(ep.observations[1:t + 1])
        parts["action"].append(ep.actions)
        parts["reward"].append(np.asarray(ep.rewards, np.float32))
        parts["terminated"].append(np.asarray(ep.terminations, bool))
        parts["truncated"].append(np.asarray(ep.truncations, bool))
        infos = dict(ep.infos or {})
        episode = infos.pop("episode", None)
        parts["episode"].append(np.full(t, ep.id if episode is None else int(np.asarray(episode)[0, 0]), np.int64))
        for k, v in infos.items():
            v = np.asarray(v)[:t]
            extras.setdefault(k, []).append(v.reshape(t) if v.ndim == 2 and v.shape[1] == 1 else v)
    table = StepTable(**{k: np.concatenate(v) for k, v in parts.items()},
                      extras={k: np.concatenate(v) for k, v in extras.items()})
    return table.check()
