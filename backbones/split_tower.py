"""Split-MMoE: the split-tower architecture that DRGrad routes gradients on.

Every task k has TWO towers of identical shape:

- ``dedicated_towers[k]`` (T_k') reads the task's dedicated input v_k,
- ``shared_towers[k]``    (T_k'') reads the shared input v_s, which every task's T'' reads,

and its logit mixes them: ``T_k = mu_k' T_k'(v_k) + mu_k'' T_k''(v_s)``. ``mu`` is a
buffer [K, 2] (columns: dedicated, shared); the DRGrad updater rewrites it, everything
else leaves it at its initial value (``mu_init`` for the dedicated side).

How v_k and v_s come from MMoE-style experts:

- ``num_experts`` shared experts E_s read the embedded features x;
  ``dedicated_experts`` (default 0) more experts per task E_k read x as well.
- v_k = sum_e softmax(W_k x)_e * [E_s, E_k]_e   -- task k's own gate (plain MMoE when
  there are no dedicated experts, a CGC/PLE-like mix when there are);
- v_s = sum_e softmax(W_s x)_e * E_s_e          -- ONE extra gate over the shared experts,
  read by every shared tower; with the personalised gate on (PPNet-like),
  v_s <- 2 v_s * sigmoid(W_p [e_user, e_item, e_author]).

With DRGrad's routing off (any plain loss-level strategy, e.g. EW) this is the
"Split-MMoE" baseline.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rmtl.backbones import options as opt
from rmtl.backbones.base import MultiTaskBackbone
from rmtl.backbones.layers import MLP, Experts, FeatureEmbedding, cut_slices, mix_experts
from rmtl.data.spec import FeatureSpec
from rmtl.errors import ConfigError

_ID_ROLES = ("user_field", "item_field", "author_field")


class PersonalizedGate(nn.Module):
    """PPNet-like gate: x * 2 sigmoid(W [e_user, e_item, e_author]); starts at exactly 1.

    The id embeddings come from the backbone's own embedding table, so the gate and the
    rest of the model learn the same id representations.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        nn.init.zeros_(self.proj.weight)  # 2 * sigmoid(0) = 1: the gate starts as the identity
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x * (2.0 * torch.sigmoid(self.proj(ids)))


class SplitMMoE(MultiTaskBackbone):
    """Split-tower MMoE (see the module docstring). Options:

    embed_dim, dense_dim (width of the dense projection, default embed_dim), num_experts,
    expert_dims (expert MLP widths), tower_dims (hidden widths of every tower; each tower
    ends in one logit), dedicated_experts (per task, default 0), personalized_gate (True /
    False / "auto" = on when the spec names user, item or author fields), mu_init (initial
    mu' of every task; mu'' = 1 - mu'), dropout, activation.
    """

    def __init__(self, spec: FeatureSpec, *, embed_dim: int = 16, num_experts: int = 4,
                 expert_dims: Sequence[int] = (64,), tower_dims: Sequence[int] = (32,),
                 dedicated_experts: int = 0, personalized_gate: bool | str = "auto",
                 mu_init: float = 0.5, dropout: float = 0.0, activation: str = "relu",
                 dense_dim: int | None = None):
        super().__init__(spec)
        embed_dim, dropout, activation, dense_dim = opt.common(embed_dim, dropout, activation, dense_dim)
        num_experts = opt.positive_int("num_experts", num_experts)
        expert_dims = opt.dims("expert_dims", expert_dims)
        tower_dims = opt.dims("tower_dims", tower_dims, allow_empty=True)
        dedicated_experts = opt.positive_int("dedicated_experts", dedicated_experts, minimum=0)
        try:
            mu_init = float(mu_init)
        except (TypeError, ValueError):
            mu_init = -1.0
        if not 0.0 <= mu_init <= 1.0:
            raise ConfigError(f"expected a number in [0, 1], got {mu_init!r}", key="mu_init")
        if spec.num_tasks < 1:
            raise ConfigError("the feature spec names no tasks", key="tasks")

        self.features = FeatureEmbedding(spec, embed_dim, dense_dim)
        in_dim = self.features.output_dim
        self.num_shared_experts = num_experts
        self.num_dedicated_experts = int(dedicated_experts)
        self.shared_experts = Experts(num_experts, in_dim, expert_dims, dropout=dropout, activation=activation)
        self.shared_gate = nn.Linear(in_dim, num_experts)
        hidden = self.shared_experts.output_dim
        K = self.num_tasks

        # Per-task modules: K is small, so plain ModuleLists keep each task's parameters
        # separable (gradient methods and DRGrad need task_parameters(k)).
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, num_experts + dedicated_experts) for _ in range(K))
        self.dedicated_experts = nn.ModuleList(
            Experts(dedicated_experts, in_dim, expert_dims, dropout=dropout, activation=activation)
            for _ in range(K)) if dedicated_experts else None
        tower = dict(hidden=tower_dims, dropout=dropout, activation=activation, out_dim=1)
        self.dedicated_towers = nn.ModuleList(MLP(hidden, **tower) for _ in range(K))
        self.shared_towers = nn.ModuleList(MLP(hidden, **tower) for _ in range(K))
        self.task_modules = nn.ModuleList(
            nn.ModuleList([self.dedicated_towers[k], self.shared_towers[k], self.task_gates[k]]
                          + ([self.dedicated_experts[k]] if self.dedicated_experts is not None else []))
            for k in range(K))

        self.id_fields = self._resolve_gate(spec, personalized_gate)
        self.personal_gate = None
        if self.id_fields:
            idx = torch.as_tensor([spec.field_index(f) for f in self.id_fields], dtype=torch.long)
            self.register_buffer("id_field_index", idx, persistent=False)
            self.personal_gate = PersonalizedGate(len(self.id_fields) * embed_dim, hidden)

        mu = torch.tensor([[float(mu_init), 1.0 - float(mu_init)]]).repeat(K, 1)
        self.register_buffer("mu", mu)  # [K, 2]: (mu_k', mu_k''); the DRGrad updater writes it

    @staticmethod
    def _resolve_gate(spec: FeatureSpec, option) -> list[str]:
        named = [getattr(spec, role) for role in _ID_ROLES if getattr(spec, role) is not None]
        if option == "auto":
            return named
        if isinstance(option, bool):
            if option and not named:
                raise ConfigError(
                    f"the personalised gate needs user/item/author id fields, but the '{spec.source}' "
                    "feature spec names none; use personalized_gate: auto or false", key="personalized_gate")
            return named if option else []
        raise ConfigError(f"expected true, false or 'auto', got {option!r}", key="personalized_gate")

    def _shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        """Everything every task reads: x [B, D], shared expert outputs [B, E, H], v_s [B, H]."""
        x = self.features(sparse, dense)
        shared_out = self.shared_experts(x)
        v_s = mix_experts(shared_out, torch.softmax(self.shared_gate(x), dim=-1).unsqueeze(1)).squeeze(1)
        if self.personal_gate is not None:
            ids = self.features.table(sparse[:, self.id_field_index] + self.features.offsets[self.id_field_index])
            v_s = self.personal_gate(v_s, ids.flatten(1))
        return x, shared_out, v_s

    def _heads(self, x: torch.Tensor, shared_out: torch.Tensor, v_s: torch.Tensor) -> torch.Tensor:
        """The task modules: gates -> v_k, then both towers of every task, mixed by mu."""
        gates = torch.stack([torch.softmax(g(x), dim=-1) for g in self.task_gates], dim=1)  # [B, K, E(+Ed)]
        if self.dedicated_experts is None:
            v = mix_experts(shared_out, gates)  # [B, K, H]: one bmm for all tasks
            v_tasks = [v[:, k] for k in range(self.num_tasks)]
        else:
            v_tasks = [mix_experts(torch.cat([shared_out, self.dedicated_experts[k](x)], dim=1),
                                   gates[:, k:k + 1]).squeeze(1) for k in range(self.num_tasks)]
        dedicated = torch.cat([t(v_k) for t, v_k in zip(self.dedicated_towers, v_tasks)], dim=1)  # [B, K]
        shared = torch.cat([t(v_s) for t in self.shared_towers], dim=1)
        mu = self.mu.to(dedicated.dtype)
        return dedicated * mu[:, 0] + shared * mu[:, 1]

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self._heads(*self._shared(sparse, dense))

    def forward_with_shared(self, sparse: torch.Tensor, dense: torch.Tensor):
        """(logits [B, K], cut): the cut is cat[x, shared expert outputs, v_s] (see base.py);
        the task modules read only slices of it."""
        x, shared_out, v_s = self._shared(sparse, dense)
        cut = torch.cat([x, shared_out.flatten(1), v_s], dim=1)
        parts = cut_slices(cut, x.shape[1:], shared_out.shape[1:], v_s.shape[1:])
        return self._heads(*parts), cut
