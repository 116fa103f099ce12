"""Environments of the RMTL session side: session replay (SessionEnv) and the vectorised
transition builder. The fusion env (BatchRL-MTF) lives in rmtl.fusion; its Gymnasium id is
registered here too by entry-point string, so ``gym.make("rmtl/Fusion-v0")`` works after
``import rmtl.envs`` without this package importing the fusion simulator."""

import gymnasium as _gym

from rmtl.envs.rewards import EPS, task_rewards
from rmtl.envs.session_env import SessionEnv
from rmtl.envs.transitions import Transitions, build_transitions

SESSION_ENV_ID = "rmtl/Session-v0"
FUSION_ENV_ID = "rmtl/Fusion-v0"
_ENTRY_POINTS = {SESSION_ENV_ID: "rmtl.envs.session_env:SessionEnv", FUSION_ENV_ID: "rmtl.fusion.env:FusionEnv"}

for _id, _entry in _ENTRY_POINTS.items():
    if _id not in _gym.registry:
        _gym.register(id=_id, entry_point=_entry)

__all__ = ["EPS", "FUSION_ENV_ID", "SESSION_ENV_ID", "SessionEnv", "Transitions", "build_transitions", "task_rewards"]
