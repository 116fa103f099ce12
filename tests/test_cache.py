"""The SessionLog cache through prepare(): hit, miss on changed input or option, atomicity."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from rmtl.data import cache, sources, synthetic
from rmtl.data.prepare import format_summary, prepare
from rmtl.errors import ConfigError, DataError
from test_census import small_rows, write

ARRAYS = ("session_ptr", "user", "item", "time", "sparse", "dense", "labels")


@pytest.fixture
def census_file(tmp_path):
    (tmp_path / "raw").mkdir()
    return write(tmp_path / "raw" / "census-income.data", small_rows(20))


def entries(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_second_prepare_hits_the_cache_with_identical_arrays(tmp_path, census_file):
    root = tmp_path / "cache"
    first = prepare("census", census_file, cache_dir=root)
    second = prepare("census", census_file, cache_dir=root)
    assert not first.from_cache and second.from_cache
    assert first.cache_path == second.cache_path and cache.exists(second.cache_path)
    for name in ARRAYS:
        a, b = getattr(first.log, name), getattr(second.log, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert second.log.spec == first.log.spec and second.log.splits == first.log.splits
    assert second.summary == first.summary
    assert second.log.split("train").num_rows == 10  # census default 50/25/25
    assert "income" in format_summary(second.summary)
    assert entries(root) == [first.cache_path.name]  # no temporary folder left


def test_changed_input_or_option_misses(tmp_path, census_file):
    root = tmp_path / "cache"
    base = prepare("census", census_file, cache_dir=root)
    other_option = prepare("census", census_file, cache_dir=root, min_count=2)
    assert not other_option.from_cache and other_option.cache_path != base.cache_path
    write(census_file, small_rows(21))  # same name, new content
    changed = prepare("census", census_file, cache_dir=root)
    assert not changed.from_cache and changed.cache_path not in (base.cache_path, other_option.cache_path)
    assert changed.log.num_rows == 21
    again = prepare("census", census_file, cache_dir=root)
    assert again.from_cache and again.cache_path == changed.cache_path


def test_fingerprint_sees_a_change_beyond_the_first_mib(tmp_path):
    f = tmp_path / "big.csv"
    data = bytearray(b"x" * (3 << 20))
    f.write_bytes(bytes(data))
    before = cache.fingerprint(f, [f])
    data[-10] = ord("y")
    f.write_bytes(bytes(data))
    os.utime(f, ns=(before[0]["mtime_ns"], before[0]["mtime_ns"]))  # same size and mtime
    assert cache.fingerprint(f, [f])[0]["head_tail"] != before[0]["head_tail"]


def test_failing_build_leaves_no_cache_folder(tmp_path):
    rows = small_rows(5)
    rows[2][0] = "not-an-age"
    bad = write(tmp_path / "census-income.data", rows)
    root = tmp_path / "cache"
    with pytest.raises(DataError, match="'age'"):
        prepare("census", bad, cache_dir=root)
    assert entries(root) == []


def test_crash_while_writing_leaves_nothing_half_written(tmp_path, census_file, monkeypatch):
    root = tmp_path / "cache"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache.pq, "write_table", boom)
    with pytest.raises(DataError, match="disk full"):  # one clear error naming the entry
        prepare("census", census_file, cache_dir=root)
    assert entries(root) == []
    monkeypatch.undo()
    assert not prepare("census", census_file, cache_dir=root).from_cache


def test_no_cache_neither_reads_nor_writes(tmp_path, census_file):
    root = tmp_path / "cache"
    p = prepare("census", census_file, cache_dir=root, use_cache=False)
    assert p.cache_path is None and not p.from_cache and entries(root) == []


def test_bad_source_and_options_are_config_errors(tmp_path, census_file):
    with pytest.raises(ConfigError, match="retailrocket"):
        prepare("movielens", census_file, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="split_ratios"):
        prepare("census", census_file, cache_dir=tmp_path, split_ratios=(0.9, 0.2, 0.2))
    with pytest.raises(ConfigError, match="session_gap"):
        prepare("census", census_file, cache_dir=tmp_path, session_gap=-5)
    with pytest.raises(DataError, match="--data-dir"):
        prepare("census", None, cache_dir=tmp_path)
    with pytest.raises(DataError, match="no such file"):
        prepare("census", tmp_path / "absent", cache_dir=tmp_path)


def test_embedded_default_is_written_once_and_read_by_the_real_reader(tmp_path, monkeypatch):
    """data_dir=None: the writer runs once into <root>/synthetic/<schema>-default-<writer version> (a local
    stand-in writer of census files here, so the mechanism is tested without the others' writers)."""
    calls = []

    def fake_writer(out_dir, *, users, items, seed=0):
        calls.append(out_dir)
        write(out_dir / "census-income.data", small_rows(users))
        return {"data": out_dir / "census-income.data"}

    census = sources.get_source("census")
    monkeypatch.setitem(sources._SOURCES, "census", dataclasses.replace(
        census, synthetic_writer=fake_writer, synthetic_sizes={"users": 15, "items": 0}))
    root = tmp_path / "cache"
    first = prepare("census", cache_dir=root)
    second = prepare("census", cache_dir=root)
    assert len(calls) == 1 and second.from_cache
    assert first.data_dir.parent == root / "synthetic" and first.data_dir.name.startswith("census-default-")
    assert first.log.num_rows == 15
    assert not [p for p in (root / "synthetic").iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("schema", ["retailrocket", "kuairand"])
def test_synthetic_default_of_each_schema_prepares(tmp_path, schema, monkeypatch):
    monkeypatch.setitem(sources._SOURCES, schema, dataclasses.replace(
        sources.get_source(schema), synthetic_sizes={"users": 60, "items": 40}))
    p = prepare(schema, cache_dir=tmp_path)
    assert p.log.spec.tasks == ["ctr", "ctcvr"]
    assert p.log.num_rows > 0 and all(p.log.split(s).num_sessions > 0 for s in ("train", "val", "test"))
    assert prepare(schema, cache_dir=tmp_path).from_cache


def test_synthetic_options_get_their_own_raw_folder(tmp_path, monkeypatch):
    def fake_writer(out_dir, *, users, items, seed=0):
        write(out_dir / "census-income.data", small_rows(users))
        return {}

    census = sources.get_source("census")
    monkeypatch.setitem(sources._SOURCES, "census", dataclasses.replace(
        census, synthetic_writer=fake_writer, synthetic_sizes={"users": 15, "items": 0}))
    small = prepare("census", cache_dir=tmp_path, synthetic={"users": 12})
    default = prepare("census", cache_dir=tmp_path)
    assert small.log.num_rows == 12 and default.log.num_rows == 15
    assert small.data_dir != default.data_dir and default.data_dir.name.startswith("census-default-")
    with pytest.raises(ConfigError, match="synthetic"):
        prepare("census", tmp_path, cache_dir=tmp_path, synthetic={"users": 3})


def test_cache_root_inside_the_data_folder_is_not_an_input(tmp_path, census_file):
    root = census_file.parent / "cache"
    first = prepare("census", census_file.parent, cache_dir=root)
    assert prepare("census", census_file.parent, cache_dir=root).from_cache  # its own entry changed nothing
    assert first.log.num_rows == 20


def test_vocabularies_come_back_from_the_cache(tmp_path, census_file):
    root = tmp_path / "cache"
    built = prepare("census", census_file, cache_dir=root)
    cached = prepare("census", census_file, cache_dir=root)
    assert cached.from_cache
    for name in built.log.spec.sparse_fields:
        a, b = built.vocabularies[name], cached.vocabularies[name]
        assert a.index.equals(b.index) and np.array_equal(a.to_numpy(), b.to_numpy()), name
    f = built.log.spec.field_index("education")
    assert cached.encode("education", ["edu0", "edu1", "never-seen"]).tolist()[2] == 0
    assert set(cached.encode("education", ["edu0", "edu1"]).tolist()) == set(built.log.split("train").sparse[:, f].tolist())
    with pytest.raises(DataError, match="nope"):
        cached.encode("nope", [1])
