"""Evaluation metrics for multi-task CTR-style predictions, vectorised in numpy.

Every metric takes labels in {0, 1} and predicted probabilities. AUC and GAUC are
rank based with tied scores given their average rank (equal to sklearn's
``roc_auc_score``); a metric that is undefined (only one class present) is NaN.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before taking logs

# metric -> +1 when larger is better, -1 when smaller is better (used by mtl_gain)
METRIC_DIRECTION = {"auc": 1.0, "gauc": 1.0, "logloss": -1.0, "session_logloss": -1.0}
METRICS = ("auc", "logloss", "session_logloss", "gauc")


def _as_1d(x, name: str, dtype=np.float64) -> np.ndarray:
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def _group_average_ranks(keys_sorted_change: np.ndarray) -> np.ndarray:
    """1-based average rank of each sorted position, where a tie group starts at every True
    of ``keys_sorted_change`` (position 0 must be True)."""
    n = len(keys_sorted_change)
    starts = np.flatnonzero(keys_sorted_change)
    ends = np.append(starts[1:], n)
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
    return np.repeat(avg, ends - starts)


def auc(y, p) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties averaged); NaN if a class is absent."""
    y = _as_1d(y, "y")
    p = _as_1d(p, "p")
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    change = np.ones(len(ps), dtype=bool)
    change[1:] = ps[1:] != ps[:-1]
    ranks = _group_average_ranks(change)
    rank_sum = float(ranks[y[order] > 0.5].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _bce(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1.0 - EPS)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def logloss(y, p) -> float:
    """Mean binary cross-entropy over rows."""
    y = _as_1d(y, "y")
    p = _as_1d(p, "p")
    if len(y) == 0:
        return float("nan")
    return float(_bce(y, p).mean())


def session_logloss(y, p, session) -> float:
    """BCE averaged within each session, then averaged over sessions (each session counts once)."""
    y = _as_1d(y, "y")
    p = _as_1d(p, "p")
    if len(y) == 0:
        return float("nan")
    _, sid = np.unique(np.asarray(session).reshape(-1), return_inverse=True)
    counts = np.bincount(sid)
    sums = np.bincount(sid, weights=_bce(y, p))
    return float((sums / counts).mean())


def gauc(y, p, user) -> float:
    """Per-user AUC weighted by the user's number of impressions, over users having both classes.

    One lexsort by (user, score) and a few bincounts: no Python loop over users.
    """
    y = _as_1d(y, "y")
    p = _as_1d(p, "p")
    _, uid = np.unique(np.asarray(user).reshape(-1), return_inverse=True)
    uid = uid.reshape(-1)
    if len(y) == 0:
        return float("nan")
    order = np.lexsort((p, uid))
    us, ps, ys = uid[order], p[order], y[order]
    new_user = np.ones(len(us), dtype=bool)
    new_user[1:] = us[1:] != us[:-1]
    tie_start = new_user.copy()
    tie_start[1:] |= ps[1:] != ps[:-1]
    global_rank = _group_average_ranks(tie_start)  # average 1-based rank over the whole array
    user_start = np.flatnonzero(new_user)  # sorted position where each user begins
    first_pos = np.repeat(user_start, np.diff(np.append(user_start, len(us))))
    rank_in_user = global_rank - first_pos  # 1-based rank within the user's rows
    n_users = int(us[-1]) + 1 if len(us) else 0
    count = np.bincount(us, minlength=n_users).astype(np.float64)
    n_pos = np.bincount(us, weights=ys, minlength=n_users)
    n_neg = count - n_pos
    rank_pos = np.bincount(us, weights=rank_in_user * ys, minlength=n_users)
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        return float("nan")
    auc_u = (rank_pos[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0) / (n_pos[valid] * n_neg[valid])
    w = count[valid]
    return float((auc_u * w).sum() / w.sum())


def evaluate_predictions(labels, probs, session, user, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """{task: {auc, logloss, session_logloss, gauc}} for labels / probs of shape [N, K]."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    if probs.ndim == 1:
        probs = probs[:, None]
    if labels.shape != probs.shape or labels.shape[1] != len(tasks):
        raise ValueError(f"labels {labels.shape} and probs {probs.shape} must both be [N, {len(tasks)}]")
    out: dict[str, dict[str, float]] = {}
    for k, task in enumerate(tasks):  # loop over tasks (a handful), never over rows
        y, p = labels[:, k], probs[:, k]
        out[task] = {
            "auc": auc(y, p),
            "logloss": logloss(y, p),
            "session_logloss": session_logloss(y, p, session),
            "gauc": gauc(y, p, user),
        }
    return out


def mean_metric(metrics: Mapping[str, Mapping[str, float]], name: str = "auc") -> float:
    """Mean of one metric over tasks, ignoring NaN (NaN if every task is NaN)."""
    values = [float(m[name]) for m in metrics.values() if name in m and not math.isnan(float(m[name]))]
    return float(np.mean(values)) if values else float("nan")


def mtl_gain(metrics: Mapping[str, Mapping[str, float]],
             baseline_metrics: Mapping[str, Mapping[str, float]]) -> dict:
    """Relative improvement of a multi-task run over a (single-task) baseline.

    For each task and metric present in both: ``sign * (m - b) / |b|`` with sign +1 for
    AUC/GAUC and -1 for the log losses, so positive always means better. Returns
    ``{"per_task": {task: {metric: gain}}, "mean": mean over every entry}``.
    """
    per_task: dict[str, dict[str, float]] = {}
    values = []
    for task, mets in metrics.items():
        base = baseline_metrics.get(task)
        if base is None:
            continue
        gains = {}
        for name, sign in METRIC_DIRECTION.items():
            if name in mets and name in base:
                m, b = float(mets[name]), float(base[name])
                if math.isnan(m) or math.isnan(b) or b == 0:
                    continue
                gains[name] = sign * (m - b) / abs(b)
                values.append(gains[name])
        per_task[task] = gains
    return {"per_task": per_task, "mean": float(np.mean(values)) if values else float("nan")}
