import numpy as np
import pytest

from rmtl.envs import SessionEnv, build_transitions
from rmtl.envs.synthetic_log import random_session_log
from rmtl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def log():
    return random_session_log(25, min_length=2, max_length=6, seed=2)


def rollout(log, actions, reward):
    """Step-by-step replay of every session in order, feeding the given per-row actions."""
    env = SessionEnv(log, order="sequential", reward=reward)
    rows, rewards, next_rows, dones = [], [], [], []
    for i in range(log.num_sessions):
        _, info = env.reset(seed=0 if i == 0 else None)
        done = False
        while not done:
            row = info["row"]
            _, _, done, _, info = env.step(actions[row])
            rows.append(row)
            rewards.append(info["task_rewards"])
            next_rows.append(info["row"])
            dones.append(float(done))
    return np.array(rows), np.array(rewards), np.array(next_rows), np.array(dones, dtype=np.float32)


@pytest.mark.parametrize("policy,reward", [("noisy", "bce"), ("random", "bce"), ("noisy", "abs")])
def test_vectorised_transitions_equal_env_rollout(log, policy, reward):
    preds = np.random.default_rng(0).random(log.labels.shape, dtype=np.float32)
    preds[:3] = [0.0, 1.0]  # extreme actions exercise the clipping
    tr = build_transitions(log, preds if policy == "noisy" else None, policy=policy, noise_std=0.2, seed=5, reward=reward)
    rows, rewards, nxt, dones = rollout(log, tr.action, reward)
    np.testing.assert_array_equal(rows, tr.state_row)
    np.testing.assert_array_equal(rewards, tr.reward)  # number for number
    np.testing.assert_array_equal(nxt, tr.next_row)
    np.testing.assert_array_equal(dones, tr.done)
    assert np.isfinite(tr.reward).all() and (tr.reward <= 0).all()


def test_last_event_points_to_itself(log):
    tr = build_transitions(log, seed=0)
    last = log.session_ptr[1:] - 1
    np.testing.assert_array_equal(tr.next_row[last], last)
    assert tr.done.sum() == log.num_sessions
    assert ((tr.action >= 0) & (tr.action <= 1)).all()


def test_noise_is_seeded_and_clipped(log):
    preds = np.full(log.labels.shape, 0.5, dtype=np.float32)
    a = build_transitions(log, preds, noise_std=0.3, seed=1).action
    b = build_transitions(log, preds, noise_std=0.3, seed=1).action
    c = build_transitions(log, preds, noise_std=0.3, seed=2).action
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and 0.2 < a.std() < 0.35
    np.testing.assert_array_equal(build_transitions(log, preds, policy="given").action, preds)


def test_bad_inputs(log):
    with pytest.raises(DataError, match="actions"):
        build_transitions(log, np.zeros((3, 2), np.float32))
    with pytest.raises(ConfigError, match="policy"):
        build_transitions(log, policy="greedy")
    with pytest.raises(ConfigError, match="actions"):
        build_transitions(log, policy="noisy")
