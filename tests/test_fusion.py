"""BatchRL-MTF: fusion math, FusionEnv, BCQ, FQE / MTF-GAUC and `rmtl fusion` end to end."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import rmtl.envs  # noqa: F401  (registers rmtl/Fusion-v0)
from rmtl import fusion
from rmtl.fusion.bcq import BCQ
from rmtl.fusion.fqe import ConservativeFQE, mtf_gauc, weighted_group_auc
from rmtl.fusion.data import FusionDataset, behaviour_policy, collect, constant_policy, rollout
from rmtl.data.sessionlog import SessionLog
from rmtl.data.spec import FeatureSpec
from rmtl.fusion.env import FusionEnv
from rmtl.fusion.simulator import FusionSimulator
from rmtl.fusion.user_model import UserResponseModel
from rmtl.errors import ConfigError
from rmtl.metrics import gauc

TASKS = ["ctr", "long_view", "like", "hate"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # tiny networks: intra-op threads only add contention on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- fusion math

def test_log_sum_is_log_of_product_form_numpy_and_torch():
    rng = np.random.default_rng(0)
    o = rng.random((5, 7, 3)).astype(np.float64)
    alpha = rng.normal(size=(5, 1, 3))
    beta = np.array([1e-3, 0.1, 0.5])
    direct = np.log(np.prod((o + beta) ** alpha, axis=-1))
    np.testing.assert_allclose(fusion.log_sum(o, alpha, beta), direct, rtol=1e-10)
    np.testing.assert_allclose(np.log(fusion.product(o, alpha, beta)), direct, rtol=1e-10)
    t = fusion.log_sum(torch.tensor(o), torch.tensor(alpha), torch.tensor(beta))
    np.testing.assert_allclose(t.numpy(), direct, rtol=1e-10)
    np.testing.assert_allclose(fusion.weighted_sum(o, alpha), (o * alpha).sum(-1))


def test_ranking_orders_by_fused_score_and_puts_padding_last():
    o = np.array([[[0.1, 0.9], [0.8, 0.2], [0.5, 0.5], [0.99, 0.99]]])  # last candidate is padding
    mask = np.array([[True, True, True, False]])
    scores, top = fusion.fuse_and_rank(o, np.array([[1.0, 0.0]]), mask, top=3)
    assert top.tolist() == [[1, 2, 0]]  # by task 0 only
    _, top = fusion.fuse_and_rank(o, np.array([[0.0, 1.0]]), mask)
    assert top.tolist() == [[0, 2, 1, 3]]  # by task 1; padding last despite the best predictions
    _, top_t = fusion.fuse_and_rank(torch.tensor(o), torch.tensor([[0.0, 1.0]]), torch.tensor(mask))
    assert top_t.tolist() == [[0, 2, 1, 3]]
    assert scores.shape == (1, 4)


def test_beta_flattens_a_tiny_prediction():
    # candidate A: great on task 0, almost zero on task 1; candidate B: middling on both
    o = np.array([[0.9, 1e-4], [0.3, 0.3]])
    alpha = np.array([1.0, 1.0])
    small = fusion.log_sum(o, alpha, beta=1e-4)
    large = fusion.log_sum(o, alpha, beta=1.0)
    assert small[1] > small[0]  # log(o + tiny beta) punishes A's near-zero task
    assert large[0] > large[1]  # a large beta mutes the near-zero task: A wins


def test_unknown_fusion_is_a_config_error():
    with pytest.raises(ConfigError, match="fusion"):
        fusion.fuse(np.ones((2, 3)), np.ones(3), kind="geometric")


# ----------------------------------------------------------------------------- a tiny world

def _tiny_log(seed: int = 0, users: int = 12, items: int = 30, sessions: int = 40) -> SessionLog:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 12, size=sessions)
    n = int(lengths.sum())
    ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    user = np.repeat(rng.integers(0, users, size=sessions), lengths)
    item = rng.integers(0, items, size=n)
    quality = rng.random(items)
    click = (rng.random(n) < 0.3 + 0.5 * quality[item]).astype(np.float32)
    labels = np.stack([click, click * (rng.random(n) < 0.6), click * (rng.random(n) < 0.1),
                       (rng.random(n) < 0.05).astype(np.float32)], axis=1).astype(np.float32)
    spec = FeatureSpec("kuairand", ["user_id", "video_id"], [users + 1, items + 1], ["log_duration_s"], list(TASKS),
                       user_field="user_id", item_field="video_id")
    a, b = int(sessions * 0.6), int(sessions * 0.8)
    return SessionLog(spec, ptr, user.astype(np.int64), item.astype(np.int64), np.arange(n, dtype=np.int64),
                      np.stack([user + 1, item + 1], 1).astype(np.int64), rng.normal(size=(n, 1)).astype(np.float32),
                      labels, splits={"train": (0, a), "val": (a, b), "test": (b, sessions)})


@pytest.fixture(scope="module")
def world():
    log = _tiny_log()
    train_rows = np.arange(int(log.session_ptr[log.splits["train"][1]]))
    model = UserResponseModel.fit(log, train_rows, dim=4, epochs=5, seed=0)
    env_cfg = {"window": 3, "negatives": 4, "slate": 2, "max_depth": 8,
               "reward_weights": {"ctr": 0.25, "long_view": 1.0, "like": 2.0, "hate": -4.0}}
    sim = FusionSimulator(log, np.arange(*log.splits["train"]), model, config=env_cfg, profile_rows=train_rows, seed=0)
    return log, model, sim, env_cfg, train_rows


def test_fusion_env_passes_gymnasium_and_sb3_checks(world):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    _, _, sim, _, _ = world
    env = FusionEnv(sim)
    check_env(env, skip_render_check=True)
    sb3_check_env(FusionEnv(sim), warn=False)
    made = gym.make("rmtl/Fusion-v0", simulator=sim)
    obs, info = made.reset(seed=3)
    assert made.observation_space.contains(obs) and "session" in info
    obs, reward, terminated, truncated, info = made.step(made.action_space.sample())
    assert info["feedback"].shape == (len(TASKS),) and isinstance(reward, float)


def test_env_is_deterministic_under_a_seed(world):
    _, _, sim, _, _ = world
    env = FusionEnv(sim)

    def trajectory(seed):
        obs, _ = env.reset(seed=seed)
        out = [obs]
        for _ in range(5):
            obs, r, term, trunc, _ = env.step(np.full(len(TASKS), 0.3, np.float32))
            out.append(np.append(obs, r))
            if term or trunc:
                break
        return np.concatenate(out)

    np.testing.assert_array_equal(trajectory(11), trajectory(11))


def test_leave_model_sessions_last_longer_when_satisfied(world):
    log, model, _, env_cfg, train_rows = world
    sessions = np.arange(*log.splits["train"])
    depths = {}
    for name, satisfying in (("never_satisfied", 1e6), ("always_satisfied", 1e-6)):
        cfg = {**env_cfg, "satisfying_reward": satisfying, "patience": 2.9, "base_cost": 0.5, "poor_cost": 1.0,
               "max_depth": 20}
        sim = FusionSimulator(log, sessions, model, config=cfg, profile_rows=train_rows, seed=0)
        _, depth, _ = rollout(sim, constant_policy(np.full(len(TASKS), 0.5)), sessions)
        depths[name] = depth
    assert (depths["never_satisfied"] == 2).all()  # every request costs ~1.5 of 2.9
    # a request with any positive reward costs only 0.5, so sessions last up to 6 requests
    assert (depths["always_satisfied"] >= 2).all() and (depths["always_satisfied"] <= 6).all()
    assert depths["always_satisfied"].mean() > depths["never_satisfied"].mean() + 0.5


def test_logged_pairs_answer_with_logged_labels(world):
    log, model, _, env_cfg, train_rows = world
    # a responder that never responds: every non-zero feedback must come from logged labels
    silent = UserResponseModel(np.full(len(TASKS), -50, np.float32), model.user_bias * 0, model.item_bias * 0,
                               model.user_vec * 0, model.item_vec * 0, model.head * 0, list(TASKS))
    sessions = np.arange(*log.splits["train"])
    sim = FusionSimulator(log, sessions, model, silent, config={**env_cfg, "reward_weights": {"ctr": 1.0}},
                          profile_rows=train_rows, seed=0)
    returns, _, _ = rollout(sim, constant_policy(np.full(len(TASKS), 0.5)), sessions)
    assert returns.sum() > 0
    off = FusionSimulator(log, sessions, model, silent,
                          config={**env_cfg, "reward_weights": {"ctr": 1.0}, "use_logged_labels": False},
                          profile_rows=train_rows, seed=0)
    returns, _, _ = rollout(off, constant_policy(np.full(len(TASKS), 0.5)), sessions)
    assert returns.sum() == 0


def test_bad_env_options_name_the_key(world):
    log, model, _, env_cfg, train_rows = world
    with pytest.raises(ConfigError, match="reward_weights"):
        FusionSimulator(log, np.arange(3), model, config={**env_cfg, "reward_weights": {"watch_hours": 1.0}})
    with pytest.raises(ConfigError, match="env.slate"):
        FusionSimulator(log, np.arange(3), model, config={**env_cfg, "slate": 9})
    with pytest.raises(ConfigError, match="windw"):
        FusionSimulator(log, np.arange(3), model, config={"windw": 3})


# ----------------------------------------------------------------------------- BCQ

def test_bcq_actions_stay_within_rho_of_the_vae_proposals(world):
    _, _, sim, _, _ = world
    default = np.array([0.3, 1.0, 0.5, -1.0], np.float32)
    data = collect(sim, behaviour_policy(default, 0.2, -1, 1, seed=0), sim.sessions, passes=1)
    agent = BCQ(sim.obs_dim, len(TASKS), -1.0, 1.0, rho=0.15, hidden=32, n_samples=8, seed=0)
    logs = []
    agent.fit(data, steps=60, batch_size=64, log_every=20, on_log=lambda s, d: logs.append(d))
    assert len(logs) == 3 and all(np.isfinite(list(d.values())).all() for d in logs)
    proposal, perturbed = agent.propose(data.obs[:50])
    assert proposal.shape == perturbed.shape == (50, 8, len(TASKS))
    assert np.abs(perturbed - proposal).max() <= 0.15 * 1.0 + 1e-5  # rho x half-range
    assert np.abs(perturbed - proposal).max() > 0  # the perturbation does something
    alpha = agent.act(data.obs[:50])
    assert alpha.shape == (50, len(TASKS)) and (alpha >= -1).all() and (alpha <= 1).all()
    # a wider action box scales the bound with it
    wide = BCQ(sim.obs_dim, len(TASKS), 0.0, 4.0, rho=0.1, hidden=16, n_samples=4, seed=1)
    p, q = wide.propose(data.obs[:20])
    assert np.abs(q - p).max() <= 0.1 * 2.0 + 1e-5 and (q >= 0).all() and (q <= 4).all()


def test_bcq_rejects_bad_rho():
    with pytest.raises(ConfigError, match="bcq.rho"):
        BCQ(4, 2, rho=0.0)


# ----------------------------------------------------------------------------- FQE and MTF-GAUC

def _toy_chain(episodes: int = 300, horizon: int = 5, seed: int = 0) -> FusionDataset:
    """States t = 0..H-1 (one-hot), any action a in [-1, 1]^2, reward 1 - mean(a^2), episode ends at H."""
    rng = np.random.default_rng(seed)
    n = episodes * horizon
    t = np.tile(np.arange(horizon), episodes)
    eye = np.eye(horizon + 1, dtype=np.float32)
    action = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    return FusionDataset(obs=eye[t], action=action, reward=(1 - (action ** 2).mean(1)).astype(np.float32),
                         next_obs=eye[t + 1], done=t == horizon - 1, first=t == 0,
                         episode=np.repeat(np.arange(episodes), horizon), user=np.zeros(n, np.int64),
                         req_rows=np.full((n, 1), -1), req_o=np.zeros((n, 1, 2), np.float32))


def test_fqe_recovers_the_value_of_a_fixed_policy_on_a_toy_mdp():
    data = _toy_chain()
    gamma = 0.9
    policy = constant_policy([0.5, -0.5])  # reward 0.75 at every step
    truth = 0.75 * (1 - gamma ** 5) / (1 - gamma)
    fqe = ConservativeFQE(6, 2, gamma=gamma, cql_alpha=0.0, hidden=64, lr=3e-3, tau=0.05, seed=0)
    fqe.fit(data, policy, steps=1200, batch_size=256)
    estimate = fqe.value(data.initial_obs, policy)
    assert abs(estimate - truth) < 0.1 * truth, (estimate, truth)
    # the CQL penalty makes the estimate conservative (lower), never higher
    cons = ConservativeFQE(6, 2, gamma=gamma, cql_alpha=1.0, hidden=64, lr=3e-3, tau=0.05, seed=0)
    cons.fit(data, policy, steps=1200, batch_size=256)
    assert cons.value(data.initial_obs, policy) < estimate


def test_weighted_group_auc_matches_gauc_with_unit_weights_and_follows_weights():
    rng = np.random.default_rng(0)
    n = 400
    user = rng.integers(0, 10, n)
    y = rng.random(n) < 0.4
    score = np.round(rng.random(n) + 0.3 * y, 2)  # ties included
    assert weighted_group_auc(y, score, user, np.ones(n)) == pytest.approx(gauc(y, score, user), abs=1e-12)
    # heavy weight on the positives the score ranks well -> a higher weighted AUC
    weights = np.where(score > 0.8, 10.0, 0.1)
    assert weighted_group_auc(y, score, user, weights) > gauc(y, score, user)


def test_mtf_gauc_rewards_weights_that_rank_consumption_first(world):
    log, _, sim, _, _ = world
    data = collect(sim, constant_policy(np.zeros(len(TASKS))), sim.sessions, passes=1)
    # a fake ranker whose task 1 prediction IS the logged long_view label: weighting task 1 is perfect
    rows = np.maximum(data.req_rows, 0)
    data.req_o = np.full((*data.req_rows.shape, len(TASKS)), 0.5, np.float32)
    data.req_o[..., 1] = 0.1 + 0.8 * log.labels[rows, 1]
    good = mtf_gauc(data, constant_policy([0, 1, 0, 0]), log.labels, sim.reward_w, label_index=1)
    bad = mtf_gauc(data, constant_policy([0, -1, 0, 0]), log.labels, sim.reward_w, label_index=1)
    assert good == pytest.approx(1.0) and bad == pytest.approx(0.0)


def test_dataset_save_load_roundtrip(world, tmp_path):
    _, _, sim, _, _ = world
    data = collect(sim, constant_policy(np.zeros(len(TASKS))), sim.sessions[:5], passes=2)
    assert len(np.unique(data.episode)) == 10 and data.first.sum() == 10
    path = data.save(tmp_path / "d.npz")
    back = FusionDataset.load(path)
    np.testing.assert_array_equal(back.obs, data.obs)
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]


# ----------------------------------------------------------------------------- command line

TINY_RUN = ["data.synthetic.users=40", "data.synthetic.items=80", "user_model.epochs=2",
            "behaviour.passes=1", "behaviour.heldout_passes=1", "bcq.steps=15", "bcq.log_every=5",
            "bcq.batch_size=32", "cem.iterations=1", "cem.population=4", "cem.sessions=4",
            "td3.timesteps=120", "td3.learning_starts=60", "fqe.steps=10", "eval.repeats=1", "eval.truth_repeats=2"]


def test_rmtl_fusion_end_to_end(tmp_path, capsys):
    from rmtl.cli import main

    run_dir = tmp_path / "run"
    code = main(["fusion", f"run_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}", *TINY_RUN,
                 "ope.estimators=[dr,wpdis,sfqe,fqe,fqe_cql]", "ope.resamples=20"])
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["table"]) == ["equal", "behaviour", "cem", "bcq", "td3"]
    for row in results["table"].values():
        assert np.isfinite([row["true_value"], row["dr"], row["dr_se"], row["wpdis"], row["sfqe"], row["fqe"],
                            row["fqe_cql"], row["sim_reward"], row["sim_depth"]]).all()
        assert row["sim_depth"] >= 1
    for name in ("equal", "bcq", "td3"):
        assert any(line.startswith(name) for line in out.splitlines())
    assert "true_value" in out and "mtf_gauc" in out and "rank correlation" in out
    assert "DR (slate IS + slate FQE) [default]" in out and "cannot distinguish" in out
    # the ones with bootstrap intervals; MTF-GAUC's resamples users (it ranks, it is no value)
    assert set(results["estimators"]["tie_aware"]) == {"dr", "wpdis", "mtf_gauc"}
    assert "mtf_gauc" not in results["estimators"]["errors"] and results["table"]["cem"]["mtf_gauc_se"] > 0
    res = results["estimators"]["resolution"]  # 2 truth passes, 1 held-out pass: 2 on-policy samples
    assert res["samples"] == 2
    if results["estimators"]["pairs"]:  # (2 truth passes may establish no pair at all)
        assert 0 <= res["paired"]["all_pairs"] <= res["paired"]["pairs"] <= 1
    weights = results["estimators"]["weights"]  # how much of the log each policy's slate weights use
    assert set(weights) == set(results["table"]) and all(w["coverage"] >= 0 and 0 <= w["effective"] <= 1
                                                         for w in weights.values())
    assert "slate weights on the held-out log" in out
    assert ("resolution of the held-out log" in out) == bool(results["estimators"]["pairs"])
    for col in ("dr", "sfqe", "fqe", "fqe_cql"):  # estimate - truth per policy, and the rank correlation
        errors = results["estimators"]["errors"][col]
        assert errors["bcq"] == pytest.approx(results["table"]["bcq"][col] - results["table"]["bcq"]["true_value"])
        assert -1 <= results["estimators"]["rank_corr"][col] <= 1
    assert out.count("stage ") >= 6  # not a terminal: one line per stage
    assert any(p.name.startswith("events") for p in (run_dir / "tb").iterdir())
    assert (run_dir / "logged_train.npz").exists() and (run_dir / "config.yaml").exists()
    # the trained policies and critics are kept, and reload to the same actions
    from rmtl.fusion.fqe import ConservativeFQE
    from rmtl.fusion.policies import load_policy

    held = FusionDataset.load(run_dir / "logged_heldout.npz")
    for name in results["table"]:
        act = load_policy(run_dir / "policies" / f"{name}.pt")
        torch.manual_seed(0)  # BCQ samples its proposals
        mean_alpha = np.asarray(act(held.initial_obs), np.float64).mean(0)
        if name != "bcq":
            np.testing.assert_allclose(mean_alpha, list(results["alphas"][name].values()), atol=1e-4)
        fqe = ConservativeFQE.load(run_dir / "fqe" / f"{name}_fqe.pt")
        assert fqe.value(held.initial_obs, act) == pytest.approx(results["table"][name]["fqe"], rel=1e-5) or \
            name == "bcq"
        slate_fqe = ConservativeFQE.load(run_dir / "fqe" / f"{name}_sfqe.pt")  # DR's critic
        assert slate_fqe.estimate(held, act) == pytest.approx(results["table"][name]["sfqe"], rel=1e-5) or \
            name == "bcq"
    # a saved policy scores logged sessions without retraining: on the run's own held-out data it gives the run's DR
    score = ["fusion", "score", "--run-dir", str(run_dir), "--sessions", str(run_dir / "logged_heldout.npz")]
    assert main([*score, "--policy", "cem"]) == 0
    out = capsys.readouterr().out
    assert f"DR value (default)  {results['table']['cem']['dr']:.3f}" in out and "shows the logged slate" in out
    (tmp_path / "bad.npz").write_text("not arrays")
    for bad, needle in ((["--policy", "dqn"], "no saved policy 'dqn'"),
                        ([*score[:-1], str(tmp_path / "bad.npz"), "--policy", "cem"], "bad.npz"),
                        ([*score[:-1], str(run_dir / "config.yaml"), "--policy", "cem"], "config.yaml")):
        assert main([*score, *bad] if bad[0] == "--policy" else bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    old = FusionDataset.load(run_dir / "logged_heldout.npz")
    old.propensity = None  # data logged without propensities cannot be importance-weighted
    old.save(tmp_path / "nopro.npz")
    assert main([*score[:-1], str(tmp_path / "nopro.npz"), "--policy", "cem"]) == 2
    assert "propensity" in capsys.readouterr().err


def test_rmtl_fusion_config_typo_names_the_key(tmp_path, capsys):
    from rmtl.cli import main

    assert main(["fusion", "bcq.stpes=3", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "bcq.stpes" in err and "bcq.steps" in err
    assert main(["fusion", "policies=[bcq,dqn]", f"run_dir={tmp_path}"]) == 2
    assert "policies" in capsys.readouterr().err


def test_rmtl_fusion_unknown_config_lists_only_fusion_configs(capsys):
    from rmtl.cli import main

    assert main(["fusion", "-c", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "packaged: fusion" in err and "quickstart" not in err
    assert main(["fusion", "-c", "quickstart"]) == 2  # a run config is not a fusion config
    assert "packaged: fusion" in capsys.readouterr().err


def test_session_side_does_not_load_the_fusion_room():
    import subprocess
    import sys

    code = ("import sys, gymnasium as gym, rmtl.envs, rmtl.agents; "
            "assert not [m for m in sys.modules if m.startswith('rmtl.fusion')], sorted(sys.modules); "
            "assert 'rmtl/Fusion-v0' in gym.registry and 'rmtl/Session-v0' in gym.registry")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_env_section_is_the_simulators_own_config():
    from rmtl.fusion.config import load_fusion_config
    from rmtl.fusion.simulator import DEFAULT_REWARD_WEIGHTS, FUSION_TASKS, FusionEnvConfig

    cfg = load_fusion_config("fusion", ["env.action_high=2.0"])
    assert isinstance(cfg.env, FusionEnvConfig) and cfg.env.action_high == 2.0
    assert cfg.env.reward_weights == DEFAULT_REWARD_WEIGHTS and list(cfg.data.tasks) == FUSION_TASKS
    with pytest.raises(ConfigError, match="env.windw"):
        load_fusion_config("fusion", ["env.windw=3"])


def test_rmtl_fusion_is_deterministic_under_a_seed(tmp_path):
    from rmtl.fusion.config import load_fusion_config
    from rmtl.fusion.pipeline import run_fusion

    tables = []
    for run in ("a", "b"):  # the second run reads the SessionLog from the cache the first one wrote
        cfg = load_fusion_config("fusion", [f"run_dir={tmp_path / run}", f"data.cache_dir={tmp_path / 'cache'}",
                                            "policies=[behaviour,cem,bcq]", *TINY_RUN])
        tables.append(run_fusion(cfg, verbose=False).table)
    assert tables[0] == tables[1]


def test_backbone_ranker_composes_user_and_video_features(world):
    from rmtl.fusion.backbone_ranker import BackboneRanker, fit_backbone

    log, model, _, env_cfg, train_rows = world
    backbone = fit_backbone(log, "mmoe", epochs=1, batch_size=64, seed=0)
    ranker = BackboneRanker(backbone, log, train_rows)
    # a user's last train row, scored with its own video, is exactly that logged row's prediction
    row = int(ranker.user_row[log.user[train_rows[-1]]])
    with torch.no_grad():
        direct = torch.sigmoid(backbone(torch.as_tensor(log.sparse[row:row + 1]),
                                        torch.as_tensor(log.dense[row:row + 1]))).numpy()[0]
    np.testing.assert_allclose(ranker.predict(log.user[row], log.item[row]), direct, rtol=1e-5)
    probs = ranker.predict(log.user[:3, None], np.arange(5)[None, :])
    assert probs.shape == (3, 5, len(TASKS)) and ((probs > 0) & (probs < 1)).all()
    # the simulator takes it as its ranker (o), with the user model answering
    sim = FusionSimulator(log, np.arange(*log.splits["test"]), ranker, model, config=env_cfg, profile_rows=train_rows)
    returns, depth, _ = rollout(sim, constant_policy(np.full(len(TASKS), 0.5)), sim.sessions)
    assert np.isfinite(returns).all() and (depth >= 1).all()
