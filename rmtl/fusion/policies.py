"""Saving and loading fusion policies (BCQ, TD3, constant weightings such as CEM's).

``save_policy(policy, path)`` writes one file holding only tensors, numbers, strings and
plain containers, so ``load_policy(path)`` reads it with torch's weights-only loader
(rmtl.checkpoint.load_user_file): a file a user names cannot run code. The loaded
object is a policy again, ``act(obs [B, S]) -> alpha [B, K]``, to evaluate or to score
new sessions without retraining:

    act = load_policy("runs/fusion-.../policies/bcq.pt")
    returns, depth, _ = rollout(simulator, act, sessions)

- constant (equal, behaviour, CEM): the weighting alpha [K];
- BCQ: VAE, perturbation net, critics (and their targets) and the observation statistics;
- TD3: SB3's deterministic actor (its ``mu`` MLP ending in tanh) and the action box;
  the loaded ``MLPActor`` gives the same actions as SB3's ``predict(deterministic=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rmtl.checkpoint import load_user_file, save_atomic
from rmtl.errors import DataError
from rmtl.fusion.bcq import BCQ
from rmtl.fusion.data import constant_policy

FORMAT = "rmtl-fusion-policy/1"


class MLPActor:
    """A deterministic actor: alpha = low + (tanh-MLP(obs) + 1) / 2 * (high - low)."""

    def __init__(self, net: nn.Sequential, low: np.ndarray, high: np.ndarray):
        self.net = net.eval()
        self.low = np.asarray(low, np.float32)
        self.high = np.asarray(high, np.float32)

    @classmethod
    def from_sb3(cls, model) -> "MLPActor":
        """The actor of a trained SB3 TD3 model (flatten features extractor, squashed output)."""
        policy = model.policy
        if not policy.squash_output:
            raise ValueError("expected a TD3 policy with squashed (tanh) output")
        import copy

        return cls(copy.deepcopy(policy.actor.mu).cpu(), model.action_space.low, model.action_space.high)

    def layer_sizes(self) -> list[int]:
        linear = [m for m in self.net if isinstance(m, nn.Linear)]
        return [linear[0].in_features] + [m.out_features for m in linear]

    @torch.no_grad()
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        scaled = self.net(torch.as_tensor(np.asarray(obs, np.float32))).numpy()
        return (self.low + 0.5 * (scaled + 1.0) * (self.high - self.low)).astype(np.float32)


def _mlp_like_sb3(sizes: list[int]) -> nn.Sequential:
    """Linear-ReLU-...-Linear-Tanh, the layout of SB3's create_mlp(squash_output=True)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        layers.append(nn.ReLU() if i < len(sizes) - 2 else nn.Tanh())
    return nn.Sequential(*layers)


def policy_state(policy) -> dict:
    """The plain-data state of a policy (what ``save_policy`` writes)."""
    if isinstance(policy, BCQ):
        return {"format": FORMAT, "kind": "bcq", "config": policy.config(),
                "state": {name: getattr(policy, name).state_dict() for name in BCQ.NETWORKS},
                "obs_mean": policy.obs_mean.cpu(), "obs_std": policy.obs_std.cpu()}
    if getattr(policy, "model", None) is not None and hasattr(policy.model, "actor"):  # train_td3's wrapper
        policy = MLPActor.from_sb3(policy.model)
    if isinstance(policy, MLPActor):
        return {"format": FORMAT, "kind": "mlp_actor", "sizes": policy.layer_sizes(),
                "state": policy.net.state_dict(), "low": torch.from_numpy(policy.low),
                "high": torch.from_numpy(policy.high)}
    alpha = getattr(policy, "alpha", None)
    if alpha is not None:  # constant_policy
        return {"format": FORMAT, "kind": "constant", "alpha": torch.from_numpy(np.asarray(alpha, np.float32))}
    raise TypeError(f"cannot save a policy of type {type(policy).__name__}: expected BCQ, a TD3 policy from "
                    "train_td3, an MLPActor or a constant_policy")


def save_policy(policy, path: str | os.PathLike) -> Path:
    """Write ``policy`` to ``path`` atomically (temporary file, then rename)."""
    return save_atomic(policy_state(policy), path)


def policy_from_state(state: dict, path: Path | None = None):
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"not a fusion policy file (format {FORMAT} expected)", path=path)
    kind = state.get("kind")
    if kind == "constant":
        return constant_policy(state["alpha"].numpy())
    if kind == "mlp_actor":
        net = _mlp_like_sb3([int(s) for s in state["sizes"]])
        net.load_state_dict(state["state"])
        return MLPActor(net, state["low"].numpy(), state["high"].numpy())
    if kind == "bcq":
        agent = BCQ(**state["config"])
        for name in BCQ.NETWORKS:
            getattr(agent, name).load_state_dict(state["state"][name])
        agent.obs_mean, agent.obs_std = state["obs_mean"].to(agent.device), state["obs_std"].to(agent.device)
        return agent
    raise DataError(f"unknown fusion policy kind '{kind}'", path=path)


def load_policy(path: str | os.PathLike):
    """A policy from ``save_policy`` (weights-only loading: nothing in the file runs)."""
    path = Path(path)
    return policy_from_state(load_user_file(path, "fusion policy file"), path)
