"""build_session_log: sessions, drops, the time split, train-only vocabularies, labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rmtl.data.build import build_session_log
from rmtl.data.raw import RawEvents
from rmtl.errors import ConfigError, DataError

MIN = 60_000  # ms


def make_raw(rows: list[tuple], *, sparse=("cat",), dense=("x",), tasks=("ctr", "ctcvr"), min_session_events=2, **extra) -> RawEvents:
    """rows: (user, item, time_ms, cat, x, ctr, ctcvr)."""
    frame = pd.DataFrame(rows, columns=["user", "item", "time", "cat", "x", "ctr", "ctcvr"])
    for k, v in extra.items():
        frame[k] = v
    return RawEvents(frame=frame, sparse=list(sparse), dense=list(dense), tasks=list(tasks), source="toy",
                     events_read=len(frame), dropped={"unknown event": 3}, min_session_events=min_session_events)


def sessions_log(n_users: int = 10, per_session: int = 3, spacing_min: int = 100) -> RawEvents:
    """User u has one session of ``per_session`` events starting at u * spacing minutes."""
    rows = []
    for u in range(n_users):
        for j in range(per_session):
            rows.append((f"u{u}", f"i{j}", (u * spacing_min + j) * MIN, f"c{u}", float(u), (u + j) % 2, 0))
    # shuffled input order: the builder must sort
    rng = np.random.default_rng(0)
    return make_raw([rows[i] for i in rng.permutation(len(rows))])


def test_session_gap_cuts_and_none_keeps_one_session_per_user():
    rows = [("a", 1, 0, "x", 0.0, 0, 0), ("a", 2, 10 * MIN, "x", 0.0, 1, 0), ("a", 3, 50 * MIN, "x", 0.0, 0, 0),
            ("a", 4, 55 * MIN, "x", 0.0, 1, 1), ("b", 1, 1 * MIN, "y", 1.0, 0, 0), ("b", 2, 2 * MIN, "y", 1.0, 0, 0)]
    log, _ = build_session_log(make_raw(rows), session_gap=1800.0, split_ratios=(1.0, 0.0, 0.0))
    assert log.num_sessions == 3  # a: [0, 10] and [50, 55]; b: [1, 2]
    assert sorted(log.session_lengths().tolist()) == [2, 2, 2]
    log, _ = build_session_log(make_raw(rows), session_gap=None, split_ratios=(1.0, 0.0, 0.0))
    assert sorted(log.session_lengths().tolist()) == [2, 4]


def test_rows_sorted_by_session_then_time_and_sessions_by_start():
    log, _ = build_session_log(sessions_log(), session_gap=1800.0)
    starts = log.time[log.session_ptr[:-1]]
    assert np.all(np.diff(starts) >= 0)
    for s in range(log.num_sessions):
        t = log.time[log.session_ptr[s]:log.session_ptr[s + 1]]
        assert np.all(np.diff(t) >= 0)
        assert len(np.unique(log.user[log.session_ptr[s]:log.session_ptr[s + 1]])) == 1


def test_one_event_sessions_dropped_and_counted():
    rows = [("a", 1, 0, "x", 0.0, 0, 0), ("a", 2, 1 * MIN, "x", 0.0, 1, 0),
            ("b", 1, 0, "y", 0.0, 1, 1),  # lone event
            ("a", 3, 300 * MIN, "x", 0.0, 0, 0),  # lone after a long gap
            ("c", 1, 5 * MIN, "z", 0.0, 0, 0), ("c", 2, 6 * MIN, "z", 0.0, 0, 0)]
    log, summary = build_session_log(make_raw(rows), split_ratios=(0.5, 0.5, 0.0))
    assert log.num_rows == 4 and log.num_sessions == 2
    assert summary["dropped"]["builder"] == {"one-event session": 2}
    assert summary["dropped"]["reader"] == {"unknown event": 3}
    assert summary["impressions"] == 6 and summary["rows"] == 4


def test_census_style_single_rows_are_kept():
    rows = [(i, 0, i, "x", float(i), i % 2, 0) for i in range(20)]
    log, _ = build_session_log(make_raw(rows, min_session_events=1))
    assert log.num_rows == 20 and log.num_sessions == 20


def test_time_split_is_contiguous_and_no_session_in_two_splits():
    log, summary = build_session_log(sessions_log(n_users=10), session_gap=1800.0)
    (a0, a1), (b0, b1), (c0, c1) = log.splits["train"], log.splits["val"], log.splits["test"]
    assert a0 == 0 and a1 == b0 and b1 == c0 and c1 == log.num_sessions
    assert (a1 - a0, b1 - b0, c1 - c0) == (6, 2, 2)
    train, val, test = (log.split(n) for n in ("train", "val", "test"))
    # later splits start after the earlier ones (sessions ordered by start time)
    assert train.time[train.session_ptr[:-1]].max() <= val.time[val.session_ptr[:-1]].min()
    assert val.time[val.session_ptr[:-1]].max() <= test.time[test.session_ptr[:-1]].min()
    users = [set(part.user.tolist()) for part in (train, val, test)]
    assert not (users[0] & users[1]) and not (users[1] & users[2])  # one session per user here
    assert summary["splits"]["train"]["rows"] == 18


def test_random_split_is_deterministic_under_seed():
    raw = sessions_log(n_users=30)
    a, _ = build_session_log(raw, split_order="random", seed=1)
    b, _ = build_session_log(raw, split_order="random", seed=1)
    c, _ = build_session_log(raw, split_order="random", seed=2)
    assert np.array_equal(a.user, b.user) and np.array_equal(a.time, b.time)
    assert not np.array_equal(a.time, c.time)
    t, _ = build_session_log(raw)
    assert not np.array_equal(a.time, t.time)  # random order differs from time order


def test_vocabulary_fitted_on_train_only():
    log, _ = build_session_log(sessions_log(n_users=10), session_gap=1800.0)
    f = log.spec.field_index("cat")
    train, test = log.split("train"), log.split("test")
    # every user has its own category, so test categories were never seen in train
    assert np.all(test.sparse[:, f] == 0)
    assert np.all(train.sparse[:, f] >= 2)
    assert log.spec.cardinalities[f] == 2 + 6  # 0, 1 and the six train categories
    assert log.sparse.max() < log.spec.cardinalities[f]


def test_rare_values_share_bucket_one_and_missing_is_zero():
    rows = [("a", 1, 0, "common", 0.0, 0, 0), ("a", 2, MIN, "common", 0.0, 0, 0),
            ("a", 3, 2 * MIN, "rare", 0.0, 0, 0), ("a", 4, 3 * MIN, None, 0.0, 0, 0),
            ("b", 1, 10 * MIN, "common", 0.0, 0, 0), ("b", 2, 11 * MIN, "rare2", 0.0, 0, 0)]
    log, summary = build_session_log(make_raw(rows), split_ratios=(1.0, 0.0, 0.0), min_count=2)
    cat = dict(zip(log.time.tolist(), log.sparse[:, 0].tolist()))
    assert cat[0] == cat[MIN] == cat[10 * MIN] == 2
    assert cat[2 * MIN] == cat[11 * MIN] == 1
    assert cat[3 * MIN] == 0
    assert log.spec.cardinalities == [3]
    assert log.spec.extra["sparse_convention"]["min_count"] == 2


def test_dense_standardised_with_train_statistics_and_nan_filled():
    log, _ = build_session_log(sessions_log(n_users=10), session_gap=1800.0)
    stats = log.spec.extra["dense_stats"]["x"]
    assert stats["mean"] == pytest.approx(2.5)  # train users 0..5
    train = log.split("train")
    assert abs(float(train.dense.mean())) < 1e-6 and float(train.dense.std()) == pytest.approx(1.0, abs=1e-5)
    rows = [("a", 1, 0, "x", np.nan, 0, 0), ("a", 2, MIN, "x", 2.0, 0, 0), ("a", 3, 2 * MIN, "x", 4.0, 0, 0)]
    log, _ = build_session_log(make_raw(rows), split_ratios=(1.0, 0.0, 0.0))
    assert log.dense.dtype == np.float32 and not np.isnan(log.dense).any()
    assert log.dense[0, 0] == 0.0  # NaN -> train mean -> 0


@pytest.mark.parametrize("bad", [2, -1, np.nan])
def test_labels_outside_zero_one_or_nan_are_rejected(bad):
    rows = [("a", 1, 0, "x", 0.0, 0, 0), ("a", 2, MIN, "x", 0.0, 1, 0), ("a", 3, 2 * MIN, "x", 0.0, 0, 0)]
    rows[1] = rows[1][:6] + (bad,)
    with pytest.raises(DataError, match="ctcvr"):
        build_session_log(make_raw(rows), split_ratios=(1.0, 0.0, 0.0))


def test_reader_sessions_are_used_and_bad_options_rejected():
    rows = [("a", 1, 0, "x", 0.0, 0, 0), ("a", 2, MIN, "x", 0.0, 1, 0), ("a", 3, 2 * MIN, "x", 0.0, 0, 0),
            ("a", 4, 3 * MIN, "x", 0.0, 0, 0)]
    raw = make_raw(rows, session=[7, 7, 9, 9])
    log, _ = build_session_log(raw, split_ratios=(0.5, 0.5, 0.0))
    assert log.session_lengths().tolist() == [2, 2]
    with pytest.raises(ConfigError, match="split_ratios"):
        build_session_log(raw, split_ratios=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="split_order"):
        build_session_log(raw, split_order="sideways")
    with pytest.raises(DataError, match="session"):
        build_session_log(raw, split_ratios=(0.2, 0.4, 0.4))  # 2 sessions cannot fill 3 splits
    missing = make_raw(rows)
    missing.frame.loc[1, "user"] = None
    with pytest.raises(DataError, match="'user'"):
        build_session_log(missing)


def test_summary_reports_reader_notes_and_formats_them():
    from rmtl.data.prepare import format_summary

    raw = sessions_log(n_users=5)
    raw.notes = {"item without properties": 4}
    _, summary = build_session_log(raw)
    assert summary["notes"] == {"item without properties": 4}
    text = format_summary(summary)
    assert "item without properties" in text and "unknown event" in text and "pos ctcvr" in text


def test_vocabularies_reproduce_the_encoding():
    from rmtl.data.build import encode_values

    rows = [("a", 1, 0, "common", 0.0, 0, 0), ("a", 2, MIN, "common", 0.0, 0, 0), ("a", 3, 2 * MIN, "rare", 0.0, 0, 0),
            ("a", 4, 3 * MIN, None, 0.0, 0, 0), ("b", 1, 10 * MIN, "late", 0.0, 0, 0), ("b", 2, 11 * MIN, "late", 0.0, 0, 0)]
    raw = make_raw(rows)
    vocab: dict = {}
    log, _ = build_session_log(raw, split_ratios=(0.5, 0.5, 0.0), min_count=2, vocab_out=vocab)
    assert dict(vocab["cat"]) == {"common": 2, "rare": 1}  # 'late' only in val: not in the vocabulary
    by_time = raw.frame.set_index("time")["cat"]
    assert np.array_equal(encode_values(vocab["cat"], by_time.loc[log.time].to_numpy()), log.sparse[:, 0])
    assert encode_values(vocab["cat"], ["late", "never", None]).tolist() == [0, 0, 0]
