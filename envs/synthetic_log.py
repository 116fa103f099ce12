"""A SessionLog made directly in memory (no raw files): for tests, benchmarks and examples.

Labels depend on the features through a random logistic model, so a backbone can learn
them; the second task is a sub-event of the first (like CTCVR within CTR).
"""

from __future__ import annotations

import numpy as np

from rmtl.data.sessionlog import SessionLog
from rmtl.data.spec import FeatureSpec


def random_session_log(num_sessions: int = 100, *, min_length: int = 2, max_length: int = 8,
                       cardinalities: tuple[int, ...] = (50, 200, 10), num_dense: int = 2,
                       tasks: tuple[str, ...] = ("ctr", "ctcvr"), split_ratios=(0.6, 0.2, 0.2),
                       seed: int = 0) -> SessionLog:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_length, max_length + 1, size=num_sessions)
    ptr = np.zeros(num_sessions + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    n = int(ptr[-1])
    session = np.repeat(np.arange(num_sessions), lengths)
    user = (session * 7919) % max(num_sessions // 2, 1)  # users own several sessions
    cards = np.asarray(cardinalities, dtype=np.int64)
    sparse = (rng.random((n, len(cards))) * (cards - 1)).astype(np.int64) + 1  # 1..card-1; 0 stays "unknown"
    sparse[:, 0] = user % (cards[0] - 1) + 1  # field 0 plays the user id
    dense = rng.standard_normal((n, num_dense)).astype(np.float32)
    # logistic model: one random score per (field, value) plus a dense projection, per task
    k = len(tasks)
    score = np.zeros((n, k), dtype=np.float64)
    for f, c in enumerate(cards):  # loop over the few fields, vectorised over rows
        score += rng.standard_normal((int(c), k))[sparse[:, f]]
    score += dense @ rng.standard_normal((num_dense, k)) * 0.5
    score = score / np.sqrt(len(cards) + 1) - np.linspace(0.5, 2.0, k)
    labels = (rng.random((n, k)) < 1 / (1 + np.exp(-score))).astype(np.float32)
    labels[:, 1:] *= labels[:, :1]  # later tasks happen only after the first (ctcvr <= ctr)
    spec = FeatureSpec(source="memory", sparse_fields=[f"f{i}" for i in range(len(cards))],
                       cardinalities=[int(c) for c in cards], dense_fields=[f"d{i}" for i in range(num_dense)],
                       tasks=list(tasks), user_field="f0")
    bounds = np.floor(np.cumsum(split_ratios) * num_sessions).astype(int)
    bounds[-1] = num_sessions
    splits = {"train": (0, int(bounds[0])), "val": (int(bounds[0]), int(bounds[1])), "test": (int(bounds[1]), num_sessions)}
    t = np.arange(n, dtype=np.int64) * 1000
    return SessionLog(spec=spec, session_ptr=ptr, user=user.astype(np.int64), item=sparse[:, 1].copy(), time=t,
                      sparse=sparse, dense=dense, labels=labels, splits=splits)
