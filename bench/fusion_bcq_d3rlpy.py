"""Cross-check of rmtl's BCQ against d3rlpy's BCQ on the same logged fusion data.

    rmtl fusion --run-dir runs/mtf
    python bench/fusion_bcq_d3rlpy.py runs/mtf [--steps 1000]

Needs d3rlpy, which is in no extra: d3rlpy 2.8.1 pins gymnasium 1.0.0 (rmtl runs 1.4), so
run this in a separate environment, e.g.
    python -m venv --system-site-packages /tmp/d3 && /tmp/d3/bin/pip install d3rlpy
    /tmp/d3/bin/pip install --no-deps -e . && /tmp/d3/bin/python bench/fusion_bcq_d3rlpy.py runs/mtf

Rebuilds the run's world from its config.yaml (deterministic under its seed), loads the
run's saved BCQ (policies/bcq.pt) and its logged train data, trains d3rlpy's BCQ on that
data exported by rmtl.offline (same steps, batch size, gamma, tau, lambda), and prints the
true discounted value of both, and of the behaviour default, in the held-out simulator
(common random numbers, eval.truth_repeats passes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from rmtl.fusion.config import load_fusion_config
from rmtl.fusion.data import FusionDataset, constant_policy
from rmtl.fusion.pipeline import build_world
from rmtl.fusion.policies import load_policy
from rmtl.fusion.validation import true_value
from rmtl.offline import fusion_steps, to_d3rlpy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=None, help="d3rlpy BCQ updates (default: the run's bcq.steps)")
    args = ap.parse_args()
    import d3rlpy

    run = Path(args.run_dir)
    cfg = load_fusion_config(run / "config.yaml")
    torch.set_num_threads(int(cfg.num_threads or 1))
    torch.manual_seed(cfg.seed)
    world = build_world(cfg)
    logged = FusionDataset.load(run / "logged_train.npz")
    ours = load_policy(run / "policies" / "bcq.pt")

    steps = args.steps or cfg.bcq.steps
    algo = d3rlpy.algos.BCQConfig(batch_size=cfg.bcq.batch_size, gamma=cfg.bcq.gamma, tau=cfg.bcq.tau,
                                  lam=cfg.bcq.lmbda, n_action_samples=cfg.bcq.n_samples,
                                  observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
                                  action_scaler=d3rlpy.preprocessing.MinMaxActionScaler(
                                      minimum=np.full(len(world.tasks), cfg.env.action_low, np.float32),
                                      maximum=np.full(len(world.tasks), cfg.env.action_high, np.float32)),
                                  ).create(device="cpu")
    start = time.perf_counter()
    algo.fit(to_d3rlpy(fusion_steps(logged)), n_steps=steps, n_steps_per_epoch=steps, show_progress=False,
             save_interval=10 ** 9, logger_adapter=d3rlpy.logging.NoopAdapterFactory())
    fit_s = time.perf_counter() - start

    def theirs(obs: np.ndarray) -> np.ndarray:
        return np.asarray(algo.predict(np.asarray(obs, np.float32)), np.float32)

    policies = {"behaviour": constant_policy(world.default_alpha), "rmtl_bcq": ours, "d3rlpy_bcq": theirs}
    print(f"d3rlpy BCQ: {steps} updates in {fit_s:.1f} s; truth = discounted value (gamma {cfg.fqe.gamma}), "
          f"{cfg.eval.truth_repeats} passes over {len(world.test_sessions)} test sessions")
    values = {}
    for name, act in policies.items():
        values[name] = true_value(world.eval_sim, act, world.test_sessions, gamma=cfg.fqe.gamma,
                                  repeats=cfg.eval.truth_repeats, seed=cfg.seed + 3000)
        v = values[name]
        print(f"  {name:11s} {v.mean():.3f} +- {v.std() / np.sqrt(len(v)):.3f}")
    diff = values["rmtl_bcq"] - values["d3rlpy_bcq"]
    print(f"  rmtl - d3rlpy: {diff.mean():+.3f} +- {diff.std() / np.sqrt(len(diff)):.3f} (paired)")


if __name__ == "__main__":
    main()
