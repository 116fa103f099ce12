"""Environments: session replay (SessionEnv) and the vectorised transition builder."""

import gymnasium as _gym

from rmtl.envs.rewards import EPS, task_rewards
from rmtl.envs.session_env import SessionEnv
from rmtl.envs.transitions import Transitions, build_transitions

SESSION_ENV_ID = "rmtl/Session-v0"

if SESSION_ENV_ID not in _gym.registry:
    _gym.register(id=SESSION_ENV_ID, entry_point="rmtl.envs.session_env:SessionEnv")

from rmtl.envs.fusion_env import FusionEnv  # noqa: E402

FUSION_ENV_ID = "rmtl/Fusion-v0"
if FUSION_ENV_ID not in _gym.registry:
    _gym.register(id=FUSION_ENV_ID, entry_point="rmtl.envs.fusion_env:FusionEnv")

__all__ = ["EPS", "FUSION_ENV_ID", "FusionEnv", "SESSION_ENV_ID", "SessionEnv", "Transitions", "build_transitions", "task_rewards"]
