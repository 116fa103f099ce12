"""Offline evaluation of fusion policies: conservative FQE and MTF-GAUC.

**Conservative FQE.** Fitted Q evaluation of a policy pi on logged transitions
(s, a, r, s', done): Q(s, a) <- r + gamma (1 - done) Q_target(s', pi(s')), with a soft
target network; plus a CQL penalty cql_alpha * E_s[Q(s, pi(s)) - Q(s, a_logged)], which
pushes down the value of the evaluated policy's actions where the log does not
support them (CQL's regulariser with the evaluated policy as the penalised
distribution). Q is squashed into the range of values reachable on the logged sessions
(reward range x discounted longest session), so the penalty pulls an unsupported
policy down to that floor instead of to minus infinity. The estimate is
mean_s0 Q(s0, pi(s0)) over the sessions' initial states. cql_alpha = 0 is plain FQE (with a
penalty it is a lower bound). ``slate=`` (a SlateSpec dict) makes Q's action input the slate alpha
shows (rmtl.fusion.slates) instead of alpha: the slate FQE behind the run's default DR estimate
(rmtl.fusion.ope). ``save`` / ``load`` keep a fitted critic (weights-only file).

**MTF-GAUC.** For each logged request of held-out sessions, the policy's alpha fuses the
ranker's predictions of the items logged in that request; the fused score is scored
against valid consumption (a label, long_view by default) with a user-grouped AUC in
which each positive counts with its instant reward (and each negative with 1), users
weighted by their number of impressions. It is a ranking criterion, not a value: its interval
(``user_bootstrap``, ``gauc_resampled``) resamples the users, so that it can enter the tie-aware check.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rmtl.fusion.bcq import mlp
from rmtl.fusion.data import FusionDataset
from rmtl.checkpoint import load_user_file, save_atomic
from rmtl.errors import ConfigError, DataError
from rmtl.fusion.functions import fuse
from rmtl.fusion.slates import SlateSpec, shown, slate_feature_dim, slate_features

Policy = Callable[[np.ndarray], np.ndarray]
FQE_FORMAT = "rmtl-fqe/1"


class ConservativeFQE:
    def __init__(self, obs_dim: int, act_dim: int, *, gamma: float = 0.95, cql_alpha: float = 0.1,
                 hidden: int = 128, lr: float = 1e-3, tau: float = 0.01, seed: int = 0, slate: dict | None = None):
        if not 0 <= gamma < 1:
            raise ConfigError(f"expected 0 <= gamma < 1, got {gamma}", key="fqe.gamma")
        if cql_alpha < 0:
            raise ConfigError(f"expected a non-negative penalty, got {cql_alpha}", key="fqe.cql_alpha")
        self._config = {"obs_dim": int(obs_dim), "act_dim": int(act_dim), "gamma": float(gamma),
                        "cql_alpha": float(cql_alpha), "hidden": int(hidden), "lr": float(lr), "tau": float(tau),
                        "seed": int(seed), "slate": dict(slate) if slate else None}
        # slate: Q's action input is the slate alpha shows (rmtl.fusion.slates), not alpha itself
        self.slate = SlateSpec(**slate) if slate else None
        torch.manual_seed(seed)
        self.q = mlp(obs_dim + (slate_feature_dim(act_dim) if self.slate else act_dim), 1, hidden)
        self.q_target = copy.deepcopy(self.q)
        self.opt = torch.optim.Adam(self.q.parameters(), lr=lr)
        self.gamma, self.cql_alpha, self.tau = gamma, cql_alpha, tau
        self.gen = np.random.default_rng(seed)
        self.obs_mean = torch.zeros(obs_dim)
        self.obs_std = torch.ones(obs_dim)
        self.q_low, self.q_high = -1e3, 1e3

    def _s(self, obs) -> torch.Tensor:
        return (torch.as_tensor(np.asarray(obs, np.float32)) - self.obs_mean) / self.obs_std

    def _q(self, net, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Q squashed into [q_low, q_high]: the penalty cannot drive it below any reachable value."""
        raw = net(torch.cat([s, a], -1)).squeeze(-1)
        return self.q_low + (self.q_high - self.q_low) * torch.sigmoid(raw)

    def _set_bounds(self, data: FusionDataset) -> None:
        """Value range of any policy on these sessions: the per-step reward range times the
        discounted length of the longest logged session (rewards outside it are not reachable)."""
        depth = int(np.bincount(data.episode).max()) if len(data) else 1
        horizon = (1 - self.gamma ** depth) / (1 - self.gamma)
        self.q_low = min(float(data.reward.min()), 0.0) * horizon
        self.q_high = max(float(data.reward.max()), 0.0) * horizon + 1e-3

    def action_input(self, data: FusionDataset, alpha: np.ndarray, rows: np.ndarray | None = None) -> torch.Tensor:
        """Q's action input for ``alpha`` [n, K] at ``rows`` of ``data`` (all rows by default): alpha, or
        the features of the slate it shows there (needs the logged candidates)."""
        alpha = np.asarray(alpha, np.float32)
        if self.slate is None:
            return torch.as_tensor(alpha)
        if not data.has_candidates():
            raise DataError("slate FQE needs the logged candidates (cand_o, cand_mask): re-log the data",
                            column="cand_o")
        rows = np.arange(len(data)) if rows is None else rows
        cand_o, mask = data.cand_o[rows], data.cand_mask[rows]
        return torch.as_tensor(slate_features(cand_o, shown(cand_o, mask, alpha, self.slate), self.slate))

    def fit(self, data: FusionDataset, policy: Policy, steps: int = 2000, batch_size: int = 256,
            on_log: Callable[[int, dict], None] | None = None, log_every: int = 200,
            weights: np.ndarray | None = None) -> "ConservativeFQE":
        """Fit on ``data``; ``weights`` [N] (e.g. a bootstrap's episode counts) sets how often each row is drawn."""
        if len(data) == 0:
            raise ConfigError("the held-out dataset is empty", key="fqe")
        obs = torch.as_tensor(data.obs)
        self.obs_mean, self.obs_std = obs.mean(0), obs.std(0).clamp_min(1e-3)
        self._set_bounds(data)
        s_all, s2_all = self._s(data.obs), self._s(data.next_obs)
        a_all = self.action_input(data, data.action)
        pi_s = self.action_input(data, policy(data.obs))  # the policy once, on every state
        nxt = next_row(data)
        nxt_rows = np.where(nxt >= 0, nxt, np.arange(len(data)))  # after the last step: masked by done
        pi_s2 = self.action_input(data, policy(data.next_obs), nxt_rows) if self.slate else \
            torch.as_tensor(np.asarray(policy(data.next_obs), np.float32))
        r_all = torch.as_tensor(data.reward, dtype=torch.float32)
        nd_all = 1.0 - torch.as_tensor(data.done, dtype=torch.float32)
        cdf = None if weights is None else np.cumsum(np.asarray(weights, np.float64)) / float(np.sum(weights))
        for step in range(1, int(steps) + 1):
            if cdf is None:
                idx = torch.as_tensor(self.gen.integers(0, len(data), size=batch_size))
            else:
                idx = torch.as_tensor(np.minimum(np.searchsorted(cdf, self.gen.random(batch_size), side="right"),
                                                 len(data) - 1))
            s, a = s_all[idx], a_all[idx]
            with torch.no_grad():
                target = r_all[idx] + self.gamma * nd_all[idx] * self._q(self.q_target, s2_all[idx], pi_s2[idx])
            q_data = self._q(self.q, s, a)
            loss = F.mse_loss(q_data, target)
            if self.cql_alpha > 0:
                loss = loss + self.cql_alpha * (self._q(self.q, s, pi_s[idx]) - q_data).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            with torch.no_grad():
                for p, tp in zip(self.q.parameters(), self.q_target.parameters()):
                    tp.mul_(1 - self.tau).add_(self.tau * p)
            if on_log is not None and (step % log_every == 0 or step == steps):
                on_log(step, {"loss": float(loss.detach()), "q_mean": float(q_data.detach().mean())})
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted critic (tensors and numbers only: loads with weights_only=True)."""
        return save_atomic({"format": FQE_FORMAT, "config": dict(self._config), "q": self.q.state_dict(),
                            "q_target": self.q_target.state_dict(), "obs_mean": self.obs_mean,
                            "obs_std": self.obs_std, "q_bounds": [float(self.q_low), float(self.q_high)]}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConservativeFQE":
        path = Path(path)
        state = load_user_file(path, "FQE critic file")
        if not isinstance(state, dict) or state.get("format") != FQE_FORMAT:
            raise DataError(f"not an FQE critic file (format {FQE_FORMAT} expected)", path=path)
        fqe = cls(**state["config"])
        fqe.q.load_state_dict(state["q"])
        fqe.q_target.load_state_dict(state["q_target"])
        fqe.obs_mean, fqe.obs_std = state["obs_mean"], state["obs_std"]
        fqe.q_low, fqe.q_high = state["q_bounds"]
        return fqe

    @torch.no_grad()
    def value(self, obs: np.ndarray, policy: Policy) -> float:
        """mean Q(s, pi(s)) over the given (initial) states (alpha-input critics; see ``estimate``)."""
        if self.slate is not None:
            raise ConfigError("a slate critic needs the requests' candidates: use estimate(data, policy)",
                              key="fqe.action_input")
        a = torch.as_tensor(np.asarray(policy(obs), np.float32))
        return float(self._q(self.q, self._s(obs), a).mean())

    @torch.no_grad()
    def q_values(self, data: FusionDataset, policy: Policy | None = None) -> np.ndarray:
        """float64 [N]: Q(s, a) at every row, a = the logged action (policy None) or pi(s)."""
        alpha = data.action if policy is None else policy(data.obs)
        return self._q(self.q, self._s(data.obs), self.action_input(data, alpha)).double().numpy()

    def estimate(self, data: FusionDataset, policy: Policy, weights: np.ndarray | None = None) -> float:
        """The value estimate: mean Q(s0, pi(s0)) over ``data``'s initial states (``weights`` [N] per row)."""
        first = np.flatnonzero(data.first)
        sub = data.subset(first)
        v = self.q_values(sub, policy)
        w = np.ones(len(first)) if weights is None else np.asarray(weights, np.float64)[first]
        return float((v * w).sum() / w.sum())


def next_row(data: FusionDataset) -> np.ndarray:
    """int64 [N]: the row of the same episode's next request (-1 after its last one). Rows of an
    episode are stored in step order (rollout appends request by request)."""
    order = np.argsort(data.episode, kind="stable")
    same = data.episode[order][1:] == data.episode[order][:-1]
    out = np.full(len(data), -1, np.int64)
    out[order[:-1][same]] = order[1:][same]
    return out


def fqe_value(data: FusionDataset, policy: Policy, *, steps: int = 2000, batch_size: int = 256,
              **options) -> float:
    """Conservative FQE estimate of ``policy``'s session value on ``data``'s initial states."""
    fqe = ConservativeFQE(data.obs.shape[1], data.action.shape[1], **options)
    fqe.fit(data, policy, steps=steps, batch_size=batch_size)
    return fqe.value(data.initial_obs, policy)


def weighted_group_auc(y: np.ndarray, score: np.ndarray, group: np.ndarray, pos_weight: np.ndarray) -> float:
    """Group-wise AUC where each positive counts with ``pos_weight`` (negatives with 1), averaged over
    groups having both classes, weighted by group size."""
    return gauc_mean(group_aucs(y, score, group, pos_weight))


def gauc_mean(groups: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
    """The size-weighted mean AUC of ``group_aucs`` parts (NaN without a group having both classes)."""
    _, auc, size = groups
    return float((auc * size).sum() / size.sum()) if len(auc) else float("nan")


def group_aucs(y: np.ndarray, score: np.ndarray, group: np.ndarray,
               pos_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group label, AUC, size) of each group having both classes, in the order of the labels; each
    positive counts with ``pos_weight``, negatives with 1. One lexsort, no loop over groups."""
    y = np.asarray(y, bool).reshape(-1)
    score = np.asarray(score, np.float64).reshape(-1)
    labels, g = np.unique(np.asarray(group).reshape(-1), return_inverse=True)
    w = np.where(y, np.asarray(pos_weight, np.float64).reshape(-1), 0.0)
    if len(y) == 0:
        return labels[:0], np.zeros(0), np.zeros(0)
    order = np.lexsort((score, g))
    g, score, y, w = g[order], score[order], y[order], w[order]
    neg = (~y).astype(np.float64)
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_tie = new_group | np.r_[True, score[1:] != score[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    group_id = np.cumsum(new_group) - 1
    neg_cum = np.cumsum(neg)
    group_start_neg = (neg_cum - neg)[new_group][group_id]  # negatives before the group
    tie_start_neg = (neg_cum - neg)[new_tie][tie_id]  # negatives before the tie block
    tie_negs = np.bincount(tie_id, weights=neg)[tie_id]
    below = tie_start_neg - group_start_neg + 0.5 * tie_negs  # negatives ranked below each row, in its group
    n_groups = group_id[-1] + 1
    won = np.bincount(group_id, weights=w * below, minlength=n_groups)
    pos_w = np.bincount(group_id, weights=w, minlength=n_groups)
    n_neg = np.bincount(group_id, weights=neg, minlength=n_groups)
    size = np.bincount(group_id, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(group_id, weights=y.astype(np.float64), minlength=n_groups)
    valid = (n_pos > 0) & (n_neg > 0) & (pos_w > 0)
    label_of_group = labels[g[new_group]]
    return label_of_group[valid], won[valid] / (pos_w[valid] * n_neg[valid]), size[valid]


def mtf_gauc(data: FusionDataset, policy: Policy, labels: np.ndarray, reward_weights: np.ndarray, *,
             label_index: int, beta: float = 1e-3, kind: str = "log_sum", min_weight: float = 1e-3) -> float:
    """MTF-GAUC of ``policy`` on the logged requests of ``data`` (see the module docstring).

    ``labels`` is the SessionLog's label array (rows index into it), ``label_index`` the task
    that means valid consumption, ``reward_weights`` [K] the instant reward of a row."""
    return gauc_mean(mtf_gauc_groups(data, policy, labels, reward_weights, label_index=label_index, beta=beta,
                                     kind=kind, min_weight=min_weight))


def mtf_gauc_groups(data: FusionDataset, policy: Policy, labels: np.ndarray, reward_weights: np.ndarray, *,
                    label_index: int, beta: float = 1e-3, kind: str = "log_sum",
                    min_weight: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MTF-GAUC's parts: (user, that user's AUC, that user's impressions) for the users it averages over.
    Which users count depends on the labels only, not on the policy."""
    alpha = np.asarray(policy(data.obs), np.float32)  # [N, K]
    scores = fuse(data.req_o, alpha[:, None, :], beta, kind)  # [N, W]
    valid = data.req_rows >= 0
    rows = data.req_rows[valid]
    row_labels = labels[rows]
    reward = row_labels @ np.asarray(reward_weights, np.float64)
    users = np.broadcast_to(data.user[:, None], data.req_rows.shape)[valid]
    return group_aucs(row_labels[:, label_index] > 0.5, scores[valid], users, np.maximum(reward, min_weight))


def user_bootstrap(data: FusionDataset, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the users of ``data`` [U], their counts in ``resamples`` bootstrap resamples [B, U]): MTF-GAUC's
    interval resamples its groups, the users (the same resamples for every policy: paired)."""
    users = np.unique(data.user)
    draws = np.random.default_rng(seed).integers(0, len(users), size=(resamples, len(users)))
    return users, np.stack([np.bincount(d, minlength=len(users)) for d in draws]).astype(np.float64)


def gauc_resampled(groups: tuple[np.ndarray, np.ndarray, np.ndarray], users: np.ndarray,
                   counts: np.ndarray) -> np.ndarray:
    """float64 [B]: MTF-GAUC on each user resample ``counts`` [B, U] (over ``users``), from its
    ``mtf_gauc_groups`` parts: the impression-weighted mean AUC with each user counted as drawn."""
    user, auc, size = groups
    w = counts[:, np.searchsorted(users, user)] * size  # [B, G]
    total = w.sum(1)
    return np.divide(w @ auc, total, out=np.full(len(w), np.nan), where=total > 0)
