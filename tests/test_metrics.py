"""Metrics against sklearn on random data, and the definitions users rely on."""

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from rmtl.metrics import auc, evaluate_predictions, gauc, logloss, mtl_gain, session_logloss


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    n = 3000
    y = (rng.random(n) < 0.3).astype(np.float32)
    # rounded scores create many ties, which must get the average rank
    p = np.round(np.clip(0.3 + 0.2 * (y - 0.3) + 0.2 * rng.standard_normal(n), 0.01, 0.99), 2)
    user = rng.integers(0, 80, n)
    session = rng.integers(0, 300, n)
    return y, p, user, session


def test_auc_matches_sklearn_with_ties(data):
    y, p, _, _ = data
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auc_nan_when_one_class_absent():
    assert math.isnan(auc(np.zeros(5), np.linspace(0, 1, 5)))
    assert auc([0, 1], [0.2, 0.8]) == 1.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5


def test_logloss_matches_sklearn(data):
    y, p, _, _ = data
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)


def test_gauc_matches_per_user_sklearn(data):
    y, p, user, _ = data
    num = den = 0.0
    for u in np.unique(user):  # the slow reference definition
        m = user == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], p[m])
            den += m.sum()
    assert gauc(y, p, user) == pytest.approx(num / den, abs=1e-12)


def test_gauc_skips_single_class_users():
    y = np.array([1, 0, 1, 1, 0, 0])
    p = np.array([0.9, 0.1, 0.5, 0.6, 0.7, 0.2])
    user = np.array([0, 0, 1, 1, 2, 2])  # user 1 only positives, user 2 only negatives
    assert gauc(y, p, user) == 1.0


def test_session_logloss_weights_each_session_once(data):
    y, p, _, session = data
    ref = np.mean([log_loss(y[session == s], p[session == s], labels=[0, 1]) for s in np.unique(session)])
    assert session_logloss(y, p, session) == pytest.approx(ref, rel=1e-9)
    # one long bad session and one short good one: session logloss is their plain mean
    y2 = np.array([1, 1, 1, 1, 0])
    p2 = np.array([0.5, 0.5, 0.5, 0.5, 0.01])
    s2 = np.array([7, 7, 7, 7, 3])
    assert session_logloss(y2, p2, s2) == pytest.approx((np.log(2) - np.log(0.99)) / 2)


def test_evaluate_predictions_and_gain(data):
    y, p, user, session = data
    labels = np.stack([y, 1 - y], 1)
    probs = np.stack([p, 1 - p], 1)
    out = evaluate_predictions(labels, probs, session, user, ["a", "b"])
    assert set(out) == {"a", "b"}
    assert set(out["a"]) == {"auc", "logloss", "session_logloss", "gauc"}
    assert out["b"]["auc"] == pytest.approx(out["a"]["auc"])
    base = {"a": {"auc": 0.5, "logloss": 0.5}}
    gain = mtl_gain({"a": {"auc": 0.55, "logloss": 0.45}}, base)
    assert gain["per_task"]["a"]["auc"] == pytest.approx(0.1)
    assert gain["per_task"]["a"]["logloss"] == pytest.approx(0.1)  # lower loss = positive gain
    assert gain["mean"] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        evaluate_predictions(labels, probs[:, :1], session, user, ["a", "b"])
