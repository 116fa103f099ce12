"""Off-policy estimators against truths known in closed form (rmtl.fusion.slates, rmtl.fusion.ope)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from rmtl.errors import DataError
from rmtl.fusion.data import FusionDataset, constant_policy
from rmtl.fusion.ope import (bootstrap_counts, bootstrap_weights, doubly_robust, dr_terms, episode_grid, slate_ratios,
                             verdicts, weight_support, weighted_dr_many)
from rmtl.fusion.functions import fuse_and_rank
from rmtl.fusion.slates import SlateSpec, shown, slate_propensity

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SPEC = SlateSpec(window=2, top=1)
NOISE, DEFAULT = 0.5, np.array([0.2, 0.6])
# Two request types, two candidates each, two tasks. Type A: item 0 is strong on task 0 and item 1 on
# task 1, so item 0 is shown iff alpha_0 > alpha_1. Type B: both items tie on task 1, so item 0 is
# shown iff alpha_0 > 0. Under the behaviour (DEFAULT + N(0, NOISE^2)) these have different, known
# probabilities, which is what makes a wrong propensity bias the estimate.
CAND = {0: np.array([[0.9, 0.1], [0.1, 0.9]], np.float32), 1: np.array([[0.9, 0.5], [0.1, 0.5]], np.float32)}
P_ITEM0 = {0: norm.cdf((DEFAULT[0] - DEFAULT[1]) / (NOISE * np.sqrt(2))), 1: norm.cdf(DEFAULT[0] / NOISE)}
REWARD = {0: 1.0, 1: 3.0}  # reward of showing item 0 (item 1 gives 0)
GAMMA, HORIZON = 0.9, 3


def _chain(episodes: int = 2000, seed: int = 0) -> FusionDataset:
    """Episodes of HORIZON requests: the first request's type is random; showing item 0 leads to a type B
    request, item 1 to type A (actions change the future, so per-decision weights must accumulate)."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, episodes)
    rows = {k: [] for k in ("obs", "action", "reward", "next_obs", "done", "first", "episode", "kind")}
    for t in range(HORIZON):  # steps, not samples: each step is one vectorised batch over episodes
        alpha = np.clip(DEFAULT + NOISE * rng.standard_normal((episodes, 2)), -1, 1).astype(np.float32)
        item0 = np.where(kind == 0, alpha[:, 0] > alpha[:, 1], alpha[:, 0] > 0)
        nxt = np.where(item0, 1, 0)
        eye = np.eye(2 * HORIZON + 2, dtype=np.float32)
        rows["obs"].append(eye[2 * t + kind])
        rows["next_obs"].append(eye[2 * (t + 1) + nxt])
        rows["action"].append(alpha)
        rows["reward"].append(np.where(item0, np.vectorize(REWARD.get)(kind), 0.0).astype(np.float32))
        rows["done"].append(np.full(episodes, t == HORIZON - 1))
        rows["first"].append(np.full(episodes, t == 0))
        rows["episode"].append(np.arange(episodes))
        rows["kind"].append(kind)
        kind = nxt
    cat = {k: np.concatenate(v) for k, v in rows.items()}
    n = len(cat["reward"])
    cand_o = np.stack([CAND[0], CAND[1]])[cat.pop("kind")]
    data = FusionDataset(**cat, user=np.zeros(n, np.int64), req_rows=np.full((n, 2), -1),
                         req_o=cand_o.copy(), cand_o=cand_o, cand_mask=np.ones((n, 2), bool))
    logged = shown(data.cand_o, data.cand_mask, data.action, SPEC)
    data.propensity = slate_propensity(data.cand_o, data.cand_mask, logged, DEFAULT, NOISE, -1, 1, SPEC,
                                       draws=1000, seed=1)
    return data


ALWAYS_ITEM0 = constant_policy([1.0, -1.0])  # item 0 in both types
# its value: random first type (mean reward 2), then type B (reward 3) at every later step
TRUTH = 2.0 + 3.0 * sum(GAMMA ** t for t in range(1, HORIZON))


def test_slate_propensity_matches_the_closed_form():
    data = _chain(episodes=400)
    logged = shown(data.cand_o, data.cand_mask, data.action, SPEC)[:, 0]
    kind = np.argmax(data.obs, 1) % 2
    exact = np.where(logged == 0, np.vectorize(P_ITEM0.get)(kind), 1 - np.vectorize(P_ITEM0.get)(kind))
    assert np.abs(data.propensity - exact).max() < 0.06  # Monte Carlo, 1000 draws: s.e. <= 0.016


@pytest.fixture(scope="module")
def chain() -> FusionDataset:
    return _chain()


def test_weighted_per_decision_is_recovers_a_known_value_and_breaks_with_wrong_weights(chain):
    data = chain
    wpdis = doubly_robust(data, ALWAYS_ITEM0, SPEC, GAMMA)
    assert abs(wpdis - TRUTH) < 0.1, (wpdis, TRUTH)  # the first request's term has s.e. ~0.03
    # the importance weights are what makes it right: a logger that forgot its propensities (all 1)
    # over-represents the requests where the behaviour already liked item 0 ...
    broken = FusionDataset(**{**data.__dict__, "propensity": np.ones(len(data))})
    assert abs(doubly_robust(broken, ALWAYS_ITEM0, SPEC, GAMMA) - TRUTH) > 0.3  # +0.39 in expectation
    # ... and non-cumulative weights (each step's own ratio) miss that acting changes the next request
    grid_ep, grid_t, _ = episode_grid(data)
    rho = slate_ratios(data, ALWAYS_ITEM0, SPEC)
    one_step = sum(GAMMA ** t * np.average(data.reward[grid_t == t], weights=rho[grid_t == t])
                   for t in range(HORIZON))
    assert abs(one_step - TRUTH) > 1.0  # -1.8 in expectation


class _ExactCritic:
    """Q and V of the target policy in the chain, in closed form (a perfect control variate)."""

    def q_values(self, data, policy=None):
        kind, t = np.argmax(data.obs, 1) % 2, np.argmax(data.obs, 1) // 2
        alpha = data.action if policy is None else policy(data.obs)
        item0 = shown(data.cand_o, data.cand_mask, alpha, SPEC)[:, 0] == 0
        rest = 3.0 * np.array([sum(GAMMA ** k for k in range(1, HORIZON - s)) for s in range(HORIZON)])[t]
        # after item 1 the next request is type A, where the target (item 0) earns 1 then 3s
        after_1 = np.array([sum(GAMMA ** k * (1.0 if k == 1 else 3.0) for k in range(1, HORIZON - s))
                            for s in range(HORIZON)])[t]
        return np.where(item0, np.vectorize(REWARD.get)(kind) + rest, after_1)


def test_doubly_robust_with_an_exact_critic_is_exact_and_a_biased_critic_is_corrected(chain):
    data = chain
    dr = doubly_robust(data, ALWAYS_ITEM0, SPEC, GAMMA, critic=_ExactCritic())
    assert dr == pytest.approx(TRUTH, rel=0.01)

    class Biased(_ExactCritic):
        def q_values(self, data, policy=None):
            return super().q_values(data, policy) + 2.0

    assert doubly_robust(data, ALWAYS_ITEM0, SPEC, GAMMA, critic=Biased()) == pytest.approx(TRUTH, rel=0.03)


def test_importance_weights_need_the_logged_propensities():
    data = _chain(episodes=10)
    data.propensity = None
    with pytest.raises(DataError, match="propensity"):
        slate_ratios(data, ALWAYS_ITEM0, SPEC)


def test_bootstrap_resamples_whole_episodes_and_verdicts_call_ties():
    data = _chain(episodes=50)
    w = bootstrap_weights(data, 4, seed=0)
    assert w.shape == (4, len(data)) and (w.sum(1) == len(data)).all()
    ep, _, _ = episode_grid(data)
    for m in range(4):  # every row of an episode carries that episode's count
        assert all(len(set(w[m][ep == e])) == 1 for e in range(5))
    v = verdicts({"a": np.array([1.0, 1.1, 0.9, 1.0]), "b": np.array([0.0, 0.1, -0.1, 0.05]),
                  "c": np.array([1.0, 0.2, 1.8, 0.9])})
    assert v[("a", "b")] == ">" and v[("a", "c")] == "~" and v[("b", "c")] in ("<", "~")


def test_slate_fqe_and_dr_with_it_recover_the_known_value(chain):
    from rmtl.fusion.fqe import ConservativeFQE

    import torch

    torch.manual_seed(0)
    critic = ConservativeFQE(chain.obs.shape[1], 2, gamma=GAMMA, cql_alpha=0.0, hidden=32, lr=3e-3, tau=0.05,
                             seed=0, slate=SPEC.to_dict())
    critic.fit(chain, ALWAYS_ITEM0, steps=800, batch_size=256)
    assert critic.estimate(chain, ALWAYS_ITEM0) == pytest.approx(TRUTH, rel=0.05)
    assert doubly_robust(chain, ALWAYS_ITEM0, SPEC, GAMMA, critic=critic) == pytest.approx(TRUTH, rel=0.02)
    # the same critic on alpha alone cannot tell the request types' slates apart by what they show
    with pytest.raises(Exception, match="estimate"):
        critic.value(chain.initial_obs, ALWAYS_ITEM0)


def test_resolution_orders_samples_of_the_truth_with_and_without_common_random_numbers():
    from rmtl.fusion.validation import resolution

    rng = np.random.default_rng(0)
    passes, sessions = 40, 50
    noise = rng.normal(size=passes * sessions)  # common random numbers: one draw per (pass, session)
    returns = {"a": noise + 0.05, "b": noise.copy(), "c": noise - 0.05}  # paired differences are exact
    out = resolution(returns, [("a", "b"), ("b", "c"), ("a", "c")], sessions=sessions, passes=2)
    assert out["samples"] == 20 and out["episodes"] == 100
    assert out["paired"] == {"spearman": 1.0, "pairs": 1.0, "all_pairs": 1.0}
    # without them a sample mean of 100 returns has s.e. 0.1: a gap of 0.05 is ordered right with
    # probability Phi(0.05 / 0.14) ~ 0.64 (0.76 for the gap of 0.1), all three pairs rarely
    ind = out["independent"]
    assert 0.45 < ind["pairs"] < 0.9 and ind["all_pairs"] < 0.6 and ind["spearman"] < 0.9
    # too few samples for the independent mode (one per policy needed), none at all for one sample
    assert "independent" not in resolution(returns, [("a", "b")], sessions=sessions, passes=20)
    assert "paired" not in resolution(returns, [("a", "b")], sessions=sessions, passes=40)


def test_gauc_resamples_are_the_gauc_of_the_resampled_users():
    from rmtl.fusion.fqe import gauc_mean, gauc_resampled, group_aucs, weighted_group_auc

    rng = np.random.default_rng(1)
    n = 600
    user = rng.integers(10, 30, n)  # user ids need not start at 0
    y = rng.random(n) < 0.3
    score, w = rng.normal(size=n) + y * rng.random(n), rng.random(n) + 0.5
    parts = group_aucs(y, score, user, w)
    assert gauc_mean(parts) == pytest.approx(weighted_group_auc(y, score, user, w))
    users = np.unique(user)
    drop, twice = users[3], users[5]
    counts = np.ones((2, len(users)))
    counts[1, 3], counts[1, 5] = 0, 2
    boot = gauc_resampled(parts, users, counts)
    assert boot[0] == pytest.approx(gauc_mean(parts))
    # a user drawn 0 times is left out, one drawn twice counts as its rows duplicated
    keep = user != drop
    dup = np.r_[np.flatnonzero(keep), np.flatnonzero(user == twice)]
    assert boot[1] == pytest.approx(weighted_group_auc(y[dup], score[dup], user[dup], w[dup]))
    assert abs(boot[1] - boot[0]) > 1e-4  # the resample is not the data


def test_user_bootstrap_is_paired_and_resamples_every_user_count():
    from rmtl.fusion.fqe import user_bootstrap

    data = _chain(episodes=20)
    data.user = data.episode % 7
    users, counts = user_bootstrap(data, 5, seed=3)
    assert list(users) == list(range(7)) and counts.shape == (5, 7) and (counts.sum(1) == 7).all()
    np.testing.assert_array_equal(counts, user_bootstrap(data, 5, seed=3)[1])


def test_capped_weights_clip_or_switch_and_stay_exact_with_an_exact_critic(chain):
    from rmtl.fusion.ope import capped, dr_terms, weighted_dr

    g = dr_terms(chain, ALWAYS_ITEM0, SPEC, GAMMA, _ExactCritic())
    w = np.cumprod(g["rho"], axis=1)
    cap = float(np.quantile(w[w > 0], 0.5))
    np.testing.assert_allclose(np.cumprod(capped(g, cap)["rho"], 1), np.minimum(w, cap))
    np.testing.assert_allclose(np.cumprod(capped(g, cap, "switch")["rho"], 1), np.where(w > cap, 0, w))
    assert weighted_dr(capped(g, w.max())) == pytest.approx(weighted_dr(g))  # a cap above every weight: no change
    for mode in ("clip", "switch"):  # the critic carries what the cap removes: still the truth
        assert weighted_dr(capped(g, cap, mode)) == pytest.approx(TRUTH, rel=0.01)
    # without a critic the cap is a bias: clipping the large weights under-weights the rare episodes
    # that follow the target (WPDIS); switching them off leaves steps with no weight at all
    wp = dr_terms(chain, ALWAYS_ITEM0, SPEC, GAMMA)
    assert weighted_dr(wp) == pytest.approx(TRUTH, abs=0.1)
    assert abs(weighted_dr(capped(wp, cap, "switch")) - TRUTH) > 0.5
    with pytest.raises(ValueError, match="clip or switch"):
        capped(g, cap, "trim")


def test_bootstrap_estimates_are_the_estimate_on_each_materialised_resample():
    """The resamples' DR values come from matrix products over episode counts; each must equal DR on a
    dataset that really holds every drawn episode as many times as it was drawn."""
    data = _chain(episodes=40, seed=3)

    class Biased(_ExactCritic):  # a critic with an error, so the control-variate terms matter
        def q_values(self, data, policy=None):
            return super().q_values(data, policy) + np.where(data.first, 1.5, -0.5)

    counts = bootstrap_counts(data, 4, seed=1)
    many = weighted_dr_many(dr_terms(data, ALWAYS_ITEM0, SPEC, GAMMA, Biased()), counts)
    ep, _, _ = episode_grid(data)
    for b, count in enumerate(counts):
        copies = [np.flatnonzero(ep == e) for e in range(len(count)) for _ in range(int(count[e]))]
        drawn = data.subset(np.concatenate(copies))
        drawn.episode = np.repeat(np.arange(len(copies)), [len(c) for c in copies])
        assert many[b] == pytest.approx(doubly_robust(drawn, ALWAYS_ITEM0, SPEC, GAMMA, critic=Biased()), abs=1e-9)
    assert np.ptp(many) > 0  # the resamples differ


@pytest.mark.parametrize("kind", ["log_sum", "weighted_sum", "product"])
def test_slate_propensity_counts_the_draws_whose_ranking_shows_the_logged_slate(kind):
    """Against ranking every draw with rank_candidates, with exact copies of a candidate (a popular video
    sampled twice: ties broken by candidate order) and padded candidates."""
    rng = np.random.default_rng(7)
    n, c, k, draws = 60, 6, 3, 64
    spec = SlateSpec(window=2, top=2, kind=kind)
    cand_o = rng.uniform(0.01, 0.99, (n, c, k)).astype(np.float32)
    cand_o[::2, 4] = cand_o[::2, 1]  # copies: they tie under every weighting
    cand_o[1::3, 5] = cand_o[1::3, 0]
    mask = np.ones((n, c), bool)
    mask[::5, 1] = False  # a padded logged slot
    default = np.array([0.4, 0.2, -0.3])
    behaviour = np.clip(default + 0.6 * rng.standard_normal((n, k)), -1, 1).astype(np.float32)
    logged = shown(cand_o, mask, behaviour, spec)
    draw = np.clip(default + 0.6 * np.random.default_rng(11).standard_normal((n, draws, k)), -1, 1)
    hits = sum((np.sort(fuse_and_rank(cand_o, draw[:, d].astype(np.float32), mask, kind=kind, top=2)[1], 1)
                == logged).all(1) for d in range(draws))  # draw by draw: a handful of draws
    expected = (1.0 + hits) / (1.0 + draws)
    for chunk in (n, 7):
        got = slate_propensity(cand_o, mask, logged, default, 0.6, -1, 1, spec, draws=draws, seed=11, chunk=chunk)
        np.testing.assert_array_equal(got, expected)
    assert (hits > 0).mean() > 0.5 and (hits < draws).any()  # neither all misses nor all hits


def test_bcq_acts_the_same_in_chunks_as_in_one_pass():
    import torch

    from rmtl.fusion.bcq import BCQ

    agent = BCQ(5, 3, hidden=16, seed=0)
    obs = np.random.default_rng(0).standard_normal((300, 5)).astype(np.float32)
    torch.manual_seed(1)
    whole = agent.act(obs)
    agent.ACT_CHUNK = 64  # 300 states: four full chunks and a short one
    torch.manual_seed(1)
    np.testing.assert_array_equal(agent.act(obs), whole)
    assert agent.act(obs[:0]).shape == (0, 3)


def test_weight_support_is_one_for_a_covered_policy_and_zero_where_the_log_never_shows_its_slates(chain):
    full = weight_support(chain, ALWAYS_ITEM0, SPEC, step=2)
    assert full["coverage"] == pytest.approx(1.0, abs=0.1) and 0.05 < full["effective"] < 1
    ep, step, _ = episode_grid(chain)
    first_item = shown(chain.cand_o, chain.cand_mask, chain.action, SPEC)[:, 0]
    never = np.isin(ep, ep[(step == 0) & (first_item == 1)])  # episodes that began by showing item 1
    none = weight_support(chain.subset(np.flatnonzero(never)), ALWAYS_ITEM0, SPEC, step=2)
    assert none["coverage"] == 0.0 and none["effective"] == 0.0
