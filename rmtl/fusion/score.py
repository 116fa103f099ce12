"""Score a saved fusion policy on new logged sessions, without retraining (``rmtl fusion score``).

The run directory gives the policy (RUN_DIR/policies/<policy>.pt), its slate critic
(RUN_DIR/fqe/<policy>_sfqe.pt) and the world's slate rule and discount (RUN_DIR/config.yaml); the
sessions are a FusionDataset .npz logged by a behaviour policy with its candidates and slate
propensities (as ``rmtl fusion`` writes logged_heldout.npz). The result is the DR value with its
bootstrap interval, WPDIS, the slate critic's own estimate, and how often the policy would show
the logged slate (its support in the new data).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rmtl.errors import DataError
from rmtl.fusion.data import FusionDataset


def score_sessions(run_dir: str | os.PathLike, policy: str, sessions: str | os.PathLike, *,
                   resamples: int | None = None, seed: int = 0) -> dict:
    from rmtl.fusion.config import load_fusion_config
    from rmtl.fusion.fqe import ConservativeFQE
    from rmtl.fusion.ope import bootstrap_counts, dr_with_bootstrap, slate_ratios
    from rmtl.fusion.policies import load_policy
    from rmtl.fusion.slates import SlateSpec

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise DataError("not a fusion run directory (no config.yaml)", path=run)
    cfg = load_fusion_config(run / "config.yaml")
    policy_file = run / "policies" / f"{policy}.pt"
    if not policy_file.is_file():
        known = sorted(p.stem for p in (run / "policies").glob("*.pt"))
        raise DataError(f"no saved policy '{policy}' in this run; saved: {', '.join(known) or 'none'}", path=run)
    act = load_policy(policy_file)
    data = FusionDataset.load(sessions)
    critic_file = run / "fqe" / f"{policy}_sfqe.pt"
    critic = ConservativeFQE.load(critic_file) if critic_file.is_file() else None
    if critic is not None and data.obs.shape[1] != critic._config["obs_dim"]:
        raise DataError(f"observations have {data.obs.shape[1]} features, the run's critics expect "
                        f"{critic._config['obs_dim']}", path=sessions, column="obs")
    missing = [k for k in ("cand_o", "cand_mask", "propensity") if getattr(data, k) is None]
    if missing:
        raise DataError(f"scoring needs the logged candidates and slate propensities: missing {', '.join(missing)}",
                        path=sessions, column=missing[0])
    if data.cand_o.shape[-1] != data.action.shape[1]:
        raise DataError(f"cand_o has {data.cand_o.shape[-1]} tasks, actions {data.action.shape[1]}", path=sessions,
                        column="cand_o")
    spec = SlateSpec.of(cfg.env)
    import torch

    torch.manual_seed(seed)  # BCQ samples its proposals: the same seed, the same score
    counts = bootstrap_counts(data, resamples or cfg.ope.resamples, seed)
    dr, dr_boot = dr_with_bootstrap(data, act, spec, cfg.fqe.gamma, critic, counts)
    wpdis, wpdis_boot = dr_with_bootstrap(data, act, spec, cfg.fqe.gamma, None, counts)
    out = {"policy": policy, "decisions": len(data), "sessions": int(len(np.unique(data.episode))),
           "dr" if critic is not None else "wpdis_only": dr, "dr_se": float(np.std(dr_boot, ddof=1)),
           "wpdis": wpdis, "wpdis_se": float(np.std(wpdis_boot, ddof=1)),
           "same_slate_share": float((slate_ratios(data, act, spec) > 0).mean()),
           "mean_alpha": np.asarray(act(data.initial_obs), np.float64).mean(0).round(4).tolist()}
    if critic is not None:
        out["sfqe"] = critic.estimate(data, act)
    return out


def format_score(res: dict) -> str:
    lines = [f"policy {res['policy']} on {res['sessions']} sessions ({res['decisions']} logged decisions):"]
    if "dr" in res:
        lines.append(f"  DR value (default)  {res['dr']:.3f} +- {2 * res['dr_se']:.3f} (2 s.e., bootstrap over sessions)")
        lines.append(f"  slate FQE           {res['sfqe']:.3f}")
    else:
        lines.append("  (no slate critic in the run: WPDIS only)")
    lines.append(f"  WPDIS               {res['wpdis']:.3f} +- {2 * res['wpdis_se']:.3f}")
    lines.append(f"  shows the logged slate on {res['same_slate_share']:.0%} of the requests")
    return "\n".join(lines)
