"""KuaiRand reader (hand-made files, every bad-input case) and synthetic KuaiRand logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rmtl.data.kuairand import (
    LOG_COLUMNS, OUTCOME_COLUMNS, USER_COLUMNS, USER_DENSE, USER_SPARSE, VIDEO_COLUMNS, VIDEO_DENSE,
    VIDEO_SPARSE, parse_tasks, read_kuairand,
)
from rmtl.data.sessions import assign_sessions
from rmtl.data.synth_kuairand import kuairand_file_names, write_kuairand
from rmtl.errors import ConfigError, DataError

LOG1 = "log_standard_4_08_to_4_21_1k.csv"
LOG2 = "log_standard_4_22_to_5_08_1k.csv"
RAND = "log_random_4_22_to_5_08_1k.csv"
USERS = "user_features_1k.csv"
VIDEOS = "video_features_basic_1k.csv"
T0 = 1649412000000  # 2022-04-08 18:00 Beijing


def _log_rows(user_ids, video_ids, clicks, long_views, t0=T0, date=20220408, hourmin=1800, likes=None):
    n = len(user_ids)
    rows = {c: np.zeros(n, dtype=np.int64) for c in LOG_COLUMNS}
    rows.update(user_id=user_ids, video_id=video_ids, date=[date] * n, hourmin=[hourmin] * n,
                time_ms=t0 + 10_000 * np.arange(n), is_click=clicks, long_view=long_views,
                play_time_ms=np.where(np.asarray(long_views) == 1, 30_000, 2_000),
                duration_ms=[20_000] * n, tab=[1] * n)
    if likes is not None:
        rows["is_like"] = likes
    return pd.DataFrame(rows)[LOG_COLUMNS]


def _users(ids):
    n = len(ids)
    frame = pd.DataFrame({c: [0] * n for c in USER_COLUMNS})
    frame["user_id"] = ids
    frame["user_active_degree"] = ["full_active", "UNKNOWN", "high_active"][:n]
    frame["follow_user_num"] = [5, 0, 120][:n]
    frame["follow_user_num_range"] = ["(0,10]", "0", "(100,150]"][:n]
    frame["fans_user_num_range"] = "0"
    frame["friend_user_num_range"] = "0"
    frame["register_days"] = [100, 800, 30][:n]
    frame["register_days_range"] = ["91-180", "730+", "15-30"][:n]
    return frame[USER_COLUMNS]


def _videos(ids):
    n = len(ids)
    return pd.DataFrame({
        "video_id": ids, "author_id": [7, 7, 9, 11][:n], "video_type": ["NORMAL", "AD", "NORMAL", "NORMAL"][:n],
        "upload_dt": ["2022-04-01", "2022-03-09", "2021-04-08", "2022-04-08"][:n],
        "upload_type": ["ShortImport", "Web", "Kmovie", "Web"][:n], "visible_status": [1] * n,
        "video_duration": [20000.0, 15000.0, np.nan, 9000.0][:n], "server_width": [720] * n,
        "server_height": [1280] * n, "music_id": [5, 6, 7, 8][:n], "music_type": [4.0, np.nan, 9.0, 9.0][:n],
        "tag": ["12,65", "3", None, "8"][:n],
    })[VIDEO_COLUMNS]


def make_release(root: Path, *, logs=None, users=None, videos=None) -> Path:
    """A tiny valid 1K-style release; each argument may replace a file's frame (or text)."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        LOG1: _log_rows([1, 1, 1, 2, 2], [10, 11, 12, 10, 13], [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]),
        LOG2: _log_rows([1, 2], [11, 10], [0, 1], [0, 0], t0=T0 + 14 * 86_400_000, date=20220422, hourmin=900),
        USERS: _users([1, 2]),
        VIDEOS: _videos([10, 11, 12, 13]),
        **(logs or {}), **({USERS: users} if users is not None else {}), **({VIDEOS: videos} if videos is not None else {}),
    }
    for name, content in files.items():
        if isinstance(content, str):
            (root / name).write_text(content)
        else:
            content.to_csv(root / name, index=False)
    return root


# ------------------------------------------------------------------ reading hand-made files

def test_reads_a_release_with_default_tasks_and_features(tmp_path):
    raw = read_kuairand(make_release(tmp_path / "kr"))
    f = raw.frame
    assert raw.source == "kuairand" and raw.tasks == ["ctr", "ctcvr"]
    assert raw.events_read == len(f) == 7
    assert (raw.user_field, raw.item_field, raw.author_field) == ("user_id", "video_id", "author_id")
    assert f["user"].tolist() == [1, 1, 1, 2, 2, 1, 2] and f["item"].tolist() == [10, 11, 12, 10, 13, 11, 10]
    assert f["time"].dtype == np.int64 and f["time"].iloc[1] - f["time"].iloc[0] == 10_000
    assert f["ctr"].tolist() == [1, 1, 0, 0, 1, 0, 1]
    assert f["ctcvr"].tolist() == [1, 0, 0, 0, 1, 0, 0]  # is_click AND long_view
    # hour / weekday from time_ms in Beijing time, not from hourmin (LOG2 says 0900 for 18:00)
    assert f["hour"].tolist() == [18] * 7
    assert f["weekday"].tolist() == [4] * 7  # 2022-04-08 and 04-22 were Fridays
    assert f["tag"].iloc[1] == "3" and pd.isna(f["tag"].iloc[2])  # video 12 has no tag
    assert f["tag"].iloc[0] == "12"  # first of "12,65"
    assert f["author_id"].iloc[4] == 11 and f["video_type"].iloc[1] == "AD"
    assert f["user_active_degree"].tolist()[:4] == ["full_active"] * 3 + ["UNKNOWN"]
    np.testing.assert_allclose(f["log_follow_user_num"].to_numpy()[[0, 3]], np.log1p([5, 0]))
    np.testing.assert_allclose(f["log_duration_s"].iloc[0], np.log1p(20.0))
    assert "log_video_age_days" not in f.columns  # upload_dt is opt-in (a calendar-date proxy)
    aged = read_kuairand(make_release(tmp_path / "kr"), video_features=["upload_dt"]).frame
    # video 10 uploaded 2022-04-01, seen 2022-04-08 (Beijing) -> 7 days; 14 days later -> 21
    np.testing.assert_allclose(aged["log_video_age_days"].to_numpy()[[0, 6]], np.log1p([7, 21]))
    assert "session" not in f.columns  # sessions are cut by the builder
    assert raw.notes == {"rows_without_user_features": 0, "rows_without_video_features": 0}


def test_reads_the_data_subfolder_of_a_release(tmp_path):
    make_release(tmp_path / "KuaiRand-1K" / "data")
    assert len(read_kuairand(tmp_path / "KuaiRand-1K").frame) == 7


def test_task_mapping_aliases_expressions_and_conjunctions(tmp_path):
    logs = {LOG1: _log_rows([1, 1, 1, 2, 2], [10, 11, 12, 10, 13], [1, 1, 0, 0, 1], [1, 0, 0, 0, 1], likes=[1, 1, 0, 0, 0])}
    root = make_release(tmp_path / "kr", logs=logs)
    raw = read_kuairand(root, tasks=["ctr", "like", "is_click & long_view & is_like", "watch=long_view"])
    f = raw.frame
    assert raw.tasks == ["ctr", "like", "is_click_and_long_view_and_is_like", "watch"]
    assert f["like"].tolist()[:5] == [1, 1, 0, 0, 0]
    assert f["is_click_and_long_view_and_is_like"].tolist()[:5] == [1, 0, 0, 0, 0]
    assert f["watch"].tolist()[:5] == [1, 0, 0, 0, 1]
    raw = read_kuairand(root, tasks={"cvr_like": "is_like & is_click"})
    assert raw.tasks == ["cvr_like"] and f["like"].sum() == raw.frame["cvr_like"].sum()
    assert read_kuairand(root, tasks="ctr, ctcvr").tasks == ["ctr", "ctcvr"]
    assert parse_tasks(None) == {"ctr": ["is_click"], "ctcvr": ["is_click", "long_view"]}


@pytest.mark.parametrize("tasks", [["is_clik"], {"t": "is_click & play_time_ms"}, {"user_id": "is_click"},
                                   {"author_id": "is_click"}, {"log_duration_s": "long_view"}, []])
def test_bad_task_mapping_is_a_config_error(tmp_path, tasks):
    with pytest.raises(ConfigError, match="tasks"):
        read_kuairand(make_release(tmp_path / "kr"), tasks=tasks)


def test_unknown_options_and_feature_columns_are_config_errors(tmp_path):
    root = make_release(tmp_path / "kr")
    with pytest.raises(ConfigError, match="include_randm"):
        read_kuairand(root, include_randm=True)
    with pytest.raises(ConfigError, match="play_time_ms"):
        read_kuairand(root, video_features=["play_time_ms"])
    with pytest.raises(ConfigError, match="2k"):
        read_kuairand(root, release="2k")


def test_several_log_files_are_concatenated_and_random_log_is_opt_in(tmp_path):
    rand = _log_rows([1, 2, 2], [13, 12, 11], [1, 0, 1], [0, 0, 1], t0=T0 + 15 * 86_400_000, date=20220423)
    rand["is_rand"] = 1
    root = make_release(tmp_path / "kr", logs={RAND: rand})
    assert len(read_kuairand(root).frame) == 7
    raw = read_kuairand(root, include_random=True)
    assert raw.events_read == len(raw.frame) == 10 and raw.notes["random_exposures (log_random)"] == 3
    assert raw.frame["item"].tolist()[-3:] == [13, 12, 11]


def test_gzipped_files_are_read(tmp_path):
    import gzip

    root = make_release(tmp_path / "kr")
    for name in (LOG2, VIDEOS):
        (root / f"{name}.gz").write_bytes(gzip.compress((root / name).read_bytes()))
        (root / name).unlink()
    pd.testing.assert_frame_equal(read_kuairand(root).frame, read_kuairand(make_release(tmp_path / "plain")).frame)


def test_27k_style_part_files_and_release_choice(tmp_path):
    root = tmp_path / "kr"
    root.mkdir()
    _log_rows([1, 1], [10, 11], [1, 0], [0, 0]).to_csv(root / "log_standard_4_08_to_4_21_27k_part1.csv", index=False)
    _log_rows([2, 2], [10, 12], [1, 1], [1, 0], t0=T0 + 1000).to_csv(root / "log_standard_4_08_to_4_21_27k_part2.csv", index=False)
    _users([1, 2]).to_csv(root / "user_features_27k.csv", index=False)
    _videos([10, 11, 12]).to_csv(root / "video_features_basic_27k.csv", index=False)
    assert read_kuairand(root).frame["user"].tolist() == [1, 1, 2, 2]
    make_release(root)  # add a 1K release beside it
    with pytest.raises(DataError, match="several releases"):
        read_kuairand(root)
    assert len(read_kuairand(root, release="27k").frame) == 4
    assert len(read_kuairand(root, release="1k").frame) == 7


def test_rows_without_side_features_are_kept_with_unknown_features(tmp_path):
    root = make_release(tmp_path / "kr", users=_users([1]), videos=_videos([10, 11]))
    raw = read_kuairand(root, video_features=["author_id", "upload_dt"])
    f = raw.frame
    assert len(f) == 7 and raw.dropped == {}
    assert raw.notes["rows_without_video_features"] == 2  # videos 12 and 13
    assert raw.notes["rows_without_user_features"] == 3  # user 2
    no_video = f["item"].isin([12, 13]).to_numpy()
    assert f.loc[no_video, "author_id"].isna().all() and f.loc[~no_video, "author_id"].notna().all()
    assert f.loc[no_video, "log_video_age_days"].isna().all()
    assert f.loc[f["user"] == 2, "user_active_degree"].isna().all()
    assert f.loc[f["user"] == 2, "log_register_days"].isna().all()


def test_no_outcome_column_is_a_feature_and_outcomes_do_not_move_features(tmp_path):
    every = dict(user_features=USER_SPARSE + USER_DENSE, video_features=VIDEO_SPARSE + VIDEO_DENSE)
    root = make_release(tmp_path / "a")
    raw = read_kuairand(root, **every)
    features = raw.sparse + raw.dense
    for outcome in OUTCOME_COLUMNS:
        assert not any(outcome in name for name in features), outcome
    # Rewrite every outcome column with other values: no feature may change.
    logs = {}
    for name in (LOG1, LOG2):
        frame = pd.read_csv(root / name)
        for c in OUTCOME_COLUMNS:
            frame[c] = 1 - frame[c] if frame[c].isin([0, 1]).all() else frame[c] * 3 + 7
        logs[name] = frame
    other = read_kuairand(make_release(tmp_path / "b", logs=logs), **every)
    pd.testing.assert_frame_equal(raw.frame[features], other.frame[features])
    assert not raw.frame["ctr"].equals(other.frame["ctr"])


def test_without_side_files_when_no_side_features_are_asked(tmp_path):
    root = make_release(tmp_path / "kr")
    (root / USERS).unlink()
    (root / VIDEOS).unlink()
    raw = read_kuairand(root, user_features=[], video_features=[])
    assert raw.sparse == ["user_id", "video_id", "tab", "hour", "weekday"] and raw.author_field is None


# ------------------------------------------------------------------ bad input: one DataError each

def _drop(frame, column):
    return frame.drop(columns=[column])


def _set(frame, column, row, value):
    frame = frame.astype({column: object})
    frame.loc[row, column] = value
    return frame


BASE_LOG = _log_rows([1, 1, 1, 2, 2], [10, 11, 12, 10, 13], [1, 1, 0, 0, 1], [1, 0, 0, 0, 1])

BAD_CASES = {
    "missing column": ({"logs": {LOG1: _drop(BASE_LOG, "tab")}}, LOG1, "tab", "missing column"),
    "missing label column": ({"logs": {LOG1: _drop(BASE_LOG, "long_view")}}, LOG1, "long_view", "missing column"),
    "missing user column": ({"users": _drop(_users([1, 2]), "register_days")}, USERS, "register_days", "missing column"),
    "wrong type id": ({"logs": {LOG1: _set(BASE_LOG, "user_id", 2, "abc")}}, LOG1, "user_id", "wrong type"),
    "wrong type time": ({"logs": {LOG1: _set(BASE_LOG, "time_ms", 0, "2022-04-08")}}, LOG1, "time_ms", "wrong type"),
    "fractional id": ({"logs": {LOG1: _set(BASE_LOG, "video_id", 0, 10.5)}}, LOG1, "video_id", "whole numbers"),
    "wrong type count": ({"users": _set(_users([1, 2]), "fans_user_num", 0, "many")}, USERS, "fans_user_num", "wrong type"),
    "label outside 0/1": ({"logs": {LOG1: _set(BASE_LOG, "is_click", 3, 2)}}, LOG1, "is_click", "outside {0, 1}"),
    "NaN label": ({"logs": {LOG1: _set(BASE_LOG, "long_view", 1, None)}}, LOG1, "long_view", "missing (NaN)"),
    "NaN time": ({"logs": {LOG1: _set(BASE_LOG, "time_ms", 4, None)}}, LOG1, "time_ms", "missing (NaN)"),
    "NaN video id": ({"videos": _set(_videos([10, 11, 12, 13]), "video_id", 0, None)}, VIDEOS, "video_id", "missing (NaN)"),
    "tab out of range": ({"logs": {LOG1: _set(BASE_LOG, "tab", 0, 65537)}}, LOG1, "tab", "outside 0..32767"),
    "negative user id": ({"logs": {LOG1: _set(BASE_LOG, "user_id", 1, -3)}}, LOG1, "user_id", "outside 0.."),
    "time beyond int64": ({"logs": {LOG1: _set(BASE_LOG, "time_ms", 2, "99999999999999999999")}}, LOG1, "time_ms",
                          "whole numbers"),
    "time out of range": ({"logs": {LOG1: _set(BASE_LOG, "time_ms", 2, 12)}}, LOG1, "time_ms", "outside"),
    "music id beyond 2**53": ({"videos": _set(_videos([10, 11, 12, 13]), "music_id", 1, 2**60)}, VIDEOS, "music_id",
                              "2**53"),
    "bad upload date": ({"videos": _set(_videos([10, 11, 12, 13]), "upload_dt", 1, "yesterday")}, VIDEOS, "upload_dt", "YYYY-MM-DD"),
    "negative count": ({"users": _set(_users([1, 2]), "follow_user_num", 1, -4)}, USERS, "follow_user_num", "non-negative"),
    "duplicated video": ({"videos": _videos([10, 11, 11, 13])}, VIDEOS, "video_id", "one row per video_id"),
    "empty file": ({"logs": {LOG2: ""}}, LOG2, None, "empty file"),
    "header only": ({"logs": {LOG2: ",".join(LOG_COLUMNS) + "\n"}}, LOG2, None, "no rows"),
    "empty user file": ({"users": ""}, USERS, None, "empty file"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_one_data_error_naming_file_and_column(tmp_path, case):
    change, filename, column, expectation = BAD_CASES[case]
    root = make_release(tmp_path / "kr", **change)
    with pytest.raises(DataError) as info:
        read_kuairand(root, video_features=VIDEO_SPARSE + VIDEO_DENSE)  # every column checked
    err = info.value
    assert err.path is not None and Path(err.path).name == filename
    assert err.column == column
    assert expectation in str(err) and filename in str(err)


@pytest.mark.parametrize("missing", [LOG1, LOG2, USERS, VIDEOS])
def test_missing_file_is_a_data_error(tmp_path, missing):
    root = make_release(tmp_path / "kr")
    (root / missing).unlink()
    if missing == LOG1:  # the other log file still makes a release
        assert len(read_kuairand(root).frame) == 2
        return
    if missing == LOG2:
        assert len(read_kuairand(root).frame) == 5
        (root / LOG1).unlink()
    with pytest.raises(DataError, match="missing file"):
        read_kuairand(root)


def test_missing_directory_and_missing_random_log(tmp_path):
    with pytest.raises(DataError, match="expected a directory"):
        read_kuairand(tmp_path / "nowhere")
    with pytest.raises(DataError, match="log_random"):
        read_kuairand(make_release(tmp_path / "kr"), include_random=True)


# ------------------------------------------------------------------ synthetic release

@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "kr"
    write_kuairand(out, users=250, items=300, seed=3, task_correlation=0.3, click_rate=0.3, long_view_rate=0.6)
    return out


def test_synthetic_files_have_the_published_names_and_columns(synth_dir, tmp_path):
    names = sorted(p.name for p in synth_dir.iterdir())
    assert names == sorted([LOG1, LOG2, RAND, USERS, VIDEOS])
    for name, columns in ((LOG1, LOG_COLUMNS), (RAND, LOG_COLUMNS), (USERS, USER_COLUMNS), (VIDEOS, VIDEO_COLUMNS)):
        assert (synth_dir / name).read_text().split("\n", 1)[0].split(",") == columns
    random_log = pd.read_csv(synth_dir / RAND)
    assert (random_log["is_rand"] == 1).all() and (random_log["date"] >= 20220422).all()
    standard = pd.read_csv(synth_dir / LOG1)
    assert (standard["is_rand"] == 0).all() and standard["date"].between(20220408, 20220421).all()
    assert standard["hourmin"].isin(np.arange(24) * 100).all()
    files = write_kuairand(tmp_path / "k27", users=20, items=30, release="27k")
    assert sorted(p.name for p in files.values()) == sorted(n for v in kuairand_file_names("27k").values() for n in v)
    assert "log_standard_4_22_to_5_08_27k_part2.csv" in {p.name for p in files.values()}
    assert len(read_kuairand(tmp_path / "k27").frame) > 0
    assert kuairand_file_names("pure")["user"] == ["user_features_pure.csv"]


def test_synthetic_round_trip_keeps_planted_rates(synth_dir):
    raw = read_kuairand(synth_dir, tasks=["ctr", "ctcvr", "long_view", "like", "hate"])
    f = raw.frame
    n = len(f)
    assert 10_000 < n < 25_000
    assert abs(f["ctr"].mean() - 0.3) < 0.02
    ctr = f["ctr"].to_numpy() == 1
    assert abs(f["long_view"].to_numpy()[ctr].mean() - 0.6) < 0.03
    assert (f["long_view"].to_numpy() <= f["ctr"].to_numpy()).all()  # a long view is a valid play
    assert abs(f["ctcvr"].mean() - 0.18) < 0.02
    assert 0.005 < f["like"].mean() < 0.03 and f["hate"].mean() < 0.005
    assert raw.notes["rows_without_video_features"] == 0 and raw.notes["rows_without_user_features"] == 0


def test_synthetic_play_times_follow_the_published_definitions(synth_dir):
    log = pd.concat([pd.read_csv(synth_dir / name) for name in (LOG1, LOG2, RAND)], ignore_index=True)
    play, dur = log["play_time_ms"], log["duration_ms"]
    assert (dur > 7_000).all()
    assert ((play > 7_000) == (log["is_click"] == 1)).all()
    assert ((play >= np.minimum(dur, 18_000)) == (log["long_view"] == 1)).all()
    assert ((log["profile_stay_time"] > 0) == (log["is_profile_enter"] == 1)).all()
    assert (log["is_like"] <= log["is_click"]).all()
    # date / hourmin are stamped as the real log does: the Beijing hour of time_ms, or the
    # next hour in the last minutes of an hour (a few roll over to the next date)
    local = pd.to_datetime(log["time_ms"] + 8 * 3_600_000, unit="ms")
    later = local + pd.Timedelta(hours=1)
    same_hour = local.dt.hour * 100 == log["hourmin"]
    next_hour = later.dt.hour * 100 == log["hourmin"]
    assert (same_hour | next_hour).all() and (log["hourmin"] % 100 == 0).all()
    assert 0.10 < next_hour.mean() < 0.30  # 17.5 % on the real KuaiRand-Pure log
    assert (local.dt.minute[next_hour] >= 5).all() and local.dt.minute[next_hour].mean() > 45
    stamped_day = np.where(same_hour, local.dt.strftime("%Y%m%d"), later.dt.strftime("%Y%m%d")).astype(int)
    assert (stamped_day == log["date"]).all()


def test_synthetic_sessions_and_gaps_are_realistic(synth_dir):
    f = read_kuairand(synth_dir, user_features=[], video_features=[]).frame
    session, _ = assign_sessions(f["user"].to_numpy(), f["time"].to_numpy(), 1800.0)
    lengths = np.bincount(session)
    assert 8 <= lengths.mean() <= 18 and lengths.max() < 200
    per_user = len(np.unique(session)) / f["user"].nunique()
    assert 3 <= per_user <= 8
    t = np.sort(f["time"].to_numpy())
    assert t.min() >= 1649347200000 and t.max() < 1652025600000  # 2022-04-08 .. 2022-05-08 Beijing


@pytest.mark.parametrize("rho", [-0.8, 0.8])
def test_synthetic_task_correlation_sign(tmp_path, rho):
    write_kuairand(tmp_path, users=200, items=100, seed=1, task_correlation=rho)
    f = read_kuairand(tmp_path, tasks={"click": "is_click", "lv": "long_view"}, user_features=[], video_features=[]).frame
    per_video = f.groupby("item").agg(n=("click", "size"), c=("click", "sum"), lv=("lv", "sum"))
    per_video = per_video[per_video["c"] >= 5]
    corr = np.corrcoef(per_video["c"] / per_video["n"], per_video["lv"] / per_video["c"])[0, 1]
    assert np.sign(corr) == np.sign(rho) and abs(corr) > 0.2


def test_synthetic_is_deterministic_per_seed_and_defaults_are_sized(tmp_path):
    a = write_kuairand(tmp_path / "a", users=40, items=50, seed=7)
    b = write_kuairand(tmp_path / "b", users=40, items=50, seed=7)
    c = write_kuairand(tmp_path / "c", users=40, items=50, seed=8)
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    assert any(a[k].read_bytes() != c[k].read_bytes() for k in a)
    write_kuairand(tmp_path / "d")
    n = len(read_kuairand(tmp_path / "d", user_features=[], video_features=[], include_random=True).frame)
    assert 40_000 <= n <= 80_000
    assert not list((tmp_path / "d").glob(".*tmp*"))  # no temporary file left behind


def test_synthetic_missing_video_features_and_bad_options(tmp_path):
    write_kuairand(tmp_path / "m", users=30, items=200, seed=0, missing_video_features=0.3)
    raw = read_kuairand(tmp_path / "m")
    assert raw.notes["rows_without_video_features"] > 0
    assert len(raw.frame) == raw.events_read
    with pytest.raises(ConfigError, match="task_correlation"):
        write_kuairand(tmp_path / "x", task_correlation=1.5)
    with pytest.raises(ConfigError, match="release"):
        write_kuairand(tmp_path / "x", release="2k")
    with pytest.raises(ConfigError, match="lik_rate"):
        write_kuairand(tmp_path / "x", lik_rate=0.1)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# ------------------------------------------------------------------ user subsets and streaming

def test_users_option_keeps_a_subset_and_counts_the_rest(tmp_path):
    root = make_release(tmp_path / "kr")
    raw = read_kuairand(root, users=1)  # the smallest user id of user_features
    assert set(raw.frame["user"]) == {1} and len(raw.frame) == 4
    assert raw.events_read == 7 and raw.dropped == {"user not among the selected users": 3}
    assert set(read_kuairand(root, users=[2, 5]).frame["user"]) == {2}
    with pytest.raises(DataError, match="selected user"):
        read_kuairand(root, users=[99])
    with pytest.raises(ConfigError, match="users"):
        read_kuairand(root, users=["someone"])


def test_streamed_blocks_give_the_same_rows_and_exact_error_rows(tmp_path, monkeypatch):
    import rmtl.data.kuairand as kuairand

    n = 300
    big = _log_rows(np.arange(n) % 2 + 1, np.arange(n) % 4 + 10, np.arange(n) % 2, (np.arange(n) % 3 == 0).astype(int))
    root = make_release(tmp_path / "kr", logs={LOG1: big})
    whole = read_kuairand(root).frame
    monkeypatch.setattr(kuairand, "BLOCK_BYTES", 1024)  # dozens of blocks
    pd.testing.assert_frame_equal(read_kuairand(root).frame, whole)
    make_release(root, logs={LOG1: _set(big, "is_click", 250, 7)})
    with pytest.raises(DataError, match="row 251") as info:
        read_kuairand(root)
    assert info.value.column == "is_click"


def test_synthetic_release_prepares_into_a_session_log(synth_dir, tmp_path):
    from rmtl.data.prepare import prepare

    p = prepare("kuairand", synth_dir, cache_dir=tmp_path / "cache", reader_options={"tasks": ["ctr", "ctcvr"]})
    spec = p.log.spec
    assert spec.tasks == ["ctr", "ctcvr"] and spec.source == "kuairand"
    assert (spec.user_field, spec.item_field, spec.author_field) == ("user_id", "video_id", "author_id")
    assert not set(spec.sparse_fields + spec.dense_fields) & set(OUTCOME_COLUMNS)
    assert all(card >= 3 for card in spec.cardinalities)  # every field has at least one train value
    train = p.log.split("train")
    assert abs(train.labels[:, 0].mean() - 0.3) < 0.03 and (train.labels[:, 1] <= train.labels[:, 0]).all()
    assert np.isfinite(p.log.dense).all()


def test_duplicate_rows_keeps_the_first_of_each_identical_row():
    from rmtl.data.kuairand import duplicate_rows

    log = {"user_id": np.array([1, 2, 1, 1, 3, 1]), "video_id": np.array([5, 5, 6, 5, 5, 5]),
           "time_ms": np.array([10, 10, 10, 10, 11, 10]), "is_click": np.array([0, 0, 0, 0, 1, 1])}
    # row 3 repeats row 0; row 5 differs from it in a label; rows 1 and 2 only share the time
    np.testing.assert_array_equal(duplicate_rows(log), [False, False, False, True, False, False])
    assert not duplicate_rows({k: v[[0, 4]] for k, v in log.items()}).any()
