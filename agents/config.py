"""Options of the RMTL agent stage (critics, TD3 machinery, optional actor update)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AgentConfig:
    gamma: float = 0.9
    tau: float = 0.005
    # (the agent helper fills in the rest)
