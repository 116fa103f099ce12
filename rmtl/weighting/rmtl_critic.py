"""RMTL: per-sample, per-task loss weights from the agent's critics.

    w_{i,k} = 1 - lam * Q_k(s_i, sigmoid(logit_{i,k}))      (detached; >= 1 because Q <= 0)
    loss    = mean_k mean_i w_{i,k} * BCE_{i,k}

A prediction the critic expects to cost much over the rest of its session (very
negative Q) gets a larger weight. The critics are frozen here; they were trained by the
agent stage (rmtl.agents.rmtl_agent.RMTLAgent, ``rmtl agent`` / ``rmtl pipeline``).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from rmtl.errors import ConfigError
from rmtl.weighting.base import Strategy

TWINS = ("min", "mean", "first")


class RMTLStrategy(Strategy):
    name = "rmtl"

    def __init__(self, num_tasks: int, agent=None, checkpoint: str | os.PathLike | None = None, lam: float = 0.7,
                 twin: str = "min"):
        super().__init__(int(num_tasks))
        try:
            lam = float(lam)
        except (TypeError, ValueError):
            raise ConfigError(f"expected a number >= 0, got {lam!r}", key="strategy.options.lam") from None
        if not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"expected a number >= 0, got {lam!r}", key="strategy.options.lam")
        if twin not in TWINS:
            raise ConfigError(f"expected one of {', '.join(TWINS)}, got {twin!r}", key="strategy.options.twin")
        if agent is None:
            if checkpoint is None:
                raise ConfigError("the rmtl strategy needs trained critics: give strategy.options.checkpoint "
                                  "(the agent file written by `rmtl agent` / `rmtl pipeline`) or pass agent=",
                                  key="strategy.options.checkpoint")
            from rmtl.agents.rmtl_agent import RMTLAgent

            agent = RMTLAgent.load(checkpoint)
        if agent.spec.num_tasks != self.num_tasks:
            raise ConfigError(f"the agent's critics cover {agent.spec.num_tasks} tasks, the model {self.num_tasks}",
                              key="strategy.options.checkpoint")
        agent.critic.requires_grad_(False)
        # kept outside the module tree on purpose: the critics are frozen, so they must not
        # join the training loop's optimizer (which also holds strategy.parameters())
        self.__dict__["agent"] = agent
        self.lam = lam
        self.twin = twin
        self.tasks = list(agent.spec.tasks)

    def _check_features(self, model: nn.Module) -> None:
        """The critics index the same vocabularies as the model: a log prepared differently would not fit."""
        spec = getattr(model, "spec", None)
        if spec is None or getattr(self, "_checked", False):
            return
        mine = self.agent.spec
        if list(spec.cardinalities) != list(mine.cardinalities) or spec.num_dense != mine.num_dense:
            raise ConfigError("the critics were trained on a different feature layout (sparse cardinalities "
                              f"{list(mine.cardinalities)}, {mine.num_dense} dense) than the model's "
                              f"({list(spec.cardinalities)}, {spec.num_dense} dense); retrain them on this data",
                              key="strategy.options.checkpoint")
        self._checked = True

    def weights(self, sparse: torch.Tensor, dense: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[B, K] weights of a batch, detached, finite and >= 1."""
        probs = torch.sigmoid(logits.detach().float())
        q = self.agent.q_values(sparse, dense, probs, twin=self.twin).to(logits.device)
        self._last_q = q
        w = 1.0 - self.lam * q
        return torch.nan_to_num(w, nan=1.0, posinf=1.0, neginf=1.0).clamp_min(1.0)

    def backward(self, losses: torch.Tensor, model: nn.Module, *, shared: torch.Tensor | None = None,
                 context: dict | None = None) -> torch.Tensor:
        context = context or {}
        batch, logits = context.get("batch"), context.get("logits")
        if batch is None or logits is None:
            raise ValueError("the rmtl strategy needs context['batch'] (features) and context['logits'] (predictions)")
        self._check_features(model)
        w = self.weights(batch.sparse, batch.dense, logits).to(losses.dtype)
        loss = (losses * w).mean(dim=0).mean()
        loss.backward()
        q = self._last_q
        self._logs = {}
        for k, task in enumerate(self.tasks):
            self._logs[f"rmtl/q_mean/{task}"] = float(q[:, k].mean())
            self._logs[f"rmtl/weight_max/{task}"] = float(w[:, k].max())
        return w.detach()
