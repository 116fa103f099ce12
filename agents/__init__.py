"""Agents of the RMTL session side: the multi-critic agent (rmtl_agent.py), its critics and
replay. The fusion learners (BCQ, FQE, CEM/TD3 baselines) live in rmtl.fusion.

Imports are lazy so that ``rmtl.config`` (which needs only ``rmtl.agents.config``) stays light.
"""

from importlib import import_module

_LAZY = {
    "AgentConfig": "rmtl.agents.config",
    "RMTLAgent": "rmtl.agents.rmtl_agent",
    "TwinTaskCritics": "rmtl.agents.critics",
    "RowReplay": "rmtl.agents.replay",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rmtl.agents' has no attribute '{name}'")


__all__ = sorted(_LAZY)
