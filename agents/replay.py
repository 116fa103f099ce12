"""Replay buffer of transitions that stores ROW INDICES and gathers features per batch."""

from __future__ import annotations

import numpy as np
import torch

from rmtl.data.sessionlog import SessionLog
from rmtl.envs.transitions import Transitions


class RowReplay:
    """All transitions of one split; ``sample`` draws a minibatch and gathers its features.

    Features stay in the SessionLog (as zero-copy tensors); a batch costs one index_select
    per array for the states and one for the next states.
    """

    def __init__(self, log: SessionLog, transitions: Transitions, device: str | torch.device = "cpu",
                 rows: np.ndarray | None = None, next_probs: torch.Tensor | None = None):
        """``rows`` (optional) restricts sampling to these transitions (a cross-fitting fold's
        complement); next states still come from the full log. ``next_probs`` [N, K]: a frozen
        actor's probabilities of every row; a batch then carries its next states' (``next_probs``)."""
        if len(transitions) == 0:
            raise ValueError("no transitions to replay")
        if not np.array_equal(transitions.state_row, np.arange(len(transitions))):
            # next_action below reads the behaviour action of row next_row at index next_row
            raise ValueError("RowReplay expects one transition per row, in row order (as build_transitions makes)")
        self.log = log
        self.device = torch.device(device)
        self.sparse = torch.from_numpy(np.ascontiguousarray(log.sparse))
        self.dense = torch.from_numpy(np.ascontiguousarray(log.dense))
        self.labels = torch.from_numpy(np.ascontiguousarray(log.labels))
        self.state_row = torch.from_numpy(transitions.state_row)
        self.next_row = torch.from_numpy(transitions.next_row)
        self.action = torch.from_numpy(transitions.action)
        self.reward = torch.from_numpy(transitions.reward)
        self.done = torch.from_numpy(transitions.done)
        ctx = transitions.context
        self.context = torch.from_numpy(np.ascontiguousarray(ctx, dtype=np.float32)) if ctx is not None else None
        self.next_probs = next_probs
        self.pool = None if rows is None else torch.from_numpy(np.asarray(rows, dtype=np.int64))
        if self.pool is not None and len(self.pool) == 0:
            raise ValueError("no transitions to replay in the given rows")

    def __len__(self) -> int:
        return int(self.state_row.shape[0] if self.pool is None else self.pool.shape[0])

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.sparse.index_select(0, rows).to(self.device, non_blocking=True),
                self.dense.index_select(0, rows).to(self.device, non_blocking=True))

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.batch(self.draw(batch_size, generator))

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """int64 [batch_size]: transitions drawn uniformly (with replacement) from the pool."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        return idx if self.pool is None else self.pool.index_select(0, idx)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The minibatch of transitions ``idx`` (int64, any rows of the log, pool or not)."""
        rows = self.state_row.index_select(0, idx)
        nxt = self.next_row.index_select(0, idx)
        sparse, dense = self.gather(rows)
        next_sparse, next_dense = self.gather(nxt)
        dev = self.device
        out = {
            "rows": rows, "next_rows": nxt, "sparse": sparse, "dense": dense, "next_sparse": next_sparse, "next_dense": next_dense,
            "action": self.action.index_select(0, idx).to(dev), "reward": self.reward.index_select(0, idx).to(dev),
            "done": self.done.index_select(0, idx).to(dev), "labels": self.labels.index_select(0, rows).to(dev),
            "next_action": self.action.index_select(0, nxt).to(dev),
        }
        if self.next_probs is not None:
            out["next_probs"] = self.next_probs.index_select(0, nxt.to(self.next_probs.device))
        if self.context is not None:
            out["context"] = self.context.index_select(0, rows).to(dev)
            out["next_context"] = self.context.index_select(0, nxt).to(dev)
        return out
