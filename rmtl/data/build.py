"""RawEvents -> SessionLog: sessions, ordering, the 6:2:2 split, vocabularies, encoding.

Every step is a whole-column numpy / pandas operation (factorize, lexsort, bincount),
so a 3 M-row log builds in seconds. The conventions recorded in ``spec.extra``:

* sparse index 0 = missing, or a value never seen in the train split;
  index 1 = the shared bucket of values seen in train fewer than ``min_count`` times;
  indices 2.. = train values with count >= ``min_count``, in order of first appearance
  in the (session-sorted) train rows.
* dense columns: standardised with the train mean / std; NaN becomes the train mean
  (i.e. 0 after standardising); a constant column gets std 1.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from rmtl.data.raw import RawEvents
from rmtl.data.sessionlog import SPLITS, SessionLog
from rmtl.data.sessions import assign_sessions, group_time_order
from rmtl.data.sources import SPLIT_ORDERS, default_split_order, default_split_ratios
from rmtl.data.spec import FeatureSpec
from rmtl.errors import ConfigError, DataError

MISSING_INDEX = 0
RARE_INDEX = 1
FIRST_VALUE_INDEX = 2


def build_session_log(
    raw: RawEvents,
    *,
    session_gap: float | None = 1800.0,
    split_ratios: Sequence[float] | None = None,
    split_order: str | None = None,
    min_count: int = 1,
    seed: int = 0,
    vocab_out: dict | None = None,
) -> tuple[SessionLog, dict]:
    """Build the session-sorted, split and encoded SessionLog of a reader's RawEvents.

    Returns ``(log, summary)``; ``summary`` is JSON-friendly (counts, positive rates per
    task per split, rows dropped per reason from the reader and from here).
    ``vocab_out``: a dict to receive, per sparse field, the train vocabulary as a
    ``pd.Series`` raw value -> index (frequent values 2.., rare ones 1; anything absent is 0).
    """
    ratios = check_split_ratios(default_split_ratios(raw.source) if split_ratios is None else split_ratios)
    order_kind = check_split_order(split_order, raw.source)
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ConfigError(f"must be an integer >= 1, got {min_count!r}", key="min_count")
    min_count = int(min_count)
    frame = raw.frame
    where = f"{raw.source} events"
    _check_columns(raw, where)
    n_in = len(frame)
    if n_in == 0:
        raise DataError("no events left after reading; expected at least one row", path=where)

    user_codes = _codes(frame["user"], "user", where)
    time = _int_column(frame["time"], "time", where)
    dropped: dict[str, int] = {}

    # 1. Sessions: the reader's own ids, or cut here by the inactivity gap.
    # ``by_session`` sorts rows by (session, time), stably (ties keep the reader's order).
    if "session" in frame.columns:
        session = _codes(frame["session"], "session", where)
        by_session = group_time_order(session, time)
    else:
        session, by_session = assign_sessions(user_codes, time, session_gap)

    # 2. Drop sessions too short to be an episode (one-event sessions for logs).
    lengths = np.bincount(session)
    keep = lengths[session] >= raw.min_session_events
    kept = _kept_share(frame, raw.tasks, keep, where)
    if not keep.all():
        reason = "one-event session" if raw.min_session_events == 2 else f"session shorter than {raw.min_session_events} events"
        dropped[reason] = int((~keep).sum())
        if not keep.any():
            raise DataError(f"every session has fewer than {raw.min_session_events} events; nothing to build", path=where)
        by_session = by_session[keep[by_session]]

    # 3. Order: sessions by start time (or shuffled), rows by time within a session.
    s_sorted = session[by_session]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    n_sessions = len(starts)
    session_len = np.diff(np.r_[starts, len(by_session)])
    if order_kind == "time":
        # first row of each session (already time-sorted) is its start; ties -> session id
        session_rank_order = np.lexsort((s_sorted[starts], time[by_session[starts]]))
    else:
        session_rank_order = np.random.default_rng(seed).permutation(n_sessions)
    fixed_test = None
    if raw.test_column is not None:  # the given test rows go last, whole sessions
        fixed_test = frame[raw.test_column].to_numpy(dtype=bool)[by_session[starts]][session_rank_order]
        session_rank_order = np.r_[session_rank_order[~fixed_test], session_rank_order[fixed_test]]
    # rows of session j (in by_session order) are by_session[starts[j] : starts[j]+len[j]]
    new_len = session_len[session_rank_order]
    session_ptr = np.zeros(n_sessions + 1, dtype=np.int64)
    np.cumsum(new_len, out=session_ptr[1:])
    gather = np.repeat(starts[session_rank_order] - session_ptr[:-1], new_len) + np.arange(session_ptr[-1])
    order = by_session[gather]

    # 4. Split contiguous session ranges, sized by rows.
    if fixed_test is None:
        bounds = _split_bounds(session_ptr, ratios, where)
    else:  # train : val as ratios[0] : ratios[1] of the other rows; test = the given rows
        n_other = int((~fixed_test).sum())
        if n_other == 0 or n_other == n_sessions:
            raise DataError(f"the fixed test split needs rows on both sides; got {n_sessions - n_other} test and "
                            f"{n_other} other session(s)", path=where, column=raw.test_column)
        share = ratios[0] / (ratios[0] + ratios[1])
        bounds = _split_bounds(session_ptr[: n_other + 1], (share, 1.0 - share, 0.0), where)[:3] + [n_sessions]
    splits = {name: (bounds[i], bounds[i + 1]) for i, name in enumerate(SPLITS)}
    n_train_rows = int(session_ptr[bounds[1]])

    # 5. Encode column by column, gathering each in log order (no copy of the frame).
    sparse, cards, vocab_sizes, vocab = _encode_sparse(frame, order, raw.sparse, n_train_rows, min_count)
    if vocab_out is not None:
        vocab_out.update(vocab)
    dense, dense_stats = _encode_dense(frame, order, raw.dense, n_train_rows, where)
    labels = _encode_labels(frame, order, raw.tasks, where)

    spec = FeatureSpec(
        source=raw.source,
        sparse_fields=list(raw.sparse),
        cardinalities=cards,
        dense_fields=list(raw.dense),
        tasks=list(raw.tasks),
        user_field=raw.user_field,
        item_field=raw.item_field,
        author_field=raw.author_field,
        extra={
            "sparse_convention": {"missing_or_unseen": MISSING_INDEX, "rare": RARE_INDEX, "first_value": FIRST_VALUE_INDEX,
                                  "fitted_on": "train", "min_count": min_count},
            "train_vocab_sizes": vocab_sizes,
            "dense_stats": dense_stats,
            "split_order": order_kind,
            "split_ratios": list(ratios),
            "fixed_test": raw.test_column,
            "session_gap": None if "session" in frame.columns else session_gap,
        },
    )
    log = SessionLog(
        spec=spec,
        session_ptr=session_ptr,
        user=pd.factorize(user_codes[order])[0].astype(np.int64),
        item=pd.factorize(_codes(frame["item"], "item", where)[order])[0].astype(np.int64),
        time=np.ascontiguousarray(time[order]),
        sparse=sparse,
        dense=dense,
        labels=labels,
        splits=splits,
    )
    summary = _summary(raw, log, dropped, n_in)
    summary["sessions_kept"] = kept
    summary["warnings"] = list(raw.warnings) + _kept_warnings(kept)
    return log, summary


# ----------------------------------------------------------------------------- checks

def check_split_ratios(split_ratios: Sequence[float]) -> tuple[float, float, float]:
    try:
        ratios = tuple(float(r) for r in split_ratios)
    except (TypeError, ValueError):
        raise ConfigError(f"expected three numbers (train, val, test), got {split_ratios!r}", key="split_ratios") from None
    if len(ratios) != 3 or any(not math.isfinite(r) or r < 0 for r in ratios) or ratios[0] <= 0:
        raise ConfigError(f"expected three non-negative numbers with train > 0, got {split_ratios!r}", key="split_ratios")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError(f"must sum to 1, got {split_ratios!r} (sum {sum(ratios):g})", key="split_ratios")
    return ratios  # type: ignore[return-value]


def check_split_order(split_order: str | None, source: str) -> str:
    kind = split_order or default_split_order(source)  # e.g. census (rows without a time): random
    if kind not in SPLIT_ORDERS:
        raise ConfigError(f"expected one of {', '.join(SPLIT_ORDERS)}, got {split_order!r}", key="split_order")
    return kind


def _check_columns(raw: RawEvents, where: str) -> None:
    needed = ["user", "item", "time", *raw.sparse, *raw.dense, *raw.tasks]
    missing = [c for c in needed if c not in raw.frame.columns]
    if missing:
        raise DataError(f"reader returned no column(s) {missing}; has {list(raw.frame.columns)}", path=where, column=missing[0])
    if not raw.tasks:
        raise DataError("no task (label) columns; expected at least one", path=where)
    dup = {c for c in [*raw.sparse, *raw.dense, *raw.tasks] if [*raw.sparse, *raw.dense, *raw.tasks].count(c) > 1}
    if dup:
        raise DataError(f"column(s) {sorted(dup)} listed twice among sparse / dense / tasks", path=where, column=sorted(dup)[0])


def _codes(col: pd.Series, name: str, where: str) -> np.ndarray:
    codes, _ = pd.factorize(col, sort=False)
    if (codes < 0).any():
        raise DataError(f"{int((codes < 0).sum())} missing value(s); expected an id in every row", path=where, column=name)
    return codes.astype(np.int64, copy=False)


def _int_column(col: pd.Series, name: str, where: str) -> np.ndarray:
    if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
        raise DataError(f"expected integer milliseconds, got dtype {col.dtype}", path=where, column=name)
    values = col.to_numpy(dtype=np.float64, na_value=np.nan) if col.dtype.kind not in "iu" else col.to_numpy()
    if values.dtype.kind == "f" and np.isnan(values).any():
        raise DataError(f"{int(np.isnan(values).sum())} missing value(s); expected a time in every row", path=where, column=name)
    return values.astype(np.int64, copy=False)


def _split_bounds(session_ptr: np.ndarray, ratios: tuple[float, float, float], where: str) -> list[int]:
    """Session boundaries [0, a, b, S]: the session boundaries nearest to each row quota,
    moved where needed so that every split with a positive ratio keeps a session."""
    n_sessions = len(session_ptr) - 1
    wanted = sum(r > 0 for r in ratios)
    if n_sessions < wanted:
        raise DataError(f"only {n_sessions} usable session(s); need at least {wanted} to split by {list(ratios)}", path=where)
    quota = np.cumsum(ratios)[:2] * session_ptr[-1]
    right = np.clip(np.searchsorted(session_ptr, quota, side="left"), 1, n_sessions)
    left = right - 1
    nearest = np.where(quota - session_ptr[left] < session_ptr[right] - quota, left, right)
    a, b = int(nearest[0]), int(nearest[1])
    has_val, has_test = ratios[1] > 0, ratios[2] > 0
    a = min(max(a, 1), n_sessions - has_val - has_test)
    b = min(max(b, a + has_val), n_sessions - has_test) if has_val else a
    if not has_test:
        b = n_sessions
    return [0, a, b, n_sessions]


# ----------------------------------------------------------------------------- encoding

def _encode_sparse(frame: pd.DataFrame, order: np.ndarray, fields: list[str], n_train: int, min_count: int):
    n = len(order)
    columns, cards, vocab_sizes, vocab = [], [], {}, {}
    for name in fields:
        codes_all, uniques = pd.factorize(frame[name], sort=False)  # -1 = missing
        codes = codes_all[order]
        n_values = int(codes_all.max()) + 1 if len(codes_all) else 0
        train = codes[:n_train]
        counts = np.bincount(train[train >= 0], minlength=n_values)
        frequent = counts >= min_count
        lut = np.zeros(n_values + 1, dtype=np.int64)  # last slot: missing (code -1)
        lut[:n_values][(counts > 0) & ~frequent] = RARE_INDEX
        # codes are in order of first appearance in the raw rows; frequent values keep it
        lut[:n_values][frequent] = FIRST_VALUE_INDEX + np.arange(int(frequent.sum()))
        columns.append(lut[codes])
        cards.append(FIRST_VALUE_INDEX + int(frequent.sum()))
        vocab_sizes[name] = {"frequent": int(frequent.sum()), "rare": int(((counts > 0) & ~frequent).sum())}
        kept = counts > 0
        vocab[name] = pd.Series(lut[:n_values][kept], index=pd.Index(uniques)[kept], name=name)
    return _stack(columns, n, np.int64), cards, vocab_sizes, vocab


def encode_values(vocab: pd.Series, values) -> np.ndarray:
    """Indices of raw ``values`` under one field's vocabulary (as from ``vocab_out``):
    the same numbers the builder wrote; unseen or missing values get 0."""
    values = pd.Index(np.asarray(values, dtype=object) if isinstance(values, (pd.Categorical, pd.CategoricalIndex)) else values)
    pos = vocab.index.get_indexer(values)
    out = np.zeros(len(pos), dtype=np.int64)
    out[pos >= 0] = vocab.to_numpy()[pos[pos >= 0]]
    return out


def _encode_dense(frame: pd.DataFrame, order: np.ndarray, fields: list[str], n_train: int, where: str):
    n = len(order)
    columns, stats = [], {}
    for j, name in enumerate(fields):
        col = frame[name]
        if not pd.api.types.is_numeric_dtype(col):
            raise DataError(f"expected numbers, got dtype {col.dtype}", path=where, column=name)
        x = col.to_numpy(dtype=np.float64, na_value=np.nan)[order]
        if np.isinf(x).any():
            raise DataError(f"{int(np.isinf(x).sum())} infinite value(s); expected finite numbers or NaN", path=where, column=name)
        train = x[:n_train]
        seen = train[~np.isnan(train)]
        mean = float(seen.mean()) if len(seen) else 0.0
        std = float(seen.std()) if len(seen) else 1.0
        if not std > 0:
            std = 1.0
        z = (x - mean) / std
        z[np.isnan(z)] = 0.0
        columns.append(z.astype(np.float32))
        stats[name] = {"mean": mean, "std": std, "missing": int(np.isnan(x).sum())}
    return _stack(columns, n, np.float32), stats


def _encode_labels(frame: pd.DataFrame, order: np.ndarray, tasks: list[str], where: str) -> np.ndarray:
    columns = []
    for name in tasks:
        col = frame[name]
        if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            raise DataError(f"expected labels 0/1, got dtype {col.dtype}", path=where, column=name)
        y = col.to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isnan(y).any():
            raise DataError(f"{int(np.isnan(y).sum())} missing (NaN) label(s); expected 0 or 1 in every row", path=where, column=name)
        bad = (y != 0) & (y != 1)
        if bad.any():
            raise DataError(f"{int(bad.sum())} label(s) outside {{0, 1}} (e.g. {y[bad][0]:g}); expected 0 or 1", path=where, column=name)
        columns.append(y[order].astype(np.float32))
    return _stack(columns, len(order), np.float32)


def _stack(columns: list[np.ndarray], n: int, dtype) -> np.ndarray:
    """[n, len(columns)] row-major; one stack beats a strided fill per column."""
    if not columns:
        return np.zeros((n, 0), dtype=dtype)
    return np.stack(columns, axis=1).astype(dtype, copy=False)


# ----------------------------------------------------------------------------- summary

# Warn when the session rule drops more than this share of the rows, or moves a task's
# positive rate by more than this relative amount: the kept rows are then a biased sample.
KEPT_SHARE_WARNING = 0.8
RATE_SHIFT_WARNING = 0.05


def _kept_share(frame: pd.DataFrame, tasks: list[str], keep: np.ndarray, where: str) -> dict:
    """Share of the rows in sessions long enough to keep, and each task's positive rate among
    all rows vs. the kept rows (sparse logs lose most rows to one-event sessions, and not at random)."""
    out = {"share": float(keep.mean()) if len(keep) else 1.0, "rate_all": {}, "rate_kept": {}}
    for t in tasks:
        y = pd.to_numeric(frame[t], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        out["rate_all"][t] = float(np.nanmean(y)) if len(y) else None
        out["rate_kept"][t] = float(np.nanmean(y[keep])) if keep.any() else None
    return out


def _kept_warnings(kept: dict) -> list[str]:
    lines = []
    shifts = {t: kept["rate_kept"][t] / a - 1.0 for t, a in kept["rate_all"].items()
              if a and kept["rate_kept"].get(t) is not None}
    moved = {t: d for t, d in shifts.items() if abs(d) > RATE_SHIFT_WARNING}
    if kept["share"] < KEPT_SHARE_WARNING or moved:
        rates = ", ".join(f"{t} {kept['rate_all'][t]:.4f} -> {kept['rate_kept'][t]:.4f} ({d:+.1%})" for t, d in shifts.items())
        lines.append(f"the session rule keeps {kept['share']:.1%} of the rows (positive rate all -> kept: {rates}); "
                     "on a sparse log try a larger --session-gap or the reader option sessions=gap_keep_single / user_day "
                     "(KuaiRand), see docs/kuairand.md")
    return lines

def _summary(raw: RawEvents, log: SessionLog, dropped: dict[str, int], n_in: int) -> dict:
    splits = {}
    for name in SPLITS:
        part = log.split(name)
        rates = part.labels.mean(axis=0, dtype=np.float64) if part.num_rows else np.full(log.spec.num_tasks, np.nan)
        splits[name] = {
            "sessions": part.num_sessions,
            "rows": part.num_rows,
            "users": int(np.count_nonzero(np.bincount(part.user))) if part.num_rows else 0,
            "positive_rate": {t: (None if np.isnan(r) else float(r)) for t, r in zip(log.spec.tasks, rates)},
        }
    return {
        "source": raw.source,
        "events_read": int(raw.events_read),
        "impressions": int(n_in),
        "rows": log.num_rows,
        "sessions": log.num_sessions,
        "users": int(log.user.max()) + 1 if log.num_rows else 0,
        "items": int(log.item.max()) + 1 if log.num_rows else 0,
        "tasks": list(log.spec.tasks),
        "sparse_fields": dict(zip(log.spec.sparse_fields, log.spec.cardinalities)),
        "dense_fields": list(log.spec.dense_fields),
        "splits": splits,
        "dropped": {"reader": {k: int(v) for k, v in raw.dropped.items()}, "builder": dropped},
        # rows kept but worth reporting (e.g. a video without side features)
        "notes": {k: int(v) for k, v in getattr(raw, "notes", {}).items()},
    }
