"""A fitted multi-task backbone as the ranker of FusionEnv: o = sigmoid(backbone(features)).

The simulator asks for predictions of (user, candidate video) pairs that were never
logged together. Their feature rows are composed: the user's last logged row (of the
given rows, e.g. train) gives the user and context fields, and the candidate's last
logged row gives the video-side fields (``item_fields`` / ``item_dense``, by default
KuaiRand's video columns). Fields of a user or video never seen in those rows stay
"unknown" (index 0 / the row's dense value). The context (tab, hour) is therefore the
user's latest one, an approximation that docs/fusion.md states.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from rmtl.data.sessionlog import SessionLog
from rmtl.errors import ConfigError

ITEM_SPARSE = ("video_id", "author_id", "video_type", "upload_type", "music_type", "music_id", "tag",
               "visible_status")
ITEM_DENSE = ("log_duration_s", "log_video_age_days", "log_video_duration", "log_server_width",
              "log_server_height")


def _last_row_of(codes: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """int64 [size]: the last of ``rows`` holding each code (-1 = none)."""
    out = np.full(size, -1, dtype=np.int64)
    out[codes[rows]] = rows  # numpy assigns in order: the last occurrence wins
    return out


class BackboneRanker:
    def __init__(self, model: nn.Module, log: SessionLog, rows: np.ndarray | None = None, *,
                 item_fields: Sequence[str] | None = None, item_dense: Sequence[str] | None = None,
                 batch_size: int = 8192):
        spec = log.spec
        rows = np.arange(log.num_rows) if rows is None else np.asarray(rows, np.int64)
        if len(rows) == 0:
            raise ConfigError("no rows to take user and video features from", key="ranker")
        item_fields = [f for f in (item_fields or ITEM_SPARSE) if f in spec.sparse_fields]
        item_dense = [f for f in (item_dense or ITEM_DENSE) if f in spec.dense_fields]
        self.item_cols = np.asarray([spec.sparse_fields.index(f) for f in item_fields], np.int64)
        self.item_dense_cols = np.asarray([spec.dense_fields.index(f) for f in item_dense], np.int64)
        self.model = model.eval()
        self.log = log
        self.batch_size = int(batch_size)
        user_row = _last_row_of(log.user, rows, int(log.user.max()) + 1)
        self.user_row = np.where(user_row >= 0, user_row, rows[-1])  # unseen user: some row, user fields unknown
        self.user_unseen = user_row < 0
        item_row = _last_row_of(log.item, rows, int(log.item.max()) + 1)
        self.item_sparse = np.where((item_row >= 0)[:, None], log.sparse[np.maximum(item_row, 0)][:, self.item_cols], 0)
        self.item_dense = log.dense[np.maximum(item_row, 0)][:, self.item_dense_cols]
        self.user_cols = np.asarray([i for i in range(spec.num_sparse) if i not in set(self.item_cols.tolist())
                                     and spec.sparse_fields[i] == spec.user_field], np.int64)
        self.num_tasks = spec.num_tasks

    @torch.no_grad()
    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Probabilities [..., K] for broadcastable user and item code arrays."""
        users, items = np.broadcast_arrays(np.asarray(users, np.int64), np.asarray(items, np.int64))
        shape = users.shape
        u, i = users.reshape(-1), items.reshape(-1)
        sparse = self.log.sparse[self.user_row[u]].copy()
        sparse[:, self.item_cols] = self.item_sparse[i]
        if len(self.user_cols):
            sparse[np.ix_(self.user_unseen[u], self.user_cols)] = 0
        dense = self.log.dense[self.user_row[u]].copy()
        dense[:, self.item_dense_cols] = self.item_dense[i]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(u), self.batch_size):  # chunks, not rows
            s = torch.as_tensor(sparse[start:start + self.batch_size], device=device)
            d = torch.as_tensor(dense[start:start + self.batch_size], device=device)
            out.append(torch.sigmoid(self.model(s, d).float()).cpu().numpy())
        probs = np.concatenate(out) if out else np.zeros((0, self.num_tasks), np.float32)
        return probs.reshape(*shape, self.num_tasks).astype(np.float32)


def fit_backbone(log: SessionLog, name: str = "mmoe", options: dict | None = None, *, epochs: int = 1,
                 batch_size: int = 512, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """A backbone from rmtl.backbones fitted with equal-weight BCE on the train split (a short,
    self-contained loop: the ranker only needs reasonable predictions, not rmtl.train's machinery)."""
    from rmtl.backbones import build
    from rmtl.data.batches import BatchIterator

    torch.manual_seed(seed)
    model = build(name, log.spec, **(options or {}))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train = log.split("train")
    model.train()
    for epoch in range(int(epochs)):
        for batch in BatchIterator(train, batch_size, shuffle=True, seed=seed + epoch):
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch.sparse, batch.dense), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
