"""Do the critics' weights know the labels of the rows they weight? Cross-fitted vs not.

    python bench/rmtl_leakage.py                       # quickstart data, MMoE pretrained 2 epochs
    python bench/rmtl_leakage.py --config kuairand --steps 2000

Pretrains one EW backbone, then trains the agent twice on its train predictions: with
cross-fitting (the default) and without (one critic set on every train row). For each it
prints, per task, corr(w, label) on the train rows as the fine-tuning loop weights them
(out-of-fold for the cross-fitted critics) and on the test rows, and the mean weight of
positives and negatives on train. A gap between the train and test correlations is the
memorisation that leaks into fine-tuning.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch


def weights_of(agent, log, probs) -> np.ndarray:
    from rmtl.weighting.rmtl_critic import RMTLStrategy

    strategy = RMTLStrategy(log.spec.num_tasks, agent=agent)
    strategy.bind_log(log)
    out = []
    for lo in range(0, log.num_rows, 8192):
        rows = torch.arange(lo, min(lo + 8192, log.num_rows))
        out.append(strategy.weights(torch.from_numpy(log.sparse[lo:lo + 8192]), torch.from_numpy(log.dense[lo:lo + 8192]),
                                    torch.logit(torch.from_numpy(probs[lo:lo + 8192]).clamp(1e-6, 1 - 1e-6)), rows=rows))
    return torch.cat(out).numpy()


def test_weights(agent, log, probs) -> np.ndarray:
    """Rows no critic saw: the mean over the sets (fold = None)."""
    ctx = agent.context_of(log)
    ctx = None if ctx is None else torch.from_numpy(ctx)
    return agent.loss_weights(torch.from_numpy(log.sparse), torch.from_numpy(log.dense), torch.from_numpy(probs),
                              context=ctx).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="quickstart")
    p.add_argument("--steps", type=int, default=None, help="critic updates (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from rmtl.config import StrategyConfig, load_config
    from rmtl.pipeline import train_agent
    from rmtl.predict import predict
    from rmtl.train import fit, load_data

    cfg = load_config(args.config, args.overrides + ["train.progress=false", f"seed={args.seed}"])
    if args.steps:
        cfg = replace(cfg, agent=replace(cfg.agent, steps=args.steps))
    prepared = load_data(cfg.data, cfg.seed)
    log = prepared.log if hasattr(prepared, "log") else prepared
    import tempfile

    root = tempfile.mkdtemp(prefix="rmtl-leak-")
    pre = fit(replace(cfg, strategy=StrategyConfig(name="ew")), prepared=log, run_dir=root, tag="pretrain")
    train, test = log.split("train"), log.split("test")
    p_train, p_test = predict(pre.model, train), predict(pre.model, test)
    print(f"{args.config}: {train.num_rows:,} train rows, {test.num_rows:,} test rows, {cfg.agent.steps} critic updates")
    for cross_fit in (False, True):
        c = replace(cfg, agent=replace(cfg.agent, cross_fit=cross_fit))
        stage = train_agent(c, log, pre.model, run_dir=root, out_path=f"{root}/agent-{cross_fit}/agent.pt")
        w_tr, w_te = weights_of(stage.agent, train, p_train), test_weights(stage.agent, test, p_test)
        for k, task in enumerate(log.spec.tasks):
            y_tr, y_te = train.labels[:, k], test.labels[:, k]
            print(f"  cross_fit={str(cross_fit):5s} {task:6s} corr(w, y) train {np.corrcoef(w_tr[:, k], y_tr)[0, 1]:+.3f}"
                  f"  test {np.corrcoef(w_te[:, k], y_te)[0, 1]:+.3f}   mean w train: positives "
                  f"{w_tr[y_tr > 0.5, k].mean():.3f}, negatives {w_tr[y_tr < 0.5, k].mean():.3f}")


if __name__ == "__main__":
    main()
