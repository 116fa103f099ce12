"""Out-of-core (sharded) prepare of KuaiRand logs equals the in-memory prepare on the same files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from rmtl.data import shards as shards_mod
from rmtl.data.kuairand import LOG_COLUMNS
from rmtl.data.prepare import prepare
from rmtl.data.shards import load_log, prepare_sharded, rank_files, shard_of
from rmtl.data.synth_kuairand import write_kuairand
from rmtl.errors import ConfigError, DataError
from shared_data import shared_path

# The dense mean / std are merged from per-shard (count, mean, M2): equal to numpy's
# one-pass mean / std up to float64 rounding, so the standardised float32 values may
# differ in the last bit. Everything else must be identical.
DENSE_STATS_RTOL = 1e-12
DENSE_ATOL = 1e-6


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kr")
    write_kuairand(out, users=150, items=400, seed=5, missing_video_features=0.1, random_share=0.1)
    return out


def assert_same(ref, sp) -> None:
    """The in-memory Prepared ``ref`` and the ShardedPrepared ``sp`` hold the same log."""
    a, b = ref.log, sp.load_log()
    assert a.splits == b.splits
    for name in ("session_ptr", "user", "item", "time", "sparse", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.dense, b.dense, rtol=0, atol=DENSE_ATOL)
    sa, sb = a.spec.to_dict(), b.spec.to_dict()
    da, db = sa["extra"].pop("dense_stats"), sb["extra"].pop("dense_stats")
    assert sa == sb
    assert da.keys() == db.keys()
    for name in da:
        assert da[name]["missing"] == db[name]["missing"]
        np.testing.assert_allclose([da[name]["mean"], da[name]["std"]], [db[name]["mean"], db[name]["std"]],
                                   rtol=DENSE_STATS_RTOL, err_msg=name)
    va, vb = ref.vocabularies, sp.vocabularies
    assert list(va) == list(vb)
    for name in va:
        assert list(va[name].index.astype(object)) == list(vb[name].index.astype(object)), name
        np.testing.assert_array_equal(va[name].to_numpy(), vb[name].to_numpy(), err_msg=name)
    keys = ["events_read", "impressions", "rows", "sessions", "users", "items", "tasks", "sparse_fields",
            "dense_fields", "splits", "dropped", "notes", "sessions_kept", "warnings"]
    assert {k: ref.summary[k] for k in keys} == {k: sp.summary[k] for k in keys}


CASES = [  # (builder / reader options, shards, worker processes)
    ({}, 5, 2),
    ({}, 1, 1),
    ({"min_count": 3, "reader_options": {"sessions": "user_day", "users": 100}}, 4, 1),
    ({"split_order": "random", "seed": 3, "reader_options": {"sessions": "gap_keep_single", "include_random": True}}, 3, 1),
    ({"session_gap": None, "reader_options": {"video_features": ["author_id", "tag", "upload_dt"],
                                               "keep_duplicates": True}}, 6, 1),
]


@pytest.mark.parametrize("options, n_shards, workers", CASES)
def test_sharded_equals_in_memory_on_synthetic_files(synth, tmp_path, options, n_shards, workers):
    ref = prepare("kuairand", synth, cache_dir=tmp_path / "mem", **options)
    sp = prepare_sharded(synth, shards=n_shards, cache_dir=tmp_path / "shards", workers=workers, **options)
    assert not sp.from_cache
    assert_same(ref, sp)
    again = prepare_sharded(synth, shards=n_shards, cache_dir=tmp_path / "shards", workers=workers, **options)
    assert again.from_cache and again.path == sp.path
    assert not list((tmp_path / "shards").glob(".tmp-*"))


def test_shard_layout_partitions_users_and_keeps_log_order(synth, tmp_path):
    sp = prepare_sharded(synth, shards=4, cache_dir=tmp_path, workers=1)
    meta = json.loads((sp.path / "meta.json").read_text())
    users_seen = {}
    total = 0
    for info in meta["shards"]:
        table = pq.read_table(sp.path / info["file"])
        row = table.column("row").to_numpy()
        assert (np.diff(row) > 0).all()  # log order inside a shard
        assert (np.diff(table.column("session").to_numpy()) >= 0).all()
        assert info["rows"] == table.num_rows == sum(info["rows_by_split"].values())
        for u in np.unique(table.column("user").to_numpy()):
            assert users_seen.setdefault(int(u), info["shard"]) == info["shard"]  # a user lives in one shard
        total += table.num_rows
    assert total == meta["num_rows"]
    assert sorted(p.name for p in sp.path.iterdir()) == sorted(["meta.json", "vocab.parquet", *[s["file"] for s in meta["shards"]]])
    # each of 3 ranks reads its own shards (round-robin): together every row once, each in the global order
    full = sp.load_log()
    seen = []
    for rank in range(3):
        files = rank_files(meta, rank, 3)
        assert files == [s["file"] for s in meta["shards"][rank::3]]
        part = load_log(sp.path, files)
        assert part.num_rows == sum(s["rows"] for s in meta["shards"][rank::3])
        rows = np.concatenate([pq.read_table(sp.path / f, columns=["row"]).column("row").to_numpy() for f in files])
        rows.sort()
        np.testing.assert_array_equal(part.sparse, full.sparse[rows])
        np.testing.assert_array_equal(part.time, full.time[rows])
        assert sum(b - a for a, b in part.splits.values()) == part.num_sessions
        seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(full.num_rows))


def test_shard_of_spreads_consecutive_ids():
    counts = np.bincount(shard_of(np.arange(10_000), 8), minlength=8)
    assert counts.min() > 1_100 and counts.max() < 1_400
    np.testing.assert_array_equal(shard_of(np.arange(50), 8), shard_of(np.arange(50), 8))


# ------------------------------------------------- hand-made ties: the global tie-break and the vocab merge

T0 = 1649412000000  # 2022-04-08 18:00 Beijing


def _tied_release(folder: Path) -> Path:
    """Users whose sessions start at the same millisecond, appearing in the file in an order
    unlike their ids; a video seen first in a one-event (dropped) session."""
    rows = []
    users = [50, 3, 81, 1, 7]  # file order; ids out of order on purpose
    for k, u in enumerate(users):
        for s, start in enumerate([T0, T0 + 2 * 3600_000]):
            for j in range(3):
                rows.append({"user_id": u, "video_id": 100 + (7 * (k + s + j)) % 11, "time_ms": start + 60_000 * j})
    rows.insert(0, {"user_id": 7, "video_id": 999, "time_ms": T0 - 5 * 3600_000})  # one-event session, dropped
    log = pd.DataFrame(rows)
    for c in LOG_COLUMNS:
        if c not in log:
            log[c] = 0
    log["is_click"] = (log.index % 3 == 0).astype(int)
    log["long_view"] = (log.index % 2 == 0).astype(int)
    log["duration_ms"] = 20_000 + 1_000 * log.index
    log["date"], log["hourmin"], log["tab"] = 20220408, 1800, 1
    folder.mkdir(parents=True, exist_ok=True)
    log[LOG_COLUMNS].to_csv(folder / "log_standard_4_08_to_4_21_1k.csv", index=False)
    return folder


def test_ties_across_shards_follow_the_builders_session_ids(tmp_path):
    folder = _tied_release(tmp_path / "tied")
    opts = {"reader_options": {"user_features": [], "video_features": []}, "split_ratios": (0.5, 0.25, 0.25)}
    ref = prepare("kuairand", folder, use_cache=False, **opts)
    for n in (1, 2, 3, 5):
        assert_same(ref, prepare_sharded(folder, shards=n, cache_dir=tmp_path / f"s{n}", workers=1, **opts))
    assert len(np.unique(shard_of(np.array([50, 3, 81, 1, 7]), 3))) > 1  # the tie spans shards
    # a gzipped log is streamed alike
    gz = tmp_path / "gz"
    gz.mkdir()
    name = "log_standard_4_08_to_4_21_1k.csv"
    with open(folder / name, "rb") as src, gzip.open(gz / f"{name}.gz", "wb") as dst:
        dst.write(src.read())
    sp = prepare_sharded(gz, shards=3, cache_dir=tmp_path / "gzc", workers=1, **opts)
    np.testing.assert_array_equal(sp.load_log().sparse, ref.log.sparse)


def test_a_broken_tie_break_or_vocab_merge_is_caught(tmp_path, monkeypatch):
    folder = _tied_release(tmp_path / "tied")
    opts = {"reader_options": {"user_features": [], "video_features": []}, "split_ratios": (0.5, 0.25, 0.25)}
    ref = prepare("kuairand", folder, use_cache=False, **opts)

    real_order = shards_mod._time_order
    # drops the session-id tie-break: start time, then shard
    monkeypatch.setattr(shards_mod, "_time_order", lambda start, k1: np.argsort(start, kind="stable"))
    with pytest.raises(AssertionError):
        assert_same(ref, prepare_sharded(folder, shards=3, cache_dir=tmp_path / "a", workers=1, **opts))
    monkeypatch.setattr(shards_mod, "_time_order", real_order)

    real_result = shards_mod._Fold.result

    def last_not_first(self):  # a merge that keeps the LAST appearance
        if self.op == "min":
            values, numbers = real_result(self)
            got = {}
            for v, k in zip(*[np.concatenate([p[i] for p in self.parts]) for i in (0, 1)]):
                got[v] = max(got.get(v, k), k)
            return values, np.array([got[v] for v in values])
        return real_result(self)

    monkeypatch.setattr(shards_mod._Fold, "result", last_not_first)
    with pytest.raises(AssertionError):
        assert_same(ref, prepare_sharded(folder, shards=3, cache_dir=tmp_path / "b", workers=1, **opts))


# ------------------------------------------------- the real KuaiRand-Pure sample


@pytest.mark.parametrize("sessions", ["gap", "gap_keep_single", "user_day"])
def test_sharded_equals_in_memory_on_the_real_pure_sample(tmp_path, sessions):
    sample = shared_path("kuairand-pure-sample")
    opts = {"reader_options": {"sessions": sessions}}
    ref = prepare("kuairand", sample, use_cache=False, **opts)
    sp = prepare_sharded(sample, shards=8, cache_dir=tmp_path, workers=1, **opts)
    assert_same(ref, sp)
    assert sp.summary["dropped"]["reader"]  # the sample's duplicate impressions are dropped in both


# ------------------------------------------------- bad input


def test_bad_shards_value_is_a_config_error(synth, tmp_path):
    for bad in (0, -1, 2.5, True, "8", 10**6):
        with pytest.raises(ConfigError, match="shards"):
            prepare_sharded(synth, shards=bad, cache_dir=tmp_path / "bad")
    # "auto": one shard per AUTO_SHARD_BYTES of raw log
    monkey_bytes = sum(p.stat().st_size for p in synth.glob("log_standard*"))
    old = shards_mod.AUTO_SHARD_BYTES
    try:
        shards_mod.AUTO_SHARD_BYTES = monkey_bytes // 3 + 1
        sp = prepare_sharded(synth, shards="auto", cache_dir=tmp_path / "auto", workers=1)
    finally:
        shards_mod.AUTO_SHARD_BYTES = old
    assert sp.meta["layout"]["shards"] == 3
    with pytest.raises(ConfigError, match="workers"):
        prepare_sharded(synth, shards=2, workers=0, cache_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_missing_column_fails_with_one_line_and_writes_nothing(synth, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for p in synth.iterdir():
        (folder / p.name).symlink_to(p)
    log_name = "log_standard_4_22_to_5_08_1k.csv"
    (folder / log_name).unlink()
    pd.read_csv(synth / log_name).drop(columns=["tab"]).to_csv(folder / log_name, index=False)
    with pytest.raises(DataError, match="tab") as err:
        prepare_sharded(folder, shards=3, cache_dir=tmp_path / "cache", workers=1)
    assert log_name in str(err.value)
    assert not any((tmp_path / "cache").iterdir())  # no entry, no temporary folder


def test_cli_shards_flag(synth, tmp_path, capsys):
    from rmtl.cli import main

    assert main(["prepare", "--source", "kuairand", "--data-dir", str(synth), "--shards", "3",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "shards: miss, wrote" in out and "(3 shard files)" in out
    for argv in (["--shards", "0"], ["--shards", "many"], ["--shards", "3", "--no-cache"]):  # "auto" is fine
        try:  # argparse refuses a bad value by SystemExit(2), the command's own checks return 2
            code = main(["prepare", "--source", "kuairand", "--data-dir", str(synth), "--out", str(tmp_path), *argv])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "shards" in err
    assert main(["prepare", "--source", "retailrocket", "--shards", "3", "--out", str(tmp_path)]) == 2
    assert "KuaiRand" in capsys.readouterr().err


def test_chunked_synthetic_writer_appends_user_blocks(tmp_path):
    """The bench's 10^8-row logs are written in user blocks: same files and schema, users
    numbered across blocks, each log sorted by (user_id, time_ms), deterministic."""
    a = write_kuairand(tmp_path / "a", users=90, items=200, seed=4, users_per_chunk=40)
    b = write_kuairand(tmp_path / "b", users=90, items=200, seed=4, users_per_chunk=40)
    one = write_kuairand(tmp_path / "one", users=90, items=200, seed=4)
    assert sorted(p.name for p in a.values()) == sorted(p.name for p in one.values())
    for stem, path in a.items():
        assert path.read_bytes() == b[stem].read_bytes()
        frame = pd.read_csv(path)
        assert list(frame.columns) == list(pd.read_csv(one[stem], nrows=0).columns)
        if stem.startswith("log_"):
            assert frame.set_index(["user_id", "time_ms"]).index.is_monotonic_increasing
    users = pd.read_csv(a["user_features_1k"])
    assert list(users["user_id"]) == list(range(90))
    logs = pd.concat([pd.read_csv(p) for s, p in a.items() if s.startswith("log_standard")])
    assert logs["user_id"].max() > 40  # later blocks have rows
    with pytest.raises(ConfigError, match="users_per_chunk"):
        write_kuairand(tmp_path / "c", users=10, users_per_chunk=0)


def test_fold_sorts_each_row_a_logarithmic_number_of_times(monkeypatch):
    """The per-value tables (user ids seen, first pos, counts) are folded geometrically: a
    table holding more than FOLD_ROWS values is not re-sorted at every add (that made pass
    1 and the shard loop grow with the square of the users past ~1 M users)."""
    monkeypatch.setattr(shards_mod, "FOLD_ROWS", 100)
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 100_000, size=50) for _ in range(400)]  # 20,000 values, ~18,000 distinct
    # small ids take the dense-array paths, large ones (beyond SMALL_IDS) the sorting ones
    for parts, op in [(p, op) for p in (small, [v + (1 << 40) for v in small]) for op in ("set", "min", "sum")]:
        fold = shards_mod._Fold(op)
        for k, v in enumerate(parts):
            fold.add(v, None if op == "set" else np.full(len(v), (k * 7919) % 400 if op == "min" else 1))
        values, numbers = fold.result()
        allv = np.concatenate(parts)
        np.testing.assert_array_equal(values, np.unique(allv))
        if op == "sum":
            np.testing.assert_array_equal(numbers, np.unique(allv, return_counts=True)[1])
        if op == "min":
            keys = np.concatenate([np.full(50, (k * 7919) % 400) for k in range(400)])
            want = pd.Series(keys).groupby(allv).min()
            np.testing.assert_array_equal(numbers, want.to_numpy())
        assert 3 <= fold.folds <= 12, (op, fold.folds)  # was one fold per add (~390) once 100 values were held


# ------------------------------------------------- pass 1 in parallel: byte ranges of the log


def test_line_ranges_cut_at_line_starts_and_read_like_the_whole_file(tmp_path):
    import pyarrow.csv as pacsv

    from rmtl.data.csv_ranges import ByteRange, line_ranges

    path = tmp_path / "x.csv"
    # CRLF line ends, a quoted field without a newline, an empty line, a last line without a newline
    path.write_bytes(b"a,b,c\r\n" + b"".join(b"%d,%d,v%d\r\n" % (i, i * i, i) for i in range(40))
                     + b'40,1600,"v40"\r\n\r\n41,1681,v41')
    whole = pacsv.read_csv(path).to_pydict()
    assert whole["a"] == list(range(42))
    for parts in (1, 2, 3, 7, 50, 500):
        header_end, ranges = line_ranges(path, parts)
        assert header_end == 7 and ranges[0][0] == 7 and ranges[-1][1] == path.stat().st_size
        assert all(b == c for (_, b), (c, _) in zip(ranges[:-1], ranges[1:]))  # contiguous
        got, quoted = {"a": [], "b": [], "c": []}, []
        data = path.read_bytes()
        for a, b in ranges:
            assert data[a - 1:a] == b"\n"  # every range starts a line
            with ByteRange(path, header_end, a, b) as src:
                t = pacsv.open_csv(src, read_options=pacsv.ReadOptions(block_size=64)).read_all().to_pydict()
                quoted.append(src.quoted)
            for k in got:
                got[k] += t[k]
        assert got == whole
        assert sum(quoted) == 1  # only the range holding "v40" saw a quote
    assert line_ranges(tmp_path / "x.csv", 3)[1] is not None
    (tmp_path / "h.csv").write_bytes(b"a,b\n")
    assert line_ranges(tmp_path / "h.csv", 3)[1] is None  # no rows: read in one piece (its own error)
    (tmp_path / "q.csv").write_bytes(b'"a",b\n1,2\n')
    assert line_ranges(tmp_path / "q.csv", 3)[1] is None  # a quoted header: not cut


def _rewrite_logs(src: Path, dst: Path, quoted_file: str | None = None) -> Path:
    """The release in ``src`` with its logs written with CRLF line ends and no final newline;
    in ``quoted_file``, an extra (unread) column whose quoted text holds a newline."""
    dst.mkdir()
    for p in src.iterdir():
        if not p.name.startswith("log_"):
            (dst / p.name).symlink_to(p)
            continue
        frame = pd.read_csv(p)
        if p.name == quoted_file:
            frame["note"] = ["line one\nline two" if i % 97 == 5 else "x" for i in range(len(frame))]
        text = frame.to_csv(index=False, lineterminator="\r\n")
        (dst / p.name).write_bytes(text.rstrip("\r\n").encode())
    return dst


def test_parallel_partition_equals_one_reader(synth, tmp_path, monkeypatch):
    """Pass 1 with 2 workers over many byte ranges (CRLF, no final newline) gives the entry of
    one worker reading each file in one piece, and so the in-memory prepare's log; a file
    with a quoted newline is read in one piece (its cut ranges saw a quote)."""
    seen = []
    real = shards_mod._partition

    def spy(plan, raw_dir, shards, block_bytes, workers):
        part = real(plan, raw_dir, shards, block_bytes, workers)
        seen.append([t for t, _ in part["parts"]])
        return part

    monkeypatch.setattr(shards_mod, "_partition", spy)
    monkeypatch.setattr(shards_mod, "PARTITION_RANGE_BYTES", 20_000)  # ~8 ranges per log file
    monkeypatch.setattr(shards_mod, "PARTITION_ROWS", 300)
    crlf = _rewrite_logs(synth, tmp_path / "crlf")
    logs = sorted(p.name for p in crlf.glob("log_standard*"))  # log_random is not read by default
    ref = prepare("kuairand", crlf, cache_dir=tmp_path / "mem")
    one = prepare_sharded(crlf, shards=4, cache_dir=tmp_path / "one", workers=1)
    two = prepare_sharded(crlf, shards=4, cache_dir=tmp_path / "two", workers=2)
    assert len(seen[0]) == len(logs) and len(seen[1]) > 3 * len(logs)  # one part per file; many ranges
    assert_same(ref, one)
    assert_same(ref, two)
    for f in one.meta["shards"]:
        a, b = pq.read_table(one.path / f["file"]), pq.read_table(two.path / f["file"])
        assert a.equals(b), f["file"]

    quoted = _rewrite_logs(synth, tmp_path / "quoted", quoted_file=logs[0])
    ref_q = prepare("kuairand", quoted, cache_dir=tmp_path / "memq")
    two_q = prepare_sharded(quoted, shards=4, cache_dir=tmp_path / "twoq", workers=2)
    assert_same(ref_q, two_q)
    assert len(seen[1]) // 2 < len(seen[2]) < len(seen[1])  # the quoted file in one piece, the other cut
    assert not list((tmp_path / "twoq").glob(".tmp-*"))


def test_bad_value_in_a_later_range_names_the_row_of_the_whole_file(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "PARTITION_RANGE_BYTES", 20_000)
    folder = tmp_path / "bad"
    folder.mkdir()
    for p in synth.iterdir():
        (folder / p.name).symlink_to(p)
    name = "log_standard_4_22_to_5_08_1k.csv"
    frame = pd.read_csv(synth / name)
    frame.loc[len(frame) - 10, "is_click"] = 7
    (folder / name).unlink()
    frame.to_csv(folder / name, index=False)
    messages = []
    for workers in (1, 2):
        with pytest.raises(DataError) as err:
            prepare_sharded(folder, shards=3, cache_dir=tmp_path / f"c{workers}", workers=workers)
        messages.append(str(err.value))
        assert not any((tmp_path / f"c{workers}").iterdir())
    assert messages[0] == messages[1] and f"row {len(frame) - 9}" in messages[0]


def test_text_columns_are_read_as_one_object_per_distinct_value(synth):
    """The side files' text columns are read dictionary-encoded: equal cells share one str
    (8 B per row), not one string object per cell (what held most of the user side file's
    memory with millions of users); the values are the ones a plain read gives."""
    from rmtl.data import kuairand as kr

    path = synth / "user_features_1k.csv"
    cols = ["user_active_degree", "follow_user_num_range"]
    table, _ = kr._read_csv(path, ["user_id", *cols], "KuaiRand user_features")
    plain = pd.read_csv(path, usecols=cols, dtype=str, keep_default_na=False)
    for c in cols:
        values = table[c]
        assert values.dtype == object
        assert [v if v is not None else "" for v in values] == list(plain[c])
        assert len({id(v) for v in values}) == len(set(values)) < len(values) // 5


@pytest.mark.parametrize("bucket", [1, 2, 37])
def test_session_order_built_bucket_by_bucket_equals_one_sort(synth, tmp_path, monkeypatch, bucket):
    """The global session order is built one start-time bucket of SESSION_BUCKET sessions at
    a time (main-process memory: one bucket): with buckets of 1, 2 or 37 sessions the entry
    equals the in-memory prepare's, ties at one start time across shards included."""
    monkeypatch.setattr(shards_mod, "SESSION_BUCKET", bucket)
    monkeypatch.setattr(shards_mod, "SAMPLE_SESSIONS", 50)  # a strided sample of the start times
    calls = []
    real = shards_mod._time_order

    def spy(start, k1):
        calls.append(len(start))
        return real(start, k1)

    monkeypatch.setattr(shards_mod, "_time_order", spy)
    folder = _tied_release(tmp_path / "tied")
    opts = {"reader_options": {"user_features": [], "video_features": []}, "split_ratios": (0.5, 0.25, 0.25)}
    assert_same(prepare("kuairand", folder, use_cache=False, **opts),
                prepare_sharded(folder, shards=3, cache_dir=tmp_path / "t", workers=1, **opts))
    calls.clear()
    ref = prepare("kuairand", synth, cache_dir=tmp_path / "mem")
    assert_same(ref, prepare_sharded(synth, shards=4, cache_dir=tmp_path / "s", workers=2))
    assert len(calls) > 1 and sum(calls) == ref.log.num_sessions
    if bucket == 37:
        assert max(calls) < 4 * 37  # buckets of about SESSION_BUCKET sessions (edges from a sample)


def test_side_columns_factorised_block_by_block_equal_one_factorize():
    """The side files are read block by block, each sparse column kept as per-block codes:
    the merged codes and uniques are pd.factorize's of the whole column (first-appearance
    order, missing -> -1), for text and numbers, values recurring across blocks."""
    from rmtl.data.kuairand import _BlockCodes
    from rmtl.data.side_shards import GlobalCodes

    rng = np.random.default_rng(2)
    text = np.array(["b", "a", None, "c", "d", "e"], dtype=object)[rng.integers(0, 6, 3000)]
    nums = rng.integers(0, 40, 3000).astype(np.float64)
    nums[rng.random(3000) < 0.1] = np.nan
    for column in (text, nums):
        want_codes, want_uniques = pd.factorize(column, use_na_sentinel=True)
        for cuts in ([], [1, 2, 3], sorted(rng.choice(np.arange(1, 3000), 40, replace=False))):
            coded = _BlockCodes()
            growing = GlobalCodes()  # the user side file's split: codes against one growing table
            streamed = []
            for block in np.split(column, cuts):
                coded.add(block)
                streamed.append(growing.add(block))
            codes, uniques = coded.result()
            np.testing.assert_array_equal(codes, want_codes)
            assert list(uniques) == list(pd.Index(want_uniques))
            assert codes.dtype == np.int32
            np.testing.assert_array_equal(np.concatenate(streamed), want_codes)
            assert list(growing.result()) == list(pd.Index(want_uniques))
            assert growing.result().dtype == pd.Index(want_uniques).dtype


def test_take_or_fills_ids_without_a_side_row():
    from rmtl.data.kuairand import take_or

    codes = np.array([4, 5, 6], dtype=np.int32)
    np.testing.assert_array_equal(take_or(codes, np.array([2, -1, 0, -1]), -1), [6, -1, 4, -1])
    assert take_or(codes, np.array([1]), -1).dtype == np.int32
    np.testing.assert_array_equal(take_or(np.zeros(0, np.int32), np.array([-1, -1]), -1), [-1, -1])  # no side rows
    got = take_or(np.array([1.5]), np.array([0, -1]), np.nan, dtype=np.float64)
    assert got[0] == 1.5 and np.isnan(got[1])


# ------------------------------------------------- per-user state stays with its shard


@pytest.mark.parametrize("bucket", [1, 7])
def test_user_tables_ranked_bucket_by_bucket_and_never_held_whole(synth, tmp_path, monkeypatch, bucket):
    """The user field's tables (first pos, train counts, first rows, the user side file) stay
    beside each shard: the vocabulary order and the user codes are ranked one key range of
    RANK_BUCKET rows at a time (so at most RANK_BUCKET users at once in the main process),
    the vocabularies written VOCAB_WRITE_ROWS values at a time, and a worker loads only its
    shard's users' side rows. With buckets of 1 and 7 rows the entry equals the in-memory
    prepare's (rare users included: min_count 3)."""
    monkeypatch.setattr(shards_mod, "RANK_BUCKET", bucket)
    monkeypatch.setattr(shards_mod, "VOCAB_WRITE_ROWS", 5)
    held, side_rows = [], []
    real_slices, real_load = shards_mod._bucket_slices, shards_mod.side_shards.load

    def slices(*args):
        for spans, cols in real_slices(*args):
            held.append(len(next(iter(cols.values()))))
            yield spans, cols

    def load(out, s, info, users=None):
        side = real_load(out, s, info, users)
        side_rows.append((s, len(side["index"]), users))
        return side

    def whole_user_file(*args, **kwargs):
        raise AssertionError("the user side file was loaded whole")

    monkeypatch.setattr(shards_mod, "_bucket_slices", slices)
    monkeypatch.setattr(shards_mod.side_shards, "load", load)
    opts = {"min_count": 3}
    ref = prepare("kuairand", synth, cache_dir=tmp_path / "mem", **opts)
    monkeypatch.setattr(shards_mod.kr, "load_sides", whole_user_file)
    sp = prepare_sharded(synth, shards=4, cache_dir=tmp_path / "s", workers=1, **opts)
    assert_same(ref, sp)
    users = ref.summary["users"]
    assert max(held) <= bucket < users and sum(held) > users  # both rankings, bucket by bucket
    first_load = {}
    for s, rows, given in side_rows:  # each shard's own users only (passes 2, 3 and 4)
        assert given is not None and rows <= len(given) and (shard_of(given, 4) == s).all()
        first_load.setdefault(s, rows)
    logged = pd.concat([pd.read_csv(f, usecols=["user_id"]) for f in synth.glob("log_standard*.csv")])["user_id"].nunique()
    assert sum(first_load.values()) == logged  # pass 2: every user of the log, in its shard


@pytest.mark.parametrize("block", [None, 4096])
def test_video_side_file_read_in_the_prepares_block_size(synth, tmp_path, monkeypatch, block):
    """The video side file (cut to the log's videos, spilled in buckets) is streamed in the
    sharded prepare's block size (``block_bytes``, default STREAM_BLOCK_BYTES), not in
    kuairand.BLOCK_BYTES blocks read ahead (the main process's peak before, docs/shards.md);
    in small blocks the entry still equals the in-memory prepare's."""
    ref = prepare("kuairand", synth, cache_dir=tmp_path / "mem")
    reads = []
    real_iter = shards_mod.kr.iter_csv

    def iter_csv(path, *args, **kwargs):
        for got in real_iter(path, *args, **kwargs):
            if Path(path).name.startswith("video_features"):
                reads.append(kwargs.get("block_bytes"))
            yield got

    monkeypatch.setattr(shards_mod.kr, "iter_csv", iter_csv)
    sp = prepare_sharded(synth, shards=3, cache_dir=tmp_path / "s", workers=1, block_bytes=block)
    assert_same(ref, sp)
    assert reads and set(reads) == {block or shards_mod.STREAM_BLOCK_BYTES}
    if block:  # several blocks of the video file, each cut to the log's videos
        assert len(reads) > 1


VIDEO_OPTS = {"reader_options": {"video_features": ["author_id", "tag", "music_id", "upload_dt", "video_duration"]},
              "min_count": 2}


@pytest.mark.parametrize("bucket", [1, 7])
def test_video_side_table_spilled_in_buckets_and_never_held_whole(synth, tmp_path, monkeypatch, bucket):
    """The video side file is never loaded whole: it is spilled in buckets of at most
    VIDEO_BUCKET of the videos seen, read back one bucket at a time, and each shard keeps
    only its own videos' rows. With buckets of 1 and 7 videos (sparse, text and dense video
    columns) the entry equals the in-memory prepare's."""
    ref = prepare("kuairand", synth, cache_dir=tmp_path / "mem", **VIDEO_OPTS)
    monkeypatch.setattr(shards_mod, "VIDEO_BUCKET", bucket)
    read, kept = [], []
    real_read, real_load = shards_mod.video_buckets._read, shards_mod.video_buckets.load

    def read_bucket(out, b):
        data = real_read(out, b)
        read.append((out.name, len(data["video_id"])))
        return data

    def load(out, info, videos, own=None):
        side = real_load(out, info, videos, own)
        kept.append((len(side["index"]), set(side["index"]) <= set(videos)))
        return side

    def whole_video_file(*args, **kwargs):
        raise AssertionError("the video side file was loaded whole")

    monkeypatch.setattr(shards_mod.video_buckets, "_read", read_bucket)
    monkeypatch.setattr(shards_mod.video_buckets, "load", load)
    monkeypatch.setattr(shards_mod.kr, "load_side", whole_video_file)
    sp = prepare_sharded(synth, shards=3, cache_dir=tmp_path / "s", workers=1, **VIDEO_OPTS)
    assert_same(ref, sp)
    buckets = [rows for where, rows in read if where == "side"]
    logged = pd.concat([pd.read_csv(f, usecols=["video_id"]) for f in synth.glob("log_*.csv")])["video_id"]
    listed = pd.read_csv(next(synth.glob("video_features_basic*.csv")), usecols=["video_id"])["video_id"]
    with_side = len(set(logged) & set(listed))
    # every shard's pass 2 reads every bucket once, one at a time; passes 3, 4 their own rows
    assert max(buckets) <= bucket and sum(buckets) == 3 * with_side
    assert all(subset for _, subset in kept) and max(rows for rows, _ in kept) < with_side  # own videos only


@pytest.mark.parametrize("rank_bucket, video_bucket", [(1, 1), (7, 50)])
def test_video_tables_merged_and_ranked_bucket_by_bucket_and_never_held_whole(synth, tmp_path, monkeypatch,
                                                                                  rank_bucket, video_bucket):
    """The video field's tables (first pos, train counts, first rows) never reach the main
    process whole: each shard writes its videos' partial tables cut by the VIDEO_BUCKET
    buckets of video ids, a bucket's are merged over the shards alone (at most VIDEO_BUCKET
    videos), and the vocabulary order and item codes are ranked RANK_BUCKET rows at a time,
    the user field's code path. With tiny buckets the entry equals the in-memory prepare's
    (rare videos included: min_count 2, video side columns)."""
    ref = prepare("kuairand", synth, cache_dir=tmp_path / "mem", **VIDEO_OPTS)
    monkeypatch.setattr(shards_mod, "RANK_BUCKET", rank_bucket)
    monkeypatch.setattr(shards_mod, "VIDEO_BUCKET", video_bucket)
    held, merged, returned = [], [], []
    real_slices, real_merge = shards_mod._bucket_slices, shards_mod._merge_videos
    real_sessions, real_statistics = shards_mod._pass_sessions, shards_mod._pass_statistics

    def slices(*args):
        for spans, cols in real_slices(*args):
            if args[-1] == "videos":
                held.append(len(next(iter(cols.values()))))
            yield spans, cols

    def merge(b):
        rows = real_merge(b)
        mid = shards_mod._CTX["mid_dir"]
        merged.append(max(len(shards_mod._read_user(mid, b, k, kind="videos")) for k in ("id", "rowid")))
        return rows

    def sessions(s):  # what a worker hands the main process: no per-video table
        got = real_sessions(s)
        returned.append("video_id" in got[2] if isinstance(got, tuple) and len(got) == 4 else False)
        return got

    def statistics(s):
        got = real_statistics(s)
        returned.append("item" in got or "video_id" in got["counts"])
        return got

    monkeypatch.setattr(shards_mod, "_bucket_slices", slices)
    monkeypatch.setattr(shards_mod, "_merge_videos", merge)
    monkeypatch.setattr(shards_mod, "_pass_sessions", sessions)
    monkeypatch.setattr(shards_mod, "_pass_statistics", statistics)
    sp = prepare_sharded(synth, shards=3, cache_dir=tmp_path / "s", workers=1, **VIDEO_OPTS)
    assert_same(ref, sp)
    videos = ref.summary["items"]
    assert returned and not any(returned)
    assert max(merged) <= video_bucket < videos and len(merged) > 1  # merged one video bucket at a time
    assert max(held) <= rank_bucket < videos and sum(held) > videos  # vocabulary and item codes, by key range


def test_duplicated_video_id_is_the_one_readers_error(synth, tmp_path):
    """A video id listed twice in video_features_basic: the sharded prepare (which checks the
    buckets one at a time) fails with the in-memory reader's line; a duplicate of a video
    absent from the log is no error in either."""
    name = next(p.name for p in synth.glob("video_features_basic*.csv"))
    videos = pd.read_csv(synth / name)
    logged = np.unique(pd.concat([pd.read_csv(f, usecols=["video_id"]) for f in synth.glob("log_*.csv")])["video_id"])
    for case, extra in (("absent", videos.iloc[[0, 0]].assign(video_id=10**9)),
                        ("seen", videos[videos["video_id"].isin(logged)].iloc[[5, 2]])):
        folder = tmp_path / case
        folder.mkdir()
        for p in synth.iterdir():
            if p.name != name:
                (folder / p.name).symlink_to(p)
        pd.concat([videos, extra]).to_csv(folder / name, index=False)
        if case == "absent":
            assert_same(prepare("kuairand", folder, use_cache=False),
                        prepare_sharded(folder, shards=3, cache_dir=tmp_path / "ok", workers=1))
            continue
        with pytest.raises(DataError) as mem:
            prepare("kuairand", folder, use_cache=False)
        with pytest.raises(DataError) as sharded:
            prepare_sharded(folder, shards=3, cache_dir=tmp_path / "bad", workers=1)
        smallest = extra["video_id"].min()
        assert str(sharded.value) == str(mem.value) and f"2 duplicated id(s) (e.g. {smallest})" in str(mem.value)
        assert not any((tmp_path / "bad").iterdir())  # nothing half-written


def test_duplicated_user_id_is_the_one_readers_error(synth, tmp_path):
    """A user id listed twice in user_features: the sharded prepare (whose shards each check
    their own users) fails with the in-memory reader's line, naming the count and the
    smallest id over the whole file; a duplicate of a user absent from the log is no error
    in either (both cut the file to the log's users first)."""
    folder = tmp_path / "dup"
    folder.mkdir()
    for p in synth.iterdir():
        if p.name != "user_features_1k.csv":
            (folder / p.name).symlink_to(p)
    users = pd.read_csv(synth / "user_features_1k.csv")
    absent = users.iloc[[0]].assign(user_id=10**9)
    pd.concat([users, absent, absent]).to_csv(folder / "user_features_1k.csv", index=False)
    opts = {"reader_options": {"video_features": []}}
    assert_same(prepare("kuairand", folder, use_cache=False, **opts),
                prepare_sharded(folder, shards=3, cache_dir=tmp_path / "ok", workers=1, **opts))
    logged = np.unique(pd.read_csv(synth / "log_standard_4_08_to_4_21_1k.csv", usecols=["user_id"])["user_id"])
    twice = users[users["user_id"].isin(logged[[3, 8, 20]])]
    pd.concat([users, twice, absent, absent]).to_csv(folder / "user_features_1k.csv", index=False)
    with pytest.raises(DataError) as want:
        prepare("kuairand", folder, use_cache=False, **opts)
    with pytest.raises(DataError) as got:
        prepare_sharded(folder, shards=3, cache_dir=tmp_path / "bad", workers=2, **opts)
    assert str(got.value) == str(want.value) and "3 duplicated id(s)" in str(got.value)
    assert not any((tmp_path / "bad").iterdir())


def test_streamed_csv_read_stays_a_few_blocks_ahead(tmp_path, monkeypatch):
    """pyarrow's streaming CSV reader reads its source ahead without limit (a 118 MB user file
    was read whole before its 4th block was parsed): a streamed read (block_bytes given)
    keeps at most READ_AHEAD_BLOCKS blocks ahead of the batches taken, and reads every row."""
    import builtins
    import time

    from rmtl.data import kuairand as kr

    path = tmp_path / "user_features_1k.csv"
    pd.DataFrame({"user_id": np.arange(20_000), "register_days": np.arange(20_000) % 97}).to_csv(path, index=False)
    reads = []

    class Counted:
        def __init__(self, fh):
            self.fh = fh

        def read(self, size=-1):
            data = self.fh.read(size)
            reads.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def counted_open(file, mode="r", *args, **kwargs):
        fh = builtins.open(file, mode, *args, **kwargs)
        return Counted(fh) if mode == "rb" else fh

    monkeypatch.setattr(kr, "open", counted_open, raising=False)
    ahead, ids = [], []
    for data, _ in kr.iter_csv(path, ["user_id", "register_days"], "KuaiRand user_features", block_bytes=4096):
        time.sleep(0.01 if ids else 0.3)  # time for an unthrottled reader to run far ahead
        ahead.append(len(reads) - len(ids))
        ids.append(data["user_id"])
    np.testing.assert_array_equal(np.concatenate(ids), np.arange(20_000))
    assert len(ids) > 5 * kr.READ_AHEAD_BLOCKS
    assert max(ahead) <= kr.READ_AHEAD_BLOCKS + 1, ahead[:5]
