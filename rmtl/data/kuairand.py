"""Reader of the KuaiRand raw files (Pure, 1K and 27K releases) -> RawEvents.

Every row of a ``log_standard_*.csv`` (and, on request, ``log_random_*.csv``) is one
impression: a (user, video) exposure at ``time_ms``. Labels are the published feedback
columns, combined into tasks by a small mapping (``"is_click & long_view"``). Inputs come
from the log's exposure context (user, video, tab, hour, video length), the user file
and the basic video file -- never from a feedback column: play time, long view, stay
times and profile entry are outcomes of the impression, not inputs.

Sessions are left to the builder (rmtl.data.sessions.assign_sessions cuts them by the
``time_ms`` gap), so the reader adds no 'session' column.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from rmtl.data.raw import RawEvents
from rmtl.errors import ConfigError, DataError, unknown_name

SOURCE = "kuairand"
RELEASES = ("pure", "1k", "27k")

# ---------------------------------------------------------------- published schemas

LOG_COLUMNS = [
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
    "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab",
]
USER_COLUMNS = [
    "user_id", "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
    "follow_user_num", "follow_user_num_range", "fans_user_num", "fans_user_num_range",
    "friend_user_num", "friend_user_num_range", "register_days", "register_days_range",
    *[f"onehot_feat{i}" for i in range(18)],
]
VIDEO_COLUMNS = [
    "video_id", "author_id", "video_type", "upload_dt", "upload_type", "visible_status",
    "video_duration", "server_width", "server_height", "music_id", "music_type", "tag",
]

# Binary feedback columns a task may be built from.
LABEL_COLUMNS = ["is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate",
                 "long_view", "is_profile_enter"]
# Everything observed only after the exposure: never an input feature.
OUTCOME_COLUMNS = [*LABEL_COLUMNS, "play_time_ms", "profile_stay_time", "comment_stay_time"]

DEFAULT_TASKS = {"ctr": "is_click", "ctcvr": "is_click & long_view"}
# Short names accepted in a task list (e.g. tasks=["ctr", "like"]).
TASK_ALIASES = {
    **DEFAULT_TASKS,
    "click": "is_click", "like": "is_like", "follow": "is_follow", "comment": "is_comment",
    "forward": "is_forward", "hate": "is_hate", "long_view": "long_view",
    "profile_enter": "is_profile_enter", "click_like": "is_click & is_like",
}

# How each usable side-information column becomes a feature.
USER_SPARSE = ["user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
               "follow_user_num_range", "fans_user_num_range", "friend_user_num_range",
               "register_days_range", *[f"onehot_feat{i}" for i in range(18)]]
USER_DENSE = ["follow_user_num", "fans_user_num", "friend_user_num", "register_days"]  # -> log1p
VIDEO_SPARSE = ["author_id", "video_type", "upload_type", "visible_status", "music_id", "music_type", "tag"]
VIDEO_DENSE = ["video_duration", "upload_dt", "server_width", "server_height"]  # -> log1p (see _video_dense)

DEFAULT_USER_FEATURES = [*USER_SPARSE, *USER_DENSE]
# music_id (millions of values) and visible_status (the state "now", at crawl time) are opt-in.
DEFAULT_VIDEO_FEATURES = ["author_id", "video_type", "upload_type", "music_type", "tag", "upload_dt"]

STRING_COLUMNS = {"user_active_degree", "follow_user_num_range", "fans_user_num_range",
                  "friend_user_num_range", "register_days_range", "video_type", "upload_dt",
                  "upload_type", "visible_status", "tag"}
# Columns whose every value must be a whole number (ids, times, codes).
INTEGRAL_COLUMNS = {"user_id", "video_id", "time_ms", "hourmin", "tab", "is_rand", "author_id",
                    "music_id", "music_type", "is_lowactive_period", "is_live_streamer",
                    "is_video_author", *[f"onehot_feat{i}" for i in range(18)], *LABEL_COLUMNS}
COUNT_COLUMNS = {"follow_user_num", "fans_user_num", "friend_user_num", "register_days",
                 "video_duration", "server_width", "server_height", "duration_ms"}

BEIJING_OFFSET_MS = 8 * 3600 * 1000  # 'date' / 'hourmin' are Beijing time; time_ms is UTC
DAY_MS = 86400 * 1000
KNOWN_OPTIONS = ("release", "users", "tasks", "include_random", "user_features", "video_features")

_FILE_RE = re.compile(
    r"^(?P<kind>log_standard|log_random|user_features|video_features_basic)"
    r"(?:_(?P<span>\d+_\d+_to_\d+_\d+))?(?:_(?P<release>pure|1k|27k))?(?:_part\d+)?\.csv(?:\.gz)?$"
)


def read_kuairand(
    data_dir: str | Path,
    *,
    session_gap: float | None = 1800.0,
    tasks: Mapping[str, str] | Sequence[str] | str | None = None,
    include_random: bool = False,
    user_features: Sequence[str] | None = None,
    video_features: Sequence[str] | None = None,
    **options,
) -> RawEvents:
    """Read a KuaiRand release directory into RawEvents (one row per impression).

    ``data_dir`` holds the release's CSV files (or a ``data/`` folder with them).
    ``tasks``: None = {"ctr": "is_click", "ctcvr": "is_click & long_view"}; a mapping
    task name -> label expression (a label column or "a & b & ..."); or a list / comma
    string of aliases ("ctr", "like", ...), bare expressions or "name=expression".
    ``include_random`` also reads log_random_*.csv (rows with is_rand = 1).
    ``user_features`` / ``video_features``: the side-information columns to use (see
    USER_SPARSE, USER_DENSE, VIDEO_SPARSE, VIDEO_DENSE); [] skips the file entirely.
    ``release`` ("pure", "1k" or "27k") picks one release when a folder holds several.
    ``users``: None = all; an int N = the N smallest user ids of user_features (a random
    sample: the published ids are shuffled); a list = those ids. Other rows are skipped
    (counted in ``dropped``) while streaming, so a 27K log needs memory for the kept rows only.
    ``session_gap`` is accepted for interface symmetry; the builder cuts sessions.
    """
    del session_gap  # sessions are cut by the builder from user and time_ms
    unknown = sorted(set(options) - {"release", "users"})
    if unknown:
        raise unknown_name("kuairand reader option", unknown[0], KNOWN_OPTIONS)
    task_map = parse_tasks(tasks)
    user_cols = _check_feature_list(user_features, DEFAULT_USER_FEATURES, USER_SPARSE + USER_DENSE, "user_features")
    video_cols = _check_feature_list(video_features, DEFAULT_VIDEO_FEATURES, VIDEO_SPARSE + VIDEO_DENSE, "video_features")
    chosen = options.get("users")
    files = find_files(data_dir, release=options.get("release"), include_random=bool(include_random),
                       need_users=bool(user_cols) or isinstance(chosen, (int, np.integer)), need_videos=bool(video_cols))
    selected = _select_users(chosen, files["user"])

    label_cols = sorted({c for expr in task_map.values() for c in expr})
    log_cols = ["user_id", "video_id", "time_ms", "hourmin", "tab", "duration_ms", *label_cols]
    logs = [_read_log(p, log_cols, selected) for p in files["log"]]
    n_read = sum(k for _, k in logs)
    n_random = sum(len(t["user_id"]) for p, (t, _) in zip(files["log"], logs) if p.name.startswith("log_random"))
    log = {c: np.concatenate([t[c] for t, _ in logs]) for c in log_cols}
    n = len(log["user_id"])
    if n == 0:
        raise DataError(f"no log row belongs to the {len(selected)} selected user(s); expected at least one",
                        path=files["log"][0].parent, column="user_id")
    dropped = {} if n == n_read else {"user not among the selected users": n_read - n}

    user_id, video_id, time_ms = log["user_id"], log["video_id"], log["time_ms"]  # int64
    frame: dict[str, object] = {"user": user_id, "item": video_id, "time": time_ms,
                                "user_id": user_id, "video_id": video_id, "tab": log["tab"],
                                "hour": (log["hourmin"] // 100).astype(np.int8)}
    sparse = ["user_id", "video_id", "tab", "hour"]
    dense = ["log_duration_s"]
    frame["log_duration_s"] = np.log1p(log["duration_ms"] / 1000.0)
    notes: dict[str, int] = {"random_exposures (log_random)": int(n_random)} if include_random else {}

    if user_cols:
        notes["rows_without_user_features"] = _join_side(frame, sparse, dense, files["user"], "user_id", user_id, user_cols)
    if video_cols:
        notes["rows_without_video_features"] = _join_side(frame, sparse, dense, files["video"], "video_id", video_id, video_cols)

    for name, cols in task_map.items():
        if name in frame:
            raise ConfigError(f"task name '{name}' is also a column of the KuaiRand events; pick another name", key="tasks")
        y = np.ones(n, dtype=bool)
        for c in cols:
            y &= log[c] == 1
        frame[name] = y.astype(np.int8)

    leaked = set(sparse + dense) & set(OUTCOME_COLUMNS)
    assert not leaked, f"outcome column(s) among the features: {leaked}"  # guards future edits
    raw = RawEvents(
        frame=pd.DataFrame(frame, copy=False),
        sparse=sparse,
        dense=dense,
        tasks=list(task_map),
        source=SOURCE,
        events_read=n_read,
        dropped=dropped,
        user_field="user_id",
        item_field="video_id",
        author_field="author_id" if "author_id" in sparse else None,
        notes=notes,
    )
    return raw


# ---------------------------------------------------------------- tasks and options

def parse_tasks(tasks: Mapping[str, str] | Sequence[str] | str | None) -> dict[str, list[str]]:
    """Task name -> the label columns whose AND is the task's label."""
    if tasks is None:
        items = list(DEFAULT_TASKS.items())
    elif isinstance(tasks, Mapping):
        items = [(str(k), str(v)) for k, v in tasks.items()]
    else:
        entries = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
        items = []
        for entry in entries:
            if "=" in entry:
                name, expr = (s.strip() for s in entry.split("=", 1))
            elif entry in TASK_ALIASES:
                name, expr = entry, TASK_ALIASES[entry]
            else:
                name, expr = "_and_".join(c.strip() for c in entry.split("&")), entry
            items.append((name, expr))
    if not items:
        raise ConfigError("expected at least one task", key="tasks")
    parsed: dict[str, list[str]] = {}
    reserved = {"user", "item", "time", "session", "user_id", "video_id", "tab", "hour"}
    for name, expr in items:
        cols = [c.strip() for c in expr.split("&")]
        for c in cols:
            if c not in LABEL_COLUMNS:
                raise ConfigError(f"task '{name}': '{c}' is not a KuaiRand label column; expected one of "
                                  f"{', '.join(LABEL_COLUMNS)} (joined with '&')", key="tasks")
        if not name or name in reserved or name in parsed:
            raise ConfigError(f"task name '{name}' is empty, reserved or repeated", key="tasks")
        parsed[name] = cols
    return parsed


def _check_feature_list(given: Sequence[str] | None, default: list[str], known: list[str], key: str) -> list[str]:
    cols = list(default if given is None else given)
    for c in cols:
        if c not in known:
            raise unknown_name(f"{key} column", c, known)
    return list(dict.fromkeys(cols))


# ---------------------------------------------------------------- files

def find_files(data_dir: str | Path, *, release: str | None = None, include_random: bool = False,
               need_users: bool = True, need_videos: bool = True) -> dict[str, list[Path]]:
    """The release's files: {'log': [...], 'user': [...], 'video': [...]} in name order
    (which is time order: 4_08_to_4_21 before 4_22_to_5_08, part1 before part2)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError("expected a directory holding the KuaiRand CSV files (log_standard_*.csv, ...)", path=root)
    if not any(_FILE_RE.match(p.name) for p in root.iterdir()) and (root / "data").is_dir():
        root = root / "data"
    if release is not None and release not in RELEASES:
        raise unknown_name("kuairand release", str(release), RELEASES)
    found: dict[str, list[tuple[str | None, Path]]] = {}
    for p in sorted(root.iterdir()):
        m = _FILE_RE.match(p.name)
        if m and p.is_file():
            found.setdefault(m["kind"], []).append((m["release"], p))
    releases = {r for r, _ in found.get("log_standard", [])}
    if release is None and len(releases) > 1:
        raise DataError(f"holds log_standard files of several releases {sorted(map(str, releases))}; "
                        "pass release='pure' | '1k' | '27k'", path=root)
    wanted = release if release is not None else next(iter(releases), None)

    def pick(kind: str, required: bool) -> list[Path]:
        paths = [p for r, p in found.get(kind, []) if r == wanted or (r is None and wanted is None)]
        if required and not paths:
            suffix = f"_{wanted}" if wanted else ""
            raise DataError(f"missing file: expected {kind}*{suffix}.csv in this directory", path=root)
        return paths

    out = {"log": pick("log_standard", True)}
    if include_random:
        out["log"] += pick("log_random", True)
    out["user"] = pick("user_features", need_users)
    out["video"] = pick("video_features_basic", need_videos)
    return out


def _header(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        line = fh.readline()
    if not line.strip():
        raise DataError("empty file; expected a CSV header and rows", path=path)
    return [c.strip().strip('"') for c in line.rstrip("\r\n").split(",")]


BLOCK_BYTES = 1 << 25  # streamed in ~32 MB blocks: peak memory stays near the kept rows
# Compact dtypes of the log columns once validated (a 27K-size log is 300 M rows).
LOG_DTYPES = {"user_id": np.int64, "video_id": np.int64, "time_ms": np.int64, "hourmin": np.int16,
              "tab": np.int16, "duration_ms": np.float32, **{c: np.int8 for c in LABEL_COLUMNS}}


def _read_csv(path: Path, columns: Iterable[str], what: str, *, check=None, keep=None,
              dtypes: dict | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Typed, streamed read of the named columns (pyarrow.csv, include_columns).

    Each block is converted, checked (``check(data, path, first_row)``), filtered
    (``keep(data) -> bool mask``) and cast to ``dtypes`` before the next is read.
    Returns (columns, rows read before filtering). One DataError naming file and column
    on a missing column, a wrong type, a bad value or an empty file.
    """
    columns = list(dict.fromkeys(columns))
    header = _header(path)
    for c in columns:
        if c not in header:
            raise DataError(f"missing column; expected the published {what} columns", path=path, column=c)
    types = {c: (pa.string() if c in STRING_COLUMNS else pa.float64()) for c in columns}
    chunks: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    n_read = 0
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES),
            convert_options=pacsv.ConvertOptions(include_columns=columns, column_types=types, strings_can_be_null=True),
        )
        for batch in reader:
            data = _batch_arrays(batch, columns, path, n_read)
            if check is not None:
                check(data, path, n_read)
            n_read += batch.num_rows
            if keep is not None:
                mask = keep(data)
                data = {c: v[mask] for c, v in data.items()}
            for c, v in data.items():
                chunks[c].append(v.astype(dtypes[c]) if dtypes and c in dtypes else v)
    except pa.ArrowInvalid as err:
        raise _csv_error(err, path, header, what) from None
    if n_read == 0:
        raise DataError("empty file: a header but no rows", path=path)
    return {c: np.concatenate(v) for c, v in chunks.items()}, n_read


def _csv_error(err: Exception, path: Path, header: list[str], what: str) -> DataError:
    msg = str(err)
    m = re.search(r"column #(\d+)", msg)
    if m and int(m.group(1)) < len(header):
        return DataError(f"wrong type: expected numbers ({msg.split(': ', 1)[-1]})", path=path, column=header[int(m.group(1))])
    return DataError(f"unreadable CSV ({msg}); expected the published {what} columns", path=path)


def _batch_arrays(batch: pa.RecordBatch, columns: list[str], path: Path, first_row: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for c in columns:
        col = batch.column(c)
        if c in STRING_COLUMNS:
            out[c] = col.to_numpy(zero_copy_only=False).astype(object)  # None for empty cells
            continue
        values = col.to_numpy(zero_copy_only=False)  # float64, NaN for empty cells
        if c in INTEGRAL_COLUMNS:
            bad = np.flatnonzero(~np.isnan(values) & (values != np.round(values)))
            if len(bad):
                raise DataError(f"wrong type: expected whole numbers, found {values[bad[0]]:g} in row {first_row + bad[0] + 1}",
                                path=path, column=c)
        if c in COUNT_COLUMNS:
            bad = np.flatnonzero(values < 0)
            if len(bad):
                raise DataError(f"expected non-negative values, found {values[bad[0]]:g} in row {first_row + bad[0] + 1}",
                                path=path, column=c)
        out[c] = values
    return out


def _require_values(data: dict[str, np.ndarray], columns: Iterable[str], path: Path, first_row: int = 0) -> None:
    for c in columns:
        nan = np.flatnonzero(np.isnan(data[c]))
        if len(nan):
            expected = "0 or 1" if c in LABEL_COLUMNS else "a value"
            raise DataError(f"missing (NaN) value in row {first_row + nan[0] + 1}; expected {expected} in every row",
                            path=path, column=c)


def _check_log_block(data: dict[str, np.ndarray], path: Path, first_row: int) -> None:
    _require_values(data, [c for c in data if c != "duration_ms"], path, first_row)
    for c in data:
        if c in LABEL_COLUMNS:
            bad = np.flatnonzero((data[c] != 0) & (data[c] != 1))
            if len(bad):
                raise DataError(f"label {data[c][bad[0]]:g} in row {first_row + bad[0] + 1} is outside {{0, 1}}; "
                                "expected 0 or 1", path=path, column=c)
    hm = data["hourmin"]
    bad = np.flatnonzero((hm < 0) | (hm > 2359) | (hm % 100 >= 60))
    if len(bad):
        raise DataError(f"expected HHMM between 0 and 2359, found {hm[bad[0]]:g} in row {first_row + bad[0] + 1}",
                        path=path, column="hourmin")


def _read_log(path: Path, columns: list[str], users: np.ndarray | None) -> tuple[dict[str, np.ndarray], int]:
    keep = None if users is None else (lambda data: np.isin(data["user_id"], users))
    return _read_csv(path, columns, "KuaiRand log", check=_check_log_block, keep=keep, dtypes=LOG_DTYPES)


def _read_side(paths: list[Path], key: str, columns: list[str], needed: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A user or video side file (parts concatenated), one row per unique key; only the
    rows of ``needed`` ids are kept (the 27K video file lists 32 M videos)."""
    what = "KuaiRand user_features" if key == "user_id" else "KuaiRand video_features_basic"
    keep = None if needed is None else (lambda data: np.isin(data[key], needed))
    parts = []
    for p in paths:
        part, _ = _read_csv(p, [key, *columns], what, keep=keep,
                            check=lambda d, path, row: _require_values(d, [key], path, row))
        parts.append(part)
    table = {c: np.concatenate([t[c] for t in parts]) for c in [key, *columns]}
    ids = table[key].astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{int((counts > 1).sum())} duplicated id(s) (e.g. {uniq[counts > 1][0]}); expected one row per {key}",
                        path=paths[0], column=key)
    table[key] = ids
    return table


def _select_users(chosen, user_files: list[Path]) -> np.ndarray | None:
    """The ``users`` option: None = all; N = the N smallest user ids of user_features
    (ids are re-indexed at random by the publishers, so this is a random sample, as
    KuaiRand-1K is of 27K); a list = exactly those ids."""
    if chosen is None:
        return None
    if isinstance(chosen, (int, np.integer)) and not isinstance(chosen, bool):
        if chosen < 1:
            raise ConfigError(f"expected a positive number of users or a list of user ids, got {chosen}", key="users")
        ids = np.unique(np.concatenate([_read_csv(p, ["user_id"], "KuaiRand user_features")[0]["user_id"] for p in user_files]))
        return ids[~np.isnan(ids)][: int(chosen)].astype(np.int64)
    try:
        return np.unique(np.asarray(list(chosen), dtype=np.int64))
    except (TypeError, ValueError):
        raise ConfigError(f"expected a number of users or a list of integer user ids, got {chosen!r}", key="users") from None


def _join_side(frame: dict, sparse: list[str], dense: list[str], paths: list[Path], key: str,
               ids: np.ndarray, columns: list[str]) -> int:
    """Add the side file's features to ``frame`` per row (by ``key``); returns the number
    of rows whose id has no side row (they keep unknown features)."""
    table = _read_side(paths, key, columns, needed=np.unique(ids))
    idx = _lookup(table, key, ids)
    for c in columns:
        if c in USER_SPARSE or c in VIDEO_SPARSE:
            frame[c] = _take_sparse(_first_tag(table[c]) if c == "tag" else table[c], idx)
            sparse.append(c)
        else:
            name, values = _dense_feature(c, table[c], idx, frame["time"], paths)
            frame[name] = values
            dense.append(name)
    return int((idx < 0).sum())


def _lookup(table: dict, key: str, ids: np.ndarray) -> np.ndarray:
    """Row of each id in the side table; -1 where the id has no row."""
    return pd.Index(table[key]).get_indexer(ids)


def _take_sparse(values: np.ndarray, idx: np.ndarray) -> pd.Categorical:
    """Per-row categorical of an entity-level column; -1 (no side row) and None/NaN -> missing."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    small = np.int32 if len(uniques) < 2**31 - 1 else np.int64
    row_codes = np.append(codes.astype(small), small(-1))[idx]  # idx -1 -> the appended -1
    return pd.Categorical.from_codes(row_codes, dtype=pd.CategoricalDtype(pd.Index(uniques)), validate=False)


def _take_dense(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.append(values.astype(np.float64), np.nan)[idx]  # idx -1 -> the appended NaN


def _first_tag(tags: np.ndarray) -> np.ndarray:
    """'12,65' -> '12' (the first listed category); empty -> None."""
    s = pd.Series(tags, dtype=object).str.split(",", n=1).str[0].str.strip()
    s = s.where(s.notna() & (s != ""), None)
    return s.to_numpy(dtype=object)


def _dense_feature(column: str, values: np.ndarray, idx: np.ndarray, time_ms: np.ndarray,
                   paths: list[Path]) -> tuple[str, np.ndarray]:
    """(name, per-row values) of a dense side feature: log1p of counts, sizes, the video
    length in seconds, and the video's age in days at the impression."""
    if column == "upload_dt":
        # days between upload and the impression (Beijing date), known at exposure time
        parsed = pd.to_datetime(pd.Series(values, dtype=object), format="ISO8601", errors="coerce")
        bad = parsed.isna().to_numpy() & pd.notna(values)
        if bad.any():
            raise DataError(f"expected ISO dates YYYY-MM-DD, found {values[bad][0]!r}", path=paths[0], column="upload_dt")
        upload_day = (parsed.to_numpy(dtype="datetime64[ns]").astype("datetime64[D]").astype(np.int64)).astype(np.float64)
        upload_day[bad | parsed.isna().to_numpy()] = np.nan
        event_day = (time_ms + BEIJING_OFFSET_MS) // DAY_MS
        age = event_day - _take_dense(upload_day, idx)
        return "log_video_age_days", np.log1p(np.maximum(age, 0.0))
    x = _take_dense(values, idx)
    if column == "video_duration":
        return "log_video_duration_s", np.log1p(x / 1000.0)
    return f"log_{column}", np.log1p(x)
