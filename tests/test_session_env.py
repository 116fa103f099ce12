import warnings

import gymnasium as gym
import numpy as np
import pytest

from rmtl.envs import SESSION_ENV_ID, SessionEnv
from rmtl.envs.synthetic_log import random_session_log
from rmtl.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def log():
    return random_session_log(30, cardinalities=(6, 9, 4), num_dense=2, seed=1)


def test_checkers_are_clean(log):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check(SessionEnv(log), skip_render_check=True)
        sb3_check(SessionEnv(log), warn=True)
    # The only remark allowed is SB3's advice to use [-1, 1] actions: the design asks for probabilities in [0, 1].
    other = [str(w.message) for w in caught if "symmetric and normalized Box action space" not in str(w.message)]
    assert other == []


def test_episode_replays_one_session_and_rewards_are_negative_bce(log):
    env = SessionEnv(log, task_weights=[1.0, 2.0])
    obs, info = env.reset(seed=3)
    s = info["session"]
    lo, hi = log.session_ptr[s], log.session_ptr[s + 1]
    assert info["row"] == lo
    np.testing.assert_array_equal(obs["sparse"], log.sparse[lo])
    action = np.array([0.8, 0.1], dtype=np.float32)
    steps, done = 0, False
    while not done:
        obs, reward, done, truncated, info = env.step(action)
        y = log.labels[info["judged_row"]]
        expected = y * np.log(action) + (1 - y) * np.log(1 - action)
        np.testing.assert_allclose(info["task_rewards"], expected, rtol=1e-5)
        assert reward == pytest.approx(expected[0] + 2 * expected[1], rel=1e-5)
        assert not truncated
        steps += 1
    assert steps == hi - lo
    assert info["judged_row"] == hi - 1 and info["row"] == hi - 1  # the last state repeats


def test_reset_is_deterministic_under_a_seed(log):
    a, b = SessionEnv(log), SessionEnv(log)
    sessions_a = [a.reset(seed=s)[1]["session"] for s in range(10)]
    sessions_b = [b.reset(seed=s)[1]["session"] for s in range(10)]
    assert sessions_a == sessions_b
    assert len(set(sessions_a)) > 1


def test_sequential_order_walks_sessions_in_order(log):
    env = SessionEnv(log, order="sequential", max_sessions=4)
    got = [env.reset(seed=0 if i == 0 else None)[1]["session"] for i in range(6)]
    assert got == [0, 1, 2, 3, 0, 1]


def test_abs_reward_and_bad_options(log):
    env = SessionEnv(log, reward="abs")
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([0.25, 0.75], dtype=np.float32))
    y = info["labels"]
    np.testing.assert_allclose(info["task_rewards"], -np.abs(y - [0.25, 0.75]), rtol=1e-6)
    with pytest.raises(ConfigError, match="reward"):
        SessionEnv(log, reward="mse")
    with pytest.raises(ConfigError, match="task_weights"):
        SessionEnv(log, task_weights=[1.0])


def test_registered_with_gymnasium(log):
    env = gym.make(SESSION_ENV_ID, log=log, disable_env_checker=True)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def test_sb3_td3_trains_on_the_env(log):
    from stable_baselines3 import TD3

    env = SessionEnv(log)
    model = TD3("MultiInputPolicy", env, learning_starts=200, batch_size=64, train_freq=(8, "step"), gradient_steps=1,
                policy_kwargs={"net_arch": [32, 32]}, seed=0, verbose=0, device="cpu")
    model.learn(total_timesteps=2000)
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(action.astype(np.float32))
    assert model.num_timesteps == 2000 and model.replay_buffer.size() == 2000
    assert model._n_updates > 0  # the critic and actor were trained
