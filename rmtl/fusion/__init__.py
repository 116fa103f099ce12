"""BatchRL-MTF in one room: multi-task score fusion learned by batch RL.

- functions.py   fusion functions (log_sum, product, weighted_sum) and ranking
- user_model.py  user-response model (the simulator's responder and default ranker)
- backbone_ranker.py  a fitted rmtl backbone as the ranker
- simulator.py   batched session simulator + FusionEnvConfig (the world's tasks and rewards)
- env.py         FusionEnv, the Gymnasium view and the embedded default world
                 (``import rmtl.envs`` registers its id rmtl/Fusion-v0)
- data.py        logged fusion decisions (FusionDataset), behaviour policy, rollouts
- bcq.py, fqe.py BCQ (offline policy) and fitted-Q evaluation
- baselines.py   CEM search and SB3 TD3
- config.py, pipeline.py  `rmtl fusion`: its config and the end-to-end run

The fusion functions are importable from here (``rmtl.fusion.fuse``); other names
load lazily so ``import rmtl.fusion`` stays light.
"""

from importlib import import_module

from rmtl.fusion.functions import (DEFAULT_BETA, FUSIONS, fuse, fuse_and_rank, get_fusion, log_sum, product,
                                   rank_candidates, weighted_sum)

_LAZY = {
    "FusionEnv": "rmtl.fusion.env",
    "FusionSimulator": "rmtl.fusion.simulator",
    "FusionEnvConfig": "rmtl.fusion.simulator",
    "UserResponseModel": "rmtl.fusion.user_model",
    "FusionDataset": "rmtl.fusion.data",
    "BCQ": "rmtl.fusion.bcq",
    "ConservativeFQE": "rmtl.fusion.fqe",
    "FusionConfig": "rmtl.fusion.config",
    "load_fusion_config": "rmtl.fusion.config",
    "run_fusion": "rmtl.fusion.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rmtl.fusion' has no attribute '{name}'")


__all__ = ["DEFAULT_BETA", "FUSIONS", "fuse", "fuse_and_rank", "get_fusion", "log_sum", "product",
           "rank_candidates", "weighted_sum", *sorted(_LAZY)]
