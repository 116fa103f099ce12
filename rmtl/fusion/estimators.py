"""The offline value estimators of a fusion run, by name (config ``ope.estimators``, ``ope.default``).

| name     | what (docs/fusion.md "Evaluation")                                                   | interval |
|----------|--------------------------------------------------------------------------------------|----------|
| dr       | weighted per-decision doubly robust on slates: logged slate propensities + slate FQE | bootstrap |
| wpdis    | weighted per-decision importance sampling on slates (no critic)                      | bootstrap |
| sfqe     | FQE whose action input is the slate alpha shows                                      | -        |
| fqe      | FQE on alpha itself                                                                  | -        |
| fqe_cql  | FQE on alpha with the CQL penalty ``fqe.cql_alpha``: a lower bound, not a value      | -        |

Bootstrap intervals resample the held-out episodes (``ope.resamples`` times, the same resamples for
every policy, so differences are paired) with the critic held fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from rmtl.fusion.data import FusionDataset
from rmtl.fusion.fqe import ConservativeFQE
from rmtl.fusion.ope import dr_with_bootstrap
from rmtl.fusion.slates import SlateSpec


@dataclass(frozen=True)
class Estimator:
    label: str
    critic: str | None  # the critic it needs (a key of CRITICS), None for none
    importance: bool = False  # uses the logged slate propensities (bootstrap interval)


ESTIMATORS = {
    "dr": Estimator("DR (slate IS + slate FQE)", "sfqe", importance=True),
    "wpdis": Estimator("WPDIS (slate IS)", None, importance=True),
    "sfqe": Estimator("slate FQE", "sfqe"),
    "fqe": Estimator("FQE on alpha", "fqe"),
    "fqe_cql": Estimator("FQE-CQL lower bound", "fqe_cql"),
}
CRITICS = ("sfqe", "fqe", "fqe_cql")  # fit in this order; file RUN_DIR/fqe/<policy>_<critic>.pt


def labels(names: list[str], default: str) -> dict[str, str]:
    return {n: ESTIMATORS[n].label + (" [default]" if n == default else "") for n in names}


def critics_for(names: list[str]) -> list[str]:
    need = {ESTIMATORS[n].critic for n in names} - {None}
    return [c for c in CRITICS if c in need]


def make_critic(kind: str, held: FusionDataset, spec: SlateSpec, fqe_cfg, seed: int) -> ConservativeFQE:
    return ConservativeFQE(held.obs.shape[1], held.action.shape[1], gamma=fqe_cfg.gamma,
                           cql_alpha=fqe_cfg.cql_alpha if kind == "fqe_cql" else 0.0, hidden=fqe_cfg.hidden,
                           lr=fqe_cfg.lr, tau=fqe_cfg.tau, seed=seed,
                           slate=spec.to_dict() if kind == "sfqe" else None)


def estimate_all(names: list[str], held: FusionDataset, act: Callable, spec: SlateSpec, gamma: float,
                 critics: dict[str, ConservativeFQE], counts: np.ndarray) -> tuple[dict, dict]:
    """({name: estimate}, {name: bootstrap estimates [B]} for the importance-sampling ones) of one policy."""
    values, samples = {}, {}
    for n in names:
        est = ESTIMATORS[n]
        critic = critics.get(est.critic) if est.critic else None
        if est.importance:
            values[n], samples[n] = dr_with_bootstrap(held, act, spec, gamma, critic, counts)
        else:
            values[n] = critic.estimate(held, act)
    return values, samples
