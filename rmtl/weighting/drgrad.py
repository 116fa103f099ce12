"""DRGrad: direct gradient routing between split towers (Liu, Miao & Xia, AAAI 2025).

Works on a backbone whose every task k has a dedicated tower T_k' and a shared-input
tower T_k'' of identical shape (``dedicated_towers`` / ``shared_towers``, e.g.
``split_mmoe``) and a ``mu`` buffer [K, 2] mixing them. One backward pass of the summed
task losses (EW) gives every parameter its plain gradient; since only task k's loss
reaches T_k' and T_k'', the tower gradients are exactly g_k' and g_k''. The router then
rewrites the tower gradients, the updater rewrites mu. Shared (non-tower) parameters
keep the plain summed gradient.

Router, two tasks (task 1 routes, task 2's shared tower is T2 with gradient g2):
    xi1 = cos(g1', g2),   lam1 = clip(|g1'| / |g2|, 0, 1)^gamma
    xi2 = cos(g1', g1''), lam2 = clip(|g1'| / |g1''|, 0, 1)^gamma
    pairing="paper" (as printed):  gR' = (1 - [xi1<0] xi1) lam1 g1'' + [xi2>=0] lam2 g2
    pairing="g2"    (swapped, each coefficient scales the gradient it was measured on):
                                   gR' = (1 - [xi1<0] xi1) lam1 g2   + [xi2>=0] lam2 g1''
    gR'' = -[xi1 xi2 < 0] xi1 xi2 g1''          (both pairings)
    T1' steps with g1' + gR', T1'' with g1'' + gR'', T2 with g2.

K tasks: every routed task k plays "task 1" against every other task j (whose shared
tower plays "T2") and the K-1 routed gradients are AVERAGED. Averaging keeps the size of
gR independent of K and makes K=2 exactly the paper's equations; every task gets the
same treatment because no task is privileged in a general multi-task model. Set
``main_task`` to route one task only (the paper's "main task" set-up); the others then
step with their plain gradients.

Updater: sigma_k' <- decay sigma_k' + |g_k' + gR_k'|, likewise sigma_k''.
``updater="paper"``: decay = 1 and (mu_k', mu_k'') = softmax(sigma_k', sigma_k'') (over
temperature). The sums only grow, so mu drifts to one-hot and stays there; on Census it
was one-hot within 3 epochs, and a decay alone does not prevent it (the bound
max|g| / (1 - decay) still carries the scale of the gradients into the exponent).
``updater="decay"`` (default, the guard): the same decayed sums, read relative to their
mean, mu = softmax(sigma / (temperature * mean(sigma_k', sigma_k''))): scale-free, bounded
in [sigmoid(-2/T), sigmoid(2/T)] (0.12 .. 0.88 at T = 1) and following recent steps.
``updater="none"`` keeps mu as it is.

``routing=False`` switches router AND updater off: plain EW training of the split
towers, i.e. the Split-MMoE baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from rmtl.distributed import all_reduce_gradients
from rmtl.errors import ConfigError
from rmtl.weighting.common import (WeightingStrategy, check_choice, check_int, check_positive, option_error,
                                  reduce_losses)

PAIRINGS = ("paper", "g2")
UPDATERS = ("decay", "paper", "none")


@dataclass
class Routed:
    """What the router computed for one step (all tensors detached)."""

    dedicated: torch.Tensor  # [K, P] gR_k' (zero rows for tasks that do not route)
    shared: torch.Tensor  # [K, P] gR_k''
    cos: torch.Tensor  # [K, K] xi1[k, j] = cos(g_k', g_j'') (diagonal: xi2[k] = cos(g_k', g_k''))
    lam: torch.Tensor  # [K, K] clip(|g_k'| / |g_j''|, 0, 1)^gamma (diagonal: lam2)
    pairs: torch.Tensor  # [K, K] bool, (k, j) routed this step


def route(dedicated: torch.Tensor, shared: torch.Tensor, *, gamma: float = 1.0, pairing: str = "paper",
          routed_tasks: torch.Tensor | None = None, eps: float = 1e-12) -> Routed:
    """The router on flattened tower gradients: ``dedicated[k]`` = g_k', ``shared[k]`` = g_k''.

    ``routed_tasks`` (bool [K]) selects the tasks that route (default: all). Vectorised over
    all (k, j) pairs: one [K, P] x [P, K] product, no loop over tasks.
    """
    if dedicated.shape != shared.shape or dedicated.dim() != 2:
        raise ValueError(f"expected two [K, P] gradient matrices, got {tuple(dedicated.shape)} and {tuple(shared.shape)}")
    if pairing not in PAIRINGS:
        raise option_error("pairing", f"expected one of {', '.join(PAIRINGS)}, got {pairing!r}")
    K = dedicated.shape[0]
    n_ded = dedicated.norm(dim=1)  # [K]
    n_sh = shared.norm(dim=1)
    cos = (dedicated @ shared.T) / (n_ded[:, None] * n_sh[None, :]).clamp_min(eps)  # [K, K]
    # |g'| / |g''| clipped to [0, 1]; a zero |g''| gives ratio 1 (or 0 when |g'| is 0 too).
    lam = (n_ded[:, None] / n_sh[None, :].clamp_min(eps)).clamp(0.0, 1.0).pow(gamma)

    eye = torch.eye(K, dtype=torch.bool, device=dedicated.device)
    if routed_tasks is None:
        routed_tasks = torch.ones(K, dtype=torch.bool, device=dedicated.device)
    pairs = ~eye & routed_tasks[:, None]  # (k, j): task k routes against task j's shared tower
    mask = pairs.to(dedicated.dtype)
    count = mask.sum(dim=1).clamp_min(1.0)  # K-1 for routed tasks; the clamp avoids 0/0 for the rest

    xi1, lam1 = cos, lam  # [K, K], read at off-diagonal (k, j)
    xi2, lam2 = cos.diagonal(), lam.diagonal()  # [K]
    a = (1.0 - (xi1 < 0).to(cos.dtype) * xi1) * lam1 * mask  # coefficient of the xi1 term, per pair
    b = (xi2 >= 0).to(cos.dtype) * lam2  # coefficient of the xi2 term, per task
    routes = (mask.sum(dim=1) > 0).to(cos.dtype)  # [K] 1 for tasks that route
    if pairing == "paper":
        # mean_j [a_kj g_k'' + b_k g_j'']
        g_ded = (a.sum(dim=1) / count)[:, None] * shared + (b / count)[:, None] * (mask @ shared)
    else:
        # mean_j [a_kj g_j'' + b_k g_k'']
        g_ded = (a @ shared) / count[:, None] + (b * routes)[:, None] * shared
    prod = xi1 * xi2[:, None]  # xi1[k, j] * xi2[k]
    c = -(prod < 0).to(cos.dtype) * prod * mask  # >= 0: amplify g_k'' when the two cosines disagree
    g_sh = (c.sum(dim=1) / count)[:, None] * shared
    return Routed(dedicated=g_ded, shared=g_sh, cos=cos, lam=lam, pairs=pairs)


class MuUpdater(nn.Module):
    """Accumulated tower-gradient norms -> mu, per task.

    ``normalize=False`` (the paper): sigma <- decay * sigma + |g|; mu = softmax(sigma / T).
    ``normalize=True`` (the guard): the same sums, but the softmax reads them relative to
    their mean, mu = softmax(sigma / (T * mean(sigma', sigma''))), so mu no longer
    depends on the scale of the gradients and stays within [sigmoid(-2/T), sigmoid(2/T)]
    (0.12 .. 0.88 at T = 1); decay < 1 makes it follow recent steps instead of all history.
    """

    def __init__(self, num_tasks: int, *, decay: float = 0.99, temperature: float = 1.0,
                 normalize: bool = True, eps: float = 1e-12):
        super().__init__()
        if not 0.0 <= float(decay) <= 1.0:
            raise option_error("decay", f"expected a number in [0, 1], got {decay!r}")
        if not float(temperature) > 0.0:
            raise option_error("temperature", f"expected a positive number, got {temperature!r}")
        self.decay = float(decay)
        self.temperature = float(temperature)
        self.normalize = bool(normalize)
        self.eps = float(eps)
        self.register_buffer("sigma", torch.zeros(num_tasks, 2))  # columns: dedicated, shared

    def forward(self, norm_dedicated: torch.Tensor, norm_shared: torch.Tensor) -> torch.Tensor:
        norms = torch.stack([norm_dedicated, norm_shared], dim=1).to(self.sigma)
        self.sigma.mul_(self.decay).add_(norms)
        scale = self.temperature
        if self.normalize:
            scale = self.temperature * self.sigma.mean(dim=1, keepdim=True).clamp_min(self.eps)
        return torch.softmax(self.sigma / scale, dim=1)  # [K, 2]


def _tower_list(model: nn.Module, attr: str, num_tasks: int):
    towers = getattr(model, attr, None)
    if towers is None or not hasattr(towers, "__len__") or len(towers) != num_tasks:
        return None
    return list(towers)


def tower_parameters(model: nn.Module, num_tasks: int) -> tuple[list[list[nn.Parameter]], list[list[nn.Parameter]]]:
    """(dedicated tower parameters per task, shared tower parameters per task), checked to be
    2K towers of identical parameter shapes; ConfigError otherwise."""
    name = type(model).__name__
    need = (f"strategy 'drgrad' needs a backbone with per-task towers of identical shape: "
            f"attributes 'dedicated_towers' and 'shared_towers', {num_tasks} modules each "
            f"(e.g. model 'split_mmoe')")
    ded, sh = _tower_list(model, "dedicated_towers", num_tasks), _tower_list(model, "shared_towers", num_tasks)
    if ded is None or sh is None:
        raise ConfigError(f"{need}; {name} does not expose them", key="strategy")
    groups_d = [[p for p in t.parameters() if p.requires_grad] for t in ded]
    groups_s = [[p for p in t.parameters() if p.requires_grad] for t in sh]
    shapes = [[tuple(p.shape) for p in g] for g in groups_d + groups_s]
    if not shapes[0] or any(s != shapes[0] for s in shapes):
        raise ConfigError(f"{need}; {name}'s towers differ in parameter shapes: {shapes}", key="strategy")
    seen = {id(p) for g in groups_d + groups_s for p in g}
    if len(seen) != sum(len(g) for g in groups_d + groups_s):
        raise ConfigError(f"{need}; {name}'s towers share parameters", key="strategy")
    return groups_d, groups_s


class DRGradStrategy(WeightingStrategy):
    """Direct gradient routing on split towers; see the module docstring for the equations.

    Options: gamma (exponent of the norm ratios), pairing ("paper" | "g2"), updater
    ("decay" | "paper" | "none"), decay (forgetting factor of the "decay" updater),
    temperature (of the mu softmax), routing (False = Split-MMoE under EW), main_task
    (route this task only; None = every task), task_names (labels for the logs).
    """

    name = "drgrad"

    def __init__(self, num_tasks: int, *, gamma: float = 1.0, pairing: str = "g2", updater: str = "decay",
                 decay: float = 0.99, temperature: float = 1.0, routing: bool = True,
                 main_task: int | None = None, task_names: Sequence[str] | None = None, eps: float = 1e-12):
        super().__init__(num_tasks, task_names=task_names)
        num_tasks = self.num_tasks
        if num_tasks < 2:
            raise ConfigError(f"DRGrad routes between tasks and needs at least 2, got {num_tasks}", key="num_tasks")
        self.pairing = check_choice("pairing", pairing, PAIRINGS)
        self.updater_mode = check_choice("updater", updater, UPDATERS)
        if not isinstance(routing, bool):
            raise option_error("routing", f"expected true or false, got {routing!r}")
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        decay = check_positive("decay", decay, allow_zero=True)
        if decay > 1.0:
            raise option_error("decay", f"expected a number in [0, 1], got {decay!r}")
        temperature = check_positive("temperature", temperature)
        if main_task is not None:
            main_task = check_int("main_task", main_task)
            if main_task >= num_tasks:
                raise option_error("main_task", f"expected a task index in [0, {num_tasks}) or null, got {main_task}")
        self.routing = routing
        self.main_task = main_task
        self.eps = float(eps)
        if updater == "paper":
            self.updater = MuUpdater(num_tasks, decay=1.0, temperature=temperature, normalize=False)
        else:
            self.updater = MuUpdater(num_tasks, decay=decay, temperature=temperature, normalize=True)
        routed = torch.ones(num_tasks, dtype=torch.bool)
        if main_task is not None:
            routed = torch.zeros(num_tasks, dtype=torch.bool)
            routed[main_task] = True
        self.register_buffer("routed_tasks", routed, persistent=False)
        # Running counts for the "share of conflicting steps" log (cos(g_k', g_j'') < 0).
        self.register_buffer("conflict_steps", torch.zeros(num_tasks, num_tasks))
        self._pending: dict | None = None

    def backward(self, losses: torch.Tensor, model: nn.Module, *, shared: torch.Tensor | None = None,
                 context: dict | None = None) -> torch.Tensor:
        self.check_losses(losses)
        K = self.num_tasks
        ded_params, sh_params = tower_parameters(model, K)  # cheap; also validates the model
        mu = getattr(model, "mu", None)
        if self.routing and self.updater_mode != "none" and (not isinstance(mu, torch.Tensor) or tuple(mu.shape) != (K, 2)):
            raise ConfigError(
                f"the DRGrad updater writes the model's tower mixing weights, but {type(model).__name__} has no "
                f"'mu' buffer of shape [{K}, 2]; add one or set updater: none", key="strategy.options.updater")
        total = reduce_losses(losses).sum()  # EW: sum_k mean_i losses[i, k]
        weights = torch.ones(K, device=losses.device)
        self._logs = {}
        self._pending = None
        if not self.routing:  # Split-MMoE: plain EW, mu untouched
            total.backward()
            self.log_weights(self.names_for(model), weights)
            self.finish_call()
            return weights

        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        grads = all_reduce_gradients(grads, params)  # under torch.distributed: route the global batch's
        grad_of = {id(p): g for p, g in zip(params, grads)}

        def flat(group: list[nn.Parameter]) -> torch.Tensor:
            return torch.cat([(grad_of[id(p)] if grad_of[id(p)] is not None else torch.zeros_like(p)).reshape(-1)
                              for p in group])

        with torch.no_grad():
            g_ded = torch.stack([flat(g) for g in ded_params])  # [K, P]: g_k'
            g_sh = torch.stack([flat(g) for g in sh_params])  # [K, P]: g_k''
            r = route(g_ded, g_sh, gamma=self.gamma, pairing=self.pairing,
                      routed_tasks=self.routed_tasks, eps=self.eps)
            new_ded, new_sh = g_ded + r.dedicated, g_sh + r.shared
            for groups, rows in ((ded_params, new_ded), (sh_params, new_sh)):
                for k, group in enumerate(groups):  # K towers x a few tensors: not a hot loop
                    offset = 0
                    for p in group:
                        grad_of[id(p)] = rows[k, offset:offset + p.numel()].view_as(p)
                        offset += p.numel()
            for p in params:
                g = grad_of[id(p)]
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
            if self.updater_mode != "none":
                mu.copy_(self.updater(new_ded.norm(dim=1), new_sh.norm(dim=1)).to(mu))
            self._record(r, g_sh, model)
        self.log_weights(self.names_for(model), weights)
        self.finish_call()
        return weights

    def _record(self, r: Routed, g_sh: torch.Tensor, model: nn.Module) -> None:
        """Keep this step's figures as tensors; last_logs() turns them into floats (one sync)."""
        self.conflict_steps += ((r.cos < 0) & r.pairs).to(self.conflict_steps.dtype)
        n_sh = g_sh.norm(dim=1)
        # cosines between the shared towers' plain gradients: the task conflict on v_s itself
        sh_cos = (g_sh @ g_sh.T) / (n_sh[:, None] * n_sh[None, :]).clamp_min(self.eps)
        mu = getattr(model, "mu", None)
        self._pending = dict(names=self.names_for(model), cos=r.cos, sh_cos=sh_cos,
                             routed_ded=r.dedicated.norm(dim=1), routed_sh=r.shared.norm(dim=1),
                             mu=mu.detach().clone() if isinstance(mu, torch.Tensor) else None,
                             share=self.conflict_steps / (self.calls + 1).clamp_min(1), pairs=r.pairs)

    def last_logs(self) -> dict[str, float]:
        """TensorBoard scalars of the last step (tower "ded" = T_k', "shared" = T_k''):
        drgrad/cos/<a>_ded~<b>_shared (xi1 for a != b, xi2 for a == b),
        drgrad/cos/<a>_shared~<b>_shared, drgrad/routed_norm/<a>_ded|_shared (|gR'|, |gR''|),
        drgrad/mu/<a>_ded|_shared, drgrad/conflict_share/<a>~<b> (share of steps so far with
        xi1 < 0), weight/<a> (always 1: DRGrad does not reweight losses)."""
        logs = dict(self._logs)
        p = self._pending
        if p is None:
            return logs
        names = p["names"]
        cos, sh_cos, share, pairs = p["cos"].tolist(), p["sh_cos"].tolist(), p["share"].tolist(), p["pairs"].tolist()
        for k, a in enumerate(names):
            for j, b in enumerate(names):
                logs[f"drgrad/cos/{a}_ded~{b}_shared"] = cos[k][j]
                if j > k:
                    logs[f"drgrad/cos/{a}_shared~{b}_shared"] = sh_cos[k][j]
                if pairs[k][j]:
                    logs[f"drgrad/conflict_share/{a}~{b}"] = share[k][j]
        for a, x, y in zip(names, p["routed_ded"].tolist(), p["routed_sh"].tolist()):
            logs[f"drgrad/routed_norm/{a}_ded"] = x
            logs[f"drgrad/routed_norm/{a}_shared"] = y
        if p["mu"] is not None:
            for a, (x, y) in zip(names, p["mu"].tolist()):
                logs[f"drgrad/mu/{a}_ded"] = x
                logs[f"drgrad/mu/{a}_shared"] = y
        return logs
