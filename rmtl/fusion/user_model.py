"""User-response model of FusionEnv: P(feedback k | user, item) for every task k.

A multi-task logistic matrix factorisation fitted on logged impressions:

    logit_k(u, i) = b_k + bu[u, k] + bi[i, k] + sum_d U[u, d] V[i, d] H[d, k]

(shared user / item vectors, one linear head per task). It plays two roles in the
fusion pipeline: its probabilities are the task predictions o that a policy fuses
(the "ranker"), and it answers for the user in the simulator. Two models fitted with
different seeds, sizes and rows give the "training" user and the held-out user that
policies are evaluated against. Prediction is plain numpy (no autograd) so the
simulator stays cheap; users and items are the SessionLog's global codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rmtl.data.sessionlog import SessionLog
from rmtl.errors import ConfigError, DataError


@dataclass
class UserResponseModel:
    bias: np.ndarray  # float32 [K]
    user_bias: np.ndarray  # float32 [U, K]
    item_bias: np.ndarray  # float32 [I, K]
    user_vec: np.ndarray  # float32 [U, d]
    item_vec: np.ndarray  # float32 [I, d]
    head: np.ndarray  # float32 [d, K]
    tasks: list[str]

    @property
    def num_tasks(self) -> int:
        return int(self.bias.shape[0])

    def logits(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Logits [..., K] for broadcastable integer arrays of user and item codes."""
        users, items = np.broadcast_arrays(np.asarray(users, np.int64), np.asarray(items, np.int64))
        inter = (self.user_vec[users] * self.item_vec[items]) @ self.head
        return self.bias + self.user_bias[users] + self.item_bias[items] + inter

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Probabilities [..., K] (float32)."""
        return (1.0 / (1.0 + np.exp(-self.logits(users, items)))).astype(np.float32)

    @classmethod
    def fit(cls, log: SessionLog, rows: np.ndarray | None = None, *, dim: int = 8, epochs: int = 30,
            lr: float = 0.03, l2: float = 1e-2, batch_size: int = 4096, seed: int = 0) -> "UserResponseModel":
        """Fit on ``rows`` of ``log`` (default: all rows) with minibatch Adam on the summed BCE.

        ``log`` should be the whole SessionLog, so user / item codes index the same tables
        in every split; users or items never seen in ``rows`` keep near-zero parameters
        (the task's base rate).
        """
        for key, value in (("dim", dim), ("epochs", epochs), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ConfigError(f"expected a positive integer, got {value}", key=f"user_model.{key}")
        rows = np.arange(log.num_rows) if rows is None else np.asarray(rows, np.int64)
        if len(rows) == 0:
            raise DataError("no rows to fit the user-response model on", column="labels")
        labels = log.labels[rows]
        if not np.isfinite(labels).all() or ((labels != 0) & (labels != 1)).any():
            raise DataError("labels must be 0 or 1 to fit the user-response model", column="labels")
        num_users, num_items, k = int(log.user.max()) + 1, int(log.item.max()) + 1, labels.shape[1]
        gen = torch.Generator().manual_seed(int(seed))
        rate = labels.mean(0).clip(1e-4, 1 - 1e-4)
        params = {
            "bias": torch.tensor(np.log(rate / (1 - rate)), dtype=torch.float32),
            "user_bias": torch.zeros(num_users, k),
            "item_bias": torch.zeros(num_items, k),
            "user_vec": 0.1 * torch.randn(num_users, dim, generator=gen),
            "item_vec": 0.1 * torch.randn(num_items, dim, generator=gen),
            "head": 0.1 * torch.randn(dim, k, generator=gen),
        }
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(params.values(), lr=lr)
        u_all = torch.as_tensor(log.user[rows])
        i_all = torch.as_tensor(log.item[rows])
        y_all = torch.as_tensor(labels, dtype=torch.float32)
        n = len(rows)
        for _ in range(int(epochs)):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):  # loop over minibatches, not rows
                idx = perm[start:start + batch_size]
                u, i, y = u_all[idx], i_all[idx], y_all[idx]
                pu, qi = params["user_vec"][u], params["item_vec"][i]
                logit = (params["bias"] + params["user_bias"][u] + params["item_bias"][i]
                         + (pu * qi) @ params["head"])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="sum") / len(idx)
                reg = (pu.pow(2).sum() + qi.pow(2).sum() + params["user_bias"][u].pow(2).sum()
                       + params["item_bias"][i].pow(2).sum()) / len(idx)
                opt.zero_grad()
                (loss + l2 * reg).backward()
                opt.step()
        arrays = {name: p.detach().numpy().astype(np.float32) for name, p in params.items()}
        return cls(**arrays, tasks=list(log.spec.tasks))
