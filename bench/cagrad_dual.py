"""Accuracy of CAGrad's dual solvers: the share of the achievable decrease of the dual
objective (from the uniform start to the best point found) that each solver misses.

Plain script, prints figures:  python bench/cagrad_dual.py
0 = as good as the best of 20,000 random simplex points; negative = better than them.
"""

from __future__ import annotations

import numpy as np

from rmtl.weighting.cagrad import cagrad_weights


def missed_share(solver: str, steps: int, trials: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials):
        k = int(rng.integers(2, 5))
        g = rng.normal(size=(k, 6)) * rng.uniform(0.01, 1.0, size=(k, 1)) ** rng.uniform(0, 1)  # norms spread up to 100x
        c, g0 = rng.uniform(0.1, 1.0), g.mean(0)

        def dual(w):
            gw = w @ g
            return gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw, axis=-1)

        w_eff = cagrad_weights(g @ g.T, c, rescale=0, solver=solver, steps=steps)
        w = (w_eff - 1 / k) / (w_eff - 1 / k).sum()
        search = min(dual(rng.dirichlet(np.full(k, 0.5), size=20000)).min(), dual(np.eye(k)).min())
        start = dual(np.full(k, 1 / k))
        out.append((dual(w) - search) / max(start - search, 1e-12))
    return np.array(out)


if __name__ == "__main__":
    print(f"{'solver':<10} {'steps':>5} {'median':>10} {'90th pct':>10} {'worst':>10}")
    for solver, steps in (("paper", 20), ("paper", 500), ("projected", 20), ("projected", 100)):
        m = missed_share(solver, steps)
        print(f"{solver:<10} {steps:>5} {np.median(m):>10.2e} {np.percentile(m, 90):>10.2e} {m.max():>10.2e}")
