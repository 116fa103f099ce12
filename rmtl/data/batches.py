"""Mini-batches over a SessionLog split: tensors sliced straight from the arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rmtl.data.sessionlog import SessionLog


@dataclass
class Batch:
    rows: torch.Tensor  # int64 [B], row indices into the split's SessionLog
    sparse: torch.Tensor  # int64 [B, F]
    dense: torch.Tensor  # float32 [B, D]
    labels: torch.Tensor  # float32 [B, K]
    session: torch.Tensor  # int64 [B], session index within the split
    user: torch.Tensor  # int64 [B], user code (for GAUC)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.rows, self.sparse, self.dense, self.labels, self.session, self.user)))


def gather_batch(log: SessionLog, rows: np.ndarray, session_of_row: np.ndarray | None = None) -> Batch:
    """The Batch of the given row indices (one fancy-index per array, no per-row Python)."""
    rows = np.asarray(rows, dtype=np.int64)
    if session_of_row is None:
        session = np.searchsorted(log.session_ptr, rows, side="right") - 1
    else:
        session = session_of_row[rows]
    return Batch(
        rows=torch.from_numpy(rows),
        sparse=torch.from_numpy(log.sparse[rows]),
        dense=torch.from_numpy(log.dense[rows]),
        labels=torch.from_numpy(log.labels[rows]),
        session=torch.from_numpy(np.ascontiguousarray(session, dtype=np.int64)),
        user=torch.from_numpy(log.user[rows]),
    )


class BatchIterator:
    """Iterates a split in fixed-size batches; shuffled per epoch under (seed, epoch).

    ``set_epoch(e)`` makes epoch e's order reproducible on its own, which is what a
    resumed run needs.
    """

    def __init__(self, log: SessionLog, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, device: str | torch.device = "cpu"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.log = log
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.epoch = 0
        self._session_of_row = log.session_of_row()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.log.num_rows
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = self.log.num_rows
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n, dtype=np.int64)
        for b in range(len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            batch = gather_batch(self.log, rows, self._session_of_row)
            yield batch if self.device.type == "cpu" else batch.to(self.device)
