"""Throughput of the batched fusion simulator and of BCQ / FQE updates (prints figures).

    python bench/fusion_sim.py [--users 200] [--items 400]

Timings are wall-clock on whatever else the machine is doing: treat them as rough.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from rmtl.fusion.bcq import BCQ
from rmtl.fusion.fqe import ConservativeFQE
from rmtl.fusion.data import behaviour_policy, collect, rollout
from rmtl.fusion.env import FusionEnv, default_simulator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sim = default_simulator(synthetic={"users": args.users, "items": args.items, "seed": 0}, cache_dir=args.cache_dir)
    k = sim.num_tasks
    act = behaviour_policy(np.zeros(k), 0.3, -1, 1)

    t = time.perf_counter()
    _, depth, _ = rollout(sim, act, sim.sessions)
    dt = time.perf_counter() - t
    steps = int(depth.sum())
    print(f"batched rollout: {len(sim.sessions)} sessions, {steps} requests in {dt:.3f} s "
          f"= {steps / dt:,.0f} requests/s")

    env = FusionEnv(sim)
    env.reset(seed=0)
    t, n = time.perf_counter(), 0
    while n < 2000:
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        n += 1
        if term or trunc:
            env.reset()
    dt = time.perf_counter() - t
    print(f"FusionEnv (one session at a time): {n / dt:,.0f} steps/s")

    data = collect(sim, act, sim.sessions, passes=3)
    for name, agent, fit in (
        ("BCQ", BCQ(sim.obs_dim, k, hidden=64), lambda a: a.fit(data, 200, 128)),
        ("FQE", ConservativeFQE(sim.obs_dim, k, hidden=64), lambda a: a.fit(data, lambda o: np.zeros((len(o), k)), 200, 256)),
    ):
        t = time.perf_counter()
        fit(agent)
        print(f"{name}: {200 / (time.perf_counter() - t):,.0f} updates/s (1 torch thread)")


if __name__ == "__main__":
    main()
