"""Fusion runs keep what they train (policies and FQE critics reload to identical outputs),
estimator validation against simulator truth, and stage progress."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from rmtl.errors import DataError
from rmtl.fusion.bcq import BCQ
from rmtl.fusion.data import collect, constant_policy
from rmtl.fusion.fqe import ConservativeFQE
from rmtl.fusion.policies import load_policy, save_policy
from rmtl.fusion.progress import StageProgress
from rmtl.fusion.validation import distinguishable_pairs, estimator_report, rank, spearman, true_value

from test_fusion import TASKS, _one_torch_thread, world  # noqa: F401  (fixtures: one torch thread, a tiny world)


def _weights_only(path):
    return torch.load(path, weights_only=True)  # what rmtl.checkpoint will insist on


def test_bcq_saved_and_loaded_gives_identical_actions(world, tmp_path):  # noqa: F811
    _, _, sim, _, _ = world
    data = collect(sim, constant_policy(np.zeros(len(TASKS))), sim.sessions[:10], passes=1)
    agent = BCQ(sim.obs_dim, len(TASKS), -1.0, 1.0, hidden=16, n_samples=4, seed=0)
    agent.fit(data, steps=20, batch_size=16)
    path = save_policy(agent, tmp_path / "bcq.pt")
    assert isinstance(_weights_only(path), dict)
    back = load_policy(path)
    torch.manual_seed(3)
    a = agent.act(data.obs)
    torch.manual_seed(3)
    np.testing.assert_array_equal(back.act(data.obs), a)
    np.testing.assert_array_equal(back.q_value(data.obs, data.action), agent.q_value(data.obs, data.action))


def test_td3_policy_saved_and_loaded_matches_sb3_predict(world, tmp_path):  # noqa: F811
    from rmtl.fusion.baselines import train_td3

    _, _, sim, _, _ = world
    act = train_td3(sim, timesteps=80, learning_starts=40, hidden=16, seed=0)
    obs = sim.reset(sim.sessions[:6])
    path = save_policy(act, tmp_path / "td3.pt")
    assert isinstance(_weights_only(path), dict)
    back = load_policy(path)
    expected = act(obs)
    np.testing.assert_allclose(back(obs), expected, rtol=1e-6, atol=1e-6)
    assert (back(obs) >= -1).all() and (back(obs) <= 1).all()


def test_constant_policy_and_fqe_critic_round_trip(world, tmp_path):  # noqa: F811
    _, _, sim, _, _ = world
    alpha = np.linspace(-1, 1, len(TASKS)).astype(np.float32)
    back = load_policy(save_policy(constant_policy(alpha), tmp_path / "cem.pt"))
    obs = sim.reset(sim.sessions[:3])
    np.testing.assert_array_equal(back(obs), np.tile(alpha, (3, 1)))

    data = collect(sim, constant_policy(np.zeros(len(TASKS))), sim.sessions[:8], passes=1)
    fqe = ConservativeFQE(sim.obs_dim, len(TASKS), hidden=16, seed=0).fit(data, back, steps=20, batch_size=16)
    path = fqe.save(tmp_path / "fqe.pt")
    assert isinstance(_weights_only(path), dict)
    assert ConservativeFQE.load(path).value(data.initial_obs, back) == fqe.value(data.initial_obs, back)


def test_loading_something_else_is_a_clear_error(tmp_path):
    torch.save({"format": "something"}, tmp_path / "x.pt")
    with pytest.raises(DataError, match="not a fusion policy"):
        load_policy(tmp_path / "x.pt")
    with pytest.raises(DataError, match="no such fusion policy file"):
        load_policy(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="cannot save"):
        save_policy(lambda obs: obs, tmp_path / "y.pt")


# ----------------------------------------------------------------------------- validation

def test_rank_correlation_by_hand():
    np.testing.assert_array_equal(rank([3.0, 1.0, 2.0, 2.0]), [4.0, 1.0, 2.5, 2.5])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = rank differences (0, 0, 1, -1): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_distinguishable_pairs_and_estimator_report():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=400)  # common random numbers: the same noise for every policy
    returns = {"a": 5.0 + noise, "b": 5.0 + noise + 0.01 * rng.normal(size=400), "c": 4.0 + noise}
    pairs = distinguishable_pairs(returns)
    assert set(pairs) == {("a", "c"), ("b", "c")}  # a vs b: no established order
    table = {n: {"true_value": float(v.mean())} for n, v in returns.items()}
    table["a"].update(est=9.0, mtf_gauc=0.6)
    table["b"].update(est=3.0, mtf_gauc=0.7)
    table["c"].update(est=1.0, mtf_gauc=0.5)
    report = estimator_report(table, {"est": "E"}, pairs=pairs)
    assert report["errors"]["est"]["a"] == pytest.approx(9.0 - table["a"]["true_value"])
    assert report["concordant"]["est"] == 1.0 and report["concordant"]["mtf_gauc"] == 1.0
    assert "mtf_gauc" not in report["errors"]


def test_true_value_is_the_discounted_return_under_common_random_numbers(world):  # noqa: F811
    from rmtl.fusion.data import rollout

    _, _, sim, _, _ = world
    act = constant_policy(np.full(len(TASKS), 0.5))
    sessions = sim.sessions[:6]
    first = true_value(sim, act, sessions, gamma=0.9, repeats=2, seed=5)
    np.testing.assert_array_equal(first, true_value(sim, act, sessions, gamma=0.9, repeats=2, seed=5))
    # by hand: the same draws (both passes in one batched rollout), recorded step by step, discounted per episode
    sim.rng = np.random.default_rng(5)
    _, _, data = rollout(sim, act, np.tile(sessions, 2), record=True)
    step = np.zeros(len(data), np.int64)
    for e in np.unique(data.episode):  # a few episodes: the step index of each of their rows
        rows = np.flatnonzero(data.episode == e)
        step[rows] = np.arange(len(rows))
    by_hand = np.bincount(data.episode, weights=0.9 ** step * data.reward, minlength=2 * len(sessions))
    np.testing.assert_allclose(first, by_hand, rtol=1e-6, atol=1e-5)  # float32 rewards, pass by pass
    # at most ``batch`` sessions per rollout: one pass per rollout is the passes one after the other
    sim.rng = np.random.default_rng(5)
    one_by_one = np.concatenate([rollout(sim, act, sessions, gamma=0.9)[0] for _ in range(2)])
    np.testing.assert_array_equal(true_value(sim, act, sessions, gamma=0.9, repeats=2, seed=5, batch=len(sessions)),
                                  one_by_one)


# ----------------------------------------------------------------------------- progress

def test_progress_is_a_line_per_stage_off_a_terminal_and_a_bar_on_one(capsys):
    out = io.StringIO()
    progress = StageProgress(terminal=False, stream=out)
    with progress.stage("bcq", total=100, unit="step") as advance:
        advance(to=50)
        advance(to=100)
    with progress.stage("data"):
        pass
    assert out.getvalue().splitlines() == ["stage bcq (100 steps) ...", "stage data ..."]
    assert set(progress.timings) == {"bcq", "data"}

    bar = StageProgress(terminal=True, stream=out)
    with bar.stage("td3", total=10, unit="step") as advance:
        advance(5)
        advance(5)
    assert "td3" in capsys.readouterr().err  # tqdm draws on stderr
    silent = StageProgress(enabled=False, stream=out)
    with silent.stage("x", total=3):
        pass
    assert "x" not in out.getvalue()
