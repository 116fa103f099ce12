"""The KuaiRand reader on the REAL KuaiRand-Pure sample (../shared/data/kuairand-pure-sample):
duplicates, hour stamping, sparse-log sessions, date-like features, release file sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rmtl.data.build import build_session_log
from rmtl.data.kuairand import DROP_DUPLICATE, read_kuairand
from rmtl.errors import ConfigError, DataError
from shared_data import shared_path

LOGS = ("log_standard_4_08_to_4_21_pure.csv", "log_standard_4_22_to_5_08_pure.csv")


@pytest.fixture(scope="module")
def sample() -> Path:
    return shared_path("kuairand-pure-sample")


@pytest.fixture(scope="module")
def raw_log(sample) -> pd.DataFrame:
    return pd.concat([pd.read_csv(sample / "data" / name) for name in LOGS], ignore_index=True)


def _linked_release(sample: Path, folder: Path, skip: tuple[str, ...] = ()) -> Path:
    """A release folder of symlinks to the sample's files (nothing copied), minus ``skip``."""
    folder.mkdir(parents=True)
    for f in (sample / "data").iterdir():
        if f.name not in skip:
            os.symlink(f, folder / f.name)
    return folder


def test_duplicate_impressions_are_dropped_and_counted(sample, raw_log):
    key = ["user_id", "video_id", "time_ms"]
    n_dup = int(raw_log.duplicated(key).sum())
    assert n_dup > 0  # the real log has them (some differ only in the hourmin stamp)
    raw = read_kuairand(sample)
    assert raw.events_read == len(raw_log)
    assert raw.dropped == {DROP_DUPLICATE: n_dup}
    assert len(raw.frame) == len(raw_log) - n_dup
    assert not raw.frame.duplicated(["user", "item", "time"]).any()
    kept = read_kuairand(sample, keep_duplicates=True)
    assert len(kept.frame) == len(raw_log) and kept.dropped == {}


def test_hour_and_weekday_come_from_time_ms_in_beijing_time(sample, raw_log):
    raw = read_kuairand(sample, keep_duplicates=True)
    local = pd.to_datetime(raw_log["time_ms"] + 8 * 3_600_000, unit="ms")
    np.testing.assert_array_equal(raw.frame["hour"].to_numpy(), local.dt.hour.to_numpy())
    np.testing.assert_array_equal(raw.frame["weekday"].to_numpy(), local.dt.day_of_week.to_numpy())
    # ... which is not what hourmin says: the real log stamps late minutes with the next hour
    differs = (raw_log["hourmin"] // 100).to_numpy() != raw.frame["hour"].to_numpy()
    assert 0.05 < differs.mean() < 0.4
    assert (local.dt.minute[differs] >= 20).all()


def test_sparse_log_summary_reports_kept_share_and_rate_shift(sample):
    raw = read_kuairand(sample)
    log, summary = build_session_log(raw, session_gap=1800.0)
    kept = summary["sessions_kept"]
    assert kept["share"] == pytest.approx(log.num_rows / len(raw.frame))
    assert kept["share"] < 0.8
    ctr_all = raw.frame["ctr"].mean()
    assert kept["rate_all"]["ctr"] == pytest.approx(ctr_all)
    assert kept["rate_kept"]["ctr"] < ctr_all  # the kept rows are biased (fewer clicks)
    assert any("keeps" in w and "sessions=gap_keep_single" in w for w in summary["warnings"])
    from rmtl.data.prepare import format_summary
    text = format_summary(summary)
    assert "session rule  keeps" in text and "warning: the session rule keeps" in text


def test_alternative_session_rules(sample):
    single = read_kuairand(sample, sessions="gap_keep_single")
    log, summary = build_session_log(single, session_gap=1800.0)
    assert log.num_rows == len(single.frame) and summary["sessions_kept"]["share"] == 1.0
    assert not [w for w in summary["warnings"] if "session rule" in w]
    day = read_kuairand(sample, sessions="user_day")
    assert "session" in day.frame.columns
    local_day = (day.frame["time"] + 8 * 3_600_000) // 86_400_000
    per_session = pd.DataFrame({"s": day.frame["session"], "u": day.frame["user"], "d": local_day}).groupby("s").nunique()
    assert (per_session[["u", "d"]] == 1).all().all()
    log_day, summary_day = build_session_log(day, session_gap=1800.0)
    assert summary_day["sessions_kept"]["share"] > build_session_log(read_kuairand(sample), session_gap=1800.0)[1]["sessions_kept"]["share"]
    with pytest.raises(ConfigError, match="session rule"):
        read_kuairand(sample, sessions="weekly")


def test_video_age_is_not_a_default_feature_and_warns_when_asked(sample):
    raw = read_kuairand(sample)
    assert "log_video_age_days" not in raw.dense and raw.warnings == []
    aged = read_kuairand(sample, video_features=["author_id", "upload_dt"])
    assert "log_video_age_days" in aged.dense
    assert any("log_video_age_days" in w and "calendar date" in w for w in aged.warnings)


def test_real_integers_and_the_live_streamer_code_are_read_exactly(sample):
    raw = read_kuairand(sample)
    assert raw.frame["user_id"].dtype == np.int64 and raw.frame["time"].dtype == np.int64
    assert raw.frame["is_live_streamer"].astype(float).eq(-124).mean() > 0.5  # the real sentinel, kept as a category


def test_missing_standard_log_warns_and_strict_fails(sample, tmp_path):
    folder = _linked_release(sample, tmp_path / "pure", skip=(LOGS[1],))
    raw = read_kuairand(folder)
    assert any(LOGS[1] in w and "missing" in w for w in raw.warnings)
    with pytest.raises(DataError, match="strict") as info:
        read_kuairand(folder, strict=True)
    assert LOGS[1] in str(info.value)
    full = read_kuairand(sample, strict=True)  # the complete file set passes strict
    assert full.warnings == []


def test_parent_of_release_folders_names_the_one_to_pass(sample, tmp_path):
    parent = tmp_path / "downloads"
    parent.mkdir()
    os.symlink(sample, parent / "KuaiRand-Pure")
    (parent / "notes").mkdir()
    with pytest.raises(DataError, match="KuaiRand-Pure") as info:
        read_kuairand(parent)
    assert "--data-dir" in str(info.value)


def test_prepare_cli_prints_the_warnings_and_strict_exits_2(sample, tmp_path, capsys):
    from rmtl.cli import main

    folder = _linked_release(sample, tmp_path / "pure", skip=(LOGS[0],))
    assert main(["prepare", "--source", "kuairand", "--data-dir", str(folder), "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "warning: " in out and LOGS[0] in out and "duplicate impression" in out
    assert main(["prepare", "--source", "kuairand", "--data-dir", str(folder), "--no-cache", "--strict"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and LOGS[0] in err
