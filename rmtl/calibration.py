"""Calibration of predicted probabilities: how far the mean prediction sits from the label
rate, and what the logloss would be after Platt scaling fitted on another split.

Loss weights that correlate with labels shift calibration before they move ranking, so a
weighting method is judged on both (DESIGN.md, "Evaluation protocol").
"""

from __future__ import annotations

import numpy as np

from rmtl.metrics import EPS, logloss


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def platt_fit(y, p, iters: int = 50) -> tuple[float, float]:
    """(a, b) of sigmoid(a * logit(p) + b) fitted to labels y by Newton's method (maximum likelihood)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    x = _logit(p).reshape(-1)
    if len(y) == 0 or y.min() == y.max():
        return 1.0, 0.0  # nothing to fit against
    a, b = 1.0, 0.0
    for _ in range(iters):
        q = 1.0 / (1.0 + np.exp(-(a * x + b)))
        r = q - y
        w = np.maximum(q * (1.0 - q), 1e-12)
        g = np.array([np.dot(r, x), r.sum()])
        h = np.array([[np.dot(w * x, x), np.dot(w, x)], [np.dot(w, x), w.sum()]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(a), float(b)


def platt_apply(p, a: float, b: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(a * _logit(p) + b)))


def calibration_metrics(val_y, val_p, test_y, test_p) -> dict[str, float]:
    """{calibration: mean test prediction / test label rate, platt_logloss: test logloss after
    Platt scaling fitted on val} for one task."""
    test_y = np.asarray(test_y, dtype=np.float64).reshape(-1)
    test_p = np.asarray(test_p, dtype=np.float64).reshape(-1)
    rate = test_y.mean() if len(test_y) else float("nan")
    a, b = platt_fit(val_y, val_p)
    return {"calibration": float(test_p.mean() / rate) if rate > 0 else float("nan"),
            "platt_logloss": logloss(test_y, platt_apply(test_p, a, b))}
