"""Offline-RL export: fusion logs and session transitions out as Minari / d3rlpy data and back."""

from __future__ import annotations

import importlib.util
from dataclasses import fields

import numpy as np
import pytest

from rmtl.envs.synthetic_log import random_session_log
from rmtl.envs.transitions import build_transitions
from rmtl.fusion.data import FusionDataset, behaviour_policy, collect
from rmtl.offline import (d3rlpy_arrays, from_d3rlpy, from_minari, fusion_steps, load_d3rlpy_npz, save_d3rlpy_npz,
                          session_steps, steps_to_fusion, to_d3rlpy, to_minari)

from test_fusion import TASKS, _one_torch_thread, world  # noqa: F401  (fixtures)

HAS_MINARI = importlib.util.find_spec("minari") is not None
HAS_D3RLPY = importlib.util.find_spec("d3rlpy") is not None


@pytest.fixture(scope="module")
def logged(world):  # noqa: F811
    _, _, sim, _, _ = world
    sim.cfg.max_depth = 3  # some sessions are cut (truncated), others end with the user leaving
    try:
        # the noisy logger: its candidates and slate propensities travel with the data too
        return collect(sim, behaviour_policy(np.zeros(len(TASKS)), 0.3, -1, 1, seed=0), sim.sessions[:12], passes=2)
    finally:
        sim.cfg.max_depth = 8


def _same_fusion(a: FusionDataset, b: FusionDataset) -> None:
    order = np.argsort(a.episode, kind="stable")
    for f in fields(FusionDataset):
        assert getattr(a, f.name) is not None, f.name  # every array, the optional ones included, round-trips
        np.testing.assert_array_equal(getattr(b, f.name), getattr(a, f.name)[order], err_msg=f.name)


def test_fusion_data_tells_terminations_from_truncations(logged):
    steps = fusion_steps(logged)
    assert steps.truncated.any() and steps.terminated.any()
    assert ((steps.terminated | steps.truncated) == logged.done[np.argsort(logged.episode, kind="stable")]).all()
    assert len(steps.bounds()) - 1 == len(np.unique(logged.episode))


def test_d3rlpy_arrays_round_trip_without_d3rlpy(logged, tmp_path):
    steps = fusion_steps(logged)
    arrays = d3rlpy_arrays(steps)
    assert arrays["rewards"].shape == (len(logged), 1)
    assert arrays["terminals"].sum() + arrays["timeouts"].sum() == len(np.unique(logged.episode))
    back = steps_to_fusion(load_d3rlpy_npz(save_d3rlpy_npz(steps, tmp_path / "mdp.npz")))
    _same_fusion(logged, back)


@pytest.mark.skipif(not HAS_D3RLPY, reason="d3rlpy not installed (optional; 2.8.1 would downgrade gymnasium "
                                           "1.4 -> 1.0, so it is not in any extra)")
def test_d3rlpy_mdpdataset_groups_the_episodes(logged):
    steps = fusion_steps(logged)
    dataset = to_d3rlpy(steps)
    assert len(dataset.episodes) == len(np.unique(logged.episode))
    back = from_d3rlpy(dataset)
    for name in ("obs", "action", "reward", "terminated", "truncated"):
        np.testing.assert_array_equal(getattr(back, name), getattr(steps, name), err_msg=name)
    inner = ~(steps.terminated | steps.truncated)  # d3rlpy keeps no next observation after the last step
    np.testing.assert_array_equal(back.next_obs[inner], steps.next_obs[inner])
    np.testing.assert_array_equal(back.bounds(), steps.bounds())


@pytest.mark.skipif(not HAS_MINARI, reason="minari not installed (optional: pip install -e '.[offline]')")
def test_fusion_data_round_trips_through_minari(logged, tmp_path):
    ds = to_minari(fusion_steps(logged), "rmtl/fusion-test-v0", root=tmp_path, action_low=-1.0, action_high=1.0)
    assert ds.total_episodes == len(np.unique(logged.episode)) and ds.total_steps == len(logged)
    _same_fusion(logged, steps_to_fusion(from_minari("rmtl/fusion-test-v0", root=tmp_path)))


@pytest.mark.skipif(not HAS_MINARI, reason="minari not installed (optional: pip install -e '.[offline]')")
def test_session_transitions_round_trip_through_minari(tmp_path):
    log = random_session_log(15, seed=1)
    tr = build_transitions(log, seed=0)
    steps = session_steps(log, tr)
    assert steps.terminated.sum() == log.num_sessions and not steps.truncated.any()
    np.testing.assert_allclose(steps.reward, tr.reward.sum(1), rtol=1e-6)
    to_minari(steps, "rmtl/session-test-v0", root=tmp_path, action_low=0.0, action_high=1.0)
    back = from_minari("rmtl/session-test-v0", root=tmp_path)
    for name in ("obs", "action", "reward", "next_obs", "terminated", "truncated", "episode"):
        np.testing.assert_array_equal(getattr(back, name), getattr(steps, name), err_msg=name)
    np.testing.assert_array_equal(back.extras["row"], tr.state_row)
    np.testing.assert_array_equal(back.extras["task_rewards"], tr.reward)


def test_session_transitions_as_d3rlpy_arrays(tmp_path):
    log = random_session_log(10, seed=2)
    tr = build_transitions(log, seed=0)
    steps = session_steps(log, tr)
    back = load_d3rlpy_npz(save_d3rlpy_npz(steps, tmp_path / "s.npz"))
    np.testing.assert_array_equal(back.obs, steps.obs)
    np.testing.assert_array_equal(back.extras["task_rewards"], tr.reward)
    # the observation is the row's sparse codes then its dense features
    np.testing.assert_array_equal(steps.obs[:, :log.sparse.shape[1]], log.sparse.astype(np.float32))
