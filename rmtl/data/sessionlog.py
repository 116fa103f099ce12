"""SessionLog: the columnar, session-sorted event log every later stage reads.

Rows are sorted by (session, time). Sessions are ordered by start time, so the
train / val / test splits are contiguous ranges of sessions (``splits``) and a split
is a zero-copy view (``log.split("train")``). States in envs and replay buffers are
ROW INDICES into these arrays, never copies of feature rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rmtl.data.spec import FeatureSpec

SPLITS = ("train", "val", "test")


@dataclass
class SessionLog:
    spec: FeatureSpec
    session_ptr: np.ndarray  # int64 [S+1], CSR offsets of sessions into the rows
    user: np.ndarray  # int64 [N], user code (factorised over the whole log; for grouping, not a feature)
    item: np.ndarray  # int64 [N], item code (likewise)
    time: np.ndarray  # int64 [N], event time in milliseconds (row order where the source has none)
    sparse: np.ndarray  # int64 [N, F], vocabulary indices fitted on train; 0 = unknown
    dense: np.ndarray  # float32 [N, D]
    labels: np.ndarray  # float32 [N, K], values in {0, 1}
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> [first, last) session

    def __post_init__(self) -> None:
        n = len(self.user)
        for name in ("item", "time", "sparse", "dense", "labels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SessionLog.{name} has {len(getattr(self, name))} rows, expected {n}")
        if self.session_ptr[0] != 0 or self.session_ptr[-1] != n:
            raise ValueError("session_ptr must start at 0 and end at the number of rows")

    @property
    def num_rows(self) -> int:
        return int(len(self.user))

    @property
    def num_sessions(self) -> int:
        return int(len(self.session_ptr) - 1)

    def session_lengths(self) -> np.ndarray:
        return np.diff(self.session_ptr)

    def session_of_row(self) -> np.ndarray:
        """int64 [N]: the (local) session index of every row."""
        return np.repeat(np.arange(self.num_sessions, dtype=np.int64), self.session_lengths())

    def split(self, name: str) -> "SessionLog":
        """A view of one split's sessions (arrays are slices, not copies)."""
        if name not in self.splits:
            raise KeyError(f"split '{name}' not in this log; has {sorted(self.splits)}")
        first, last = self.splits[name]
        lo, hi = int(self.session_ptr[first]), int(self.session_ptr[last])
        return SessionLog(
            spec=self.spec,
            session_ptr=self.session_ptr[first : last + 1] - lo,
            user=self.user[lo:hi],
            item=self.item[lo:hi],
            time=self.time[lo:hi],
            sparse=self.sparse[lo:hi],
            dense=self.dense[lo:hi],
            labels=self.labels[lo:hi],
            splits={name: (0, last - first)},
        )
