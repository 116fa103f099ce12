"""Leak-free RMTL weights: cross-fitted critics, session context, the sanity arms, `rmtl compare`."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from rmtl.agents.config import AgentConfig
from rmtl.agents.rmtl_agent import RMTLAgent
from rmtl.cli import main
from rmtl.data.batches import gather_batch
from rmtl.data.sessionlog import SessionLog
from rmtl.data.spec import FeatureSpec
from rmtl.envs import SessionEnv, build_transitions
from rmtl.envs.context import context_columns, session_context
from rmtl.envs.synthetic_log import random_session_log
from rmtl.weighting import build_strategy


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def leaked_rows(agent: RMTLAgent, log: SessionLog) -> int:
    """Train rows whose weight reads a critic set that sampled a row of the same session."""
    sess = log.session_of_row()
    fold = agent.fold_of_rows(log)
    leaks = 0
    for k, seen in enumerate(agent.trained_rows):
        saw_session = np.bincount(sess, weights=seen, minlength=log.num_sessions) > 0
        uses_k = (fold == k) | (fold < 0)  # -1: the weight reads every set
        leaks += int((uses_k & saw_session[sess]).sum())
    return leaks


def test_default_critics_never_weight_rows_of_sessions_they_trained_on():
    log = random_session_log(80, seed=1)
    cfg = AgentConfig(steps=200, batch_size=64, device="cpu", critic_hidden=[8])
    agent = RMTLAgent(log.spec, cfg, seed=0)
    agent.train(log, build_transitions(log, seed=0))
    assert agent.num_sets == 2 and all(seen.any() for seen in agent.trained_rows)
    assert leaked_rows(agent, log) == 0
    # and the check can fail: one set trained on every row weights those same rows
    leaky = RMTLAgent(log.spec, AgentConfig(steps=200, batch_size=64, device="cpu", critic_hidden=[8],
                                            cross_fit=False), seed=0)
    leaky.train(log, build_transitions(log, seed=0))
    assert leaked_rows(leaky, log) > log.num_rows // 2


def noise_log(sessions: int = 300, length: int = 4, seed: int = 0) -> SessionLog:
    """Labels are coin flips; field 0 is a per-session id: only memorisation can predict a label."""
    rng = np.random.default_rng(seed)
    n = sessions * length
    sid = np.repeat(np.arange(sessions), length)
    spec = FeatureSpec(source="toy", sparse_fields=["sid"], cardinalities=[sessions + 1], dense_fields=[],
                       tasks=["a"])
    labels = (rng.random((n, 1)) < 0.3).astype(np.float32)
    return SessionLog(spec=spec, session_ptr=np.arange(0, n + 1, length, dtype=np.int64), user=sid, item=sid,
                      time=np.arange(n, dtype=np.int64) * 1000, sparse=(sid + 1)[:, None].astype(np.int64),
                      dense=np.zeros((n, 0), np.float32), labels=labels, splits={"train": (0, sessions)})


def label_corr(cross_fit: bool) -> float:
    log = noise_log()
    cfg = AgentConfig(steps=1500, batch_size=128, lr=1e-2, device="cpu", critic_hidden=[32], embed_dim=8,
                      gamma=0.0, cross_fit=cross_fit, context=[])
    agent = RMTLAgent(log.spec, cfg, seed=0)
    probs = np.full((log.num_rows, 1), 0.3, np.float32)
    agent.train(log, build_transitions(log, probs, policy="given"))
    strategy = build_strategy("rmtl", 1, agent=agent)
    strategy.bind_log(log)
    b = gather_batch(log, np.arange(log.num_rows))
    w = strategy.weights(b.sparse, b.dense, torch.logit(torch.from_numpy(probs)), rows=b.rows)
    return float(np.corrcoef(w[:, 0].numpy(), log.labels[:, 0])[0, 1])


def test_cross_fitting_removes_the_label_memorisation_through_ids():
    leaky, clean = label_corr(False), label_corr(True)
    assert leaky > 0.3, leaky  # the weights "know" the training labels
    assert abs(clean) < 0.1, clean


def test_session_context_uses_only_earlier_rows():
    log = random_session_log(30, seed=2)
    ctx = session_context(log, ["position", "elapsed", "gap", "history", "last"])
    assert ctx.shape == (log.num_rows, len(context_columns(["position", "elapsed", "gap", "history", "last"],
                                                           log.spec.tasks)))
    ptr = log.session_ptr
    for s in range(5):  # loop only in the test: the reference, row by row
        lo, hi = ptr[s], ptr[s + 1]
        for r in range(lo, hi):
            pos = r - lo
            assert ctx[r, 0] == pytest.approx(np.log1p(pos))
            assert ctx[r, 1] == pytest.approx(np.log1p((log.time[r] - log.time[lo]) / 1000), rel=1e-5)
            gap = 0.0 if pos == 0 else (log.time[r] - log.time[r - 1]) / 1000
            assert ctx[r, 2] == pytest.approx(np.log1p(gap), rel=1e-5)
            np.testing.assert_allclose(ctx[r, 3:5], np.log1p(log.labels[lo:r].sum(0)), rtol=1e-5)
            np.testing.assert_array_equal(ctx[r, 5:7], log.labels[r - 1] if pos else 0)
    # changing a row's own labels never changes its own context
    other = SessionLog(**{**log.__dict__, "labels": 1 - log.labels})
    changed = session_context(other, ["history", "last"]) != session_context(log, ["history", "last"])
    assert not changed[ptr[:-1]].any()  # first rows: nothing earlier


def test_env_and_transitions_show_the_same_context():
    from gymnasium.utils.env_checker import check_env

    log = random_session_log(20, seed=4)
    names = ["position", "gap", "history", "last"]
    env = SessionEnv(log, context=names, order="sequential")
    check_env(env, skip_render_check=True)
    tr = build_transitions(log, seed=0, context=names)
    obs, info = env.reset(seed=0)
    for _ in range(6):
        np.testing.assert_array_equal(obs["context"], tr.context[info["row"]])
        obs, _, done, _, info = env.step(env.action_space.sample())
        if done:
            obs, info = env.reset()
    assert isinstance(env.observation_space["context"], gym.spaces.Box)


def test_sanity_arms_weights():
    log = random_session_log(60, seed=3)
    agent = RMTLAgent(log.spec, AgentConfig(steps=40, batch_size=64, device="cpu", critic_hidden=[8]), seed=0)
    agent.train(log, build_transitions(log, seed=0))
    b = gather_batch(log, np.arange(64))
    logits = torch.zeros(64, 2)
    arms = {}
    for name, opts in {"rmtl": {}, "lam0": {"lam": 0.0}, "shuffle": {"transform": "shuffle"},
                       "label": {"transform": "label"}}.items():
        s = build_strategy("rmtl", 2, agent=agent, **opts)
        s.bind_log(log)
        arms[name] = s.weights(b.sparse, b.dense, logits, rows=b.rows, labels=b.labels)
    assert s.lam == agent.config.lam and s.twin == agent.config.twin  # one source: the checkpoint's
    assert torch.equal(arms["lam0"], torch.ones(64, 2))
    torch.testing.assert_close(arms["shuffle"].sort(0).values, arms["rmtl"].sort(0).values)
    assert not torch.equal(arms["shuffle"], arms["rmtl"])
    for k in range(2):  # label arm: one value per label class
        for y in (0.0, 1.0):
            assert len(torch.unique(arms["label"][b.labels[:, k] == y, k])) <= 1
    twin = build_strategy("rmtl", 2, agent=agent, twin="first")
    twin.bind_log(log)
    w_first = twin.weights(b.sparse, b.dense, logits, rows=b.rows)
    assert not torch.equal(w_first, arms["rmtl"])  # twin reaches the formula (it used to be ignored)


def test_compare_bad_input_is_one_line_exit_2(capsys):
    for argv, key in [(["compare", "--seeds", "0"], "--seeds"), (["compare", "--arms", "ew,nope"], "--arms"),
                      (["compare", "agent.folds=1"], "agent.folds"),
                      (["synth", "--schema", "retailrocket", "--out", "/nonexistent/x", "--dynamics", "3.5"],
                       "dynamics")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert key in err and len(err.splitlines()) == 1, err


def test_compare_end_to_end(tmp_path):
    from rmtl.compare import run_compare
    from rmtl.config import load_config

    cfg = load_config(None, ["data.source=retailrocket", "data.synthetic={users: 80, items: 40}",
                             f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.batch_size=128",
                             "train.device=cpu", "agent.steps=20", "agent.batch_size=64", "agent.device=cpu",
                             "agent.finetune_epochs=1", "agent.finetune_eval_every=2"])
    res = run_compare(cfg, seeds=2, arms=["rmtl", "label", "uw"], jobs=1, out_dir=tmp_path / "cmp",
                      bootstrap=20, say=lambda s: None)
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["arms"] == ["ew", "rmtl", "label", "uw"]
    auc = saved["summary"]["rmtl"]["ctr"]["auc"]
    assert auc["n"] == 2 and len(auc["diffs"]) == 2 and {"t_p", "wilcoxon_p", "sd"} <= set(auc)
    assert saved["summary_finetuned"]["rmtl"]["ctr"]["auc"]["n"] == 2
    lo, hi = saved["per_seed"][0]["bootstrap"]["rmtl"]["ctr"]["auc"]
    assert lo <= hi
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert list((tmp_path / "cmp" / "seed0" / "rmtl").glob("events.out.tfevents.*"))  # TensorBoard per arm
    assert "mean diff to ew" in res["table"]


@pytest.mark.parametrize("schema", ["retailrocket", "kuairand"])
def test_synthetic_dynamics_knob(tmp_path, schema, capsys):
    """s = 0: independent draws (no lag-1 correlation to speak of); s > 0: outcomes cluster in sessions."""
    from rmtl.data import sources
    from rmtl.data.session_dynamics import raw_summary

    lag = {}
    for s in (0.0, 1.5):
        out = tmp_path / f"{schema}{s}"
        sizes = {"users": 800, "items": 300} if schema == "retailrocket" else {"users": 150, "items": 300}
        assert main(["synth", "--schema", schema, "--out", str(out), "--dynamics", str(s),
                     "--users", str(sizes["users"]), "--items", str(sizes["items"])]) == 0
        assert "lag-1 correlation" in capsys.readouterr().out
        lag[s] = raw_summary(sources.reader(schema)(out))["lag1"]
    assert abs(lag[0.0]) < 0.1 and lag[1.5] > lag[0.0] + 0.1, lag
