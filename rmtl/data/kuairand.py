"""Reader of the KuaiRand raw files (Pure, 1K and 27K releases) -> RawEvents.

Every row of a ``log_standard_*.csv`` (and, on request, ``log_random_*.csv``) is one
impression: a (user, video) exposure at ``time_ms``. Labels are the published feedback
columns, combined into tasks by a small mapping (``"is_click & long_view"``). Inputs come
from the log's exposure context (user, video, tab, hour, video length), the user file
and the basic video file -- never from a feedback column: play time, long view, stay
times and profile entry are outcomes of the impression, not inputs.

Real-file quirks handled here (docs/kuairand.md): exact duplicate impression rows are
dropped (counted; ``keep_duplicates=True`` keeps them); hour and weekday come from
``time_ms`` in Beijing time, never from ``hourmin`` (which stamps the last minutes of an
hour with the next one); integer columns are parsed as int64 and range-checked, never
through float64; a release folder missing one of its files is named in a warning (an
error with ``strict=True``); the video age (``upload_dt``) is opt-in because on Pure it
is a proxy of the calendar date.

Sessions are left to the builder (rmtl.data.sessions.assign_sessions cuts them by the
``time_ms`` gap), so the reader adds no 'session' column, unless ``sessions="user_day"``
(one session per user and Beijing calendar day). ``sessions="gap_keep_single"`` keeps the
one-event sessions of the gap rule as one-step episodes.
"""

from __future__ import annotations

import gzip
import re
import threading
from dataclasses import dataclass
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
# upload_dt (-> video age at the impression) too: when a release's videos were uploaded within
# a few days (Pure), the age is a proxy of the calendar date, whose test values fall outside
# the train range under the time split (test AUC rose when it was dropped).
DEFAULT_VIDEO_FEATURES = ["author_id", "video_type", "upload_type", "music_type", "tag"]
# Dense features that follow the calendar date: warn when they track it this closely.
DATE_LIKE_CORRELATION = 0.8

STRING_COLUMNS = {"user_active_degree", "follow_user_num_range", "fans_user_num_range",
                  "friend_user_num_range", "register_days_range", "video_type", "upload_dt",
                  "upload_type", "visible_status", "tag"}
# Columns whose every value must be a whole number (ids, times, codes).
INTEGRAL_COLUMNS = {"user_id", "video_id", "time_ms", "hourmin", "tab", "is_rand", "author_id",
                    "music_id", "music_type", "is_lowactive_period", "is_live_streamer",
                    "is_video_author", *[f"onehot_feat{i}" for i in range(18)], *LABEL_COLUMNS}
# Parsed as int64 by arrow itself (the published files write them as plain integers): a
# float64 round trip would merge ids above 2**53 and turn huge values into INT64_MIN.
# The other integral columns are written as "9.0" in places; they are parsed as float64
# and refused when not whole or beyond 2**53 (not exactly representable).
EXACT_INT_COLUMNS = {"user_id", "video_id", "time_ms", "hourmin", "tab", "is_rand", *LABEL_COLUMNS}
FLOAT_EXACT_LIMIT = 2.0**53
# Inclusive ranges of log integers (before the cast to compact dtypes): anything outside is
# a corrupt row, not a value to wrap around (tab = 65537 would become 1 as int16).
LOG_RANGES = {"user_id": (0, 2**63 - 1), "video_id": (0, 2**63 - 1),
              "time_ms": (946_684_800_000, 4_102_444_800_000),  # 2000-01-01 .. 2100-01-01 UTC
              "tab": (0, 32_767)}
COUNT_COLUMNS = {"follow_user_num", "fans_user_num", "friend_user_num", "register_days",
                 "video_duration", "server_width", "server_height", "duration_ms"}

BEIJING_OFFSET_MS = 8 * 3600 * 1000  # 'date' / 'hourmin' are Beijing time; time_ms is UTC
DAY_MS = 86400 * 1000
SESSION_RULES = ("gap", "gap_keep_single", "user_day")
KNOWN_OPTIONS = ("release", "users", "tasks", "include_random", "user_features", "video_features",
                 "keep_duplicates", "sessions", "strict")
# Identical in every column read; date / hourmin are not compared: the real log holds the
# same impression twice with hourmin stamped once with the hour and once with the next.
DROP_DUPLICATE = "duplicate impression (same user, video, time_ms, tab, duration and feedback)"
# The files each release publishes (besides video_features_statistic_*, never read).
SPANS = ("4_08_to_4_21", "4_22_to_5_08")

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
    keep_duplicates: bool = False,
    sessions: str = "gap",
    strict: bool = False,
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
    ``keep_duplicates``: keep exact duplicate log rows (by default each is read once and
    the rest counted in ``dropped``). ``sessions``: "gap" (the builder cuts at
    ``session_gap``; one-event sessions are dropped), "gap_keep_single" (the same cut,
    one-event sessions kept as one-step episodes) or "user_day" (one session per user and
    Beijing calendar day). ``strict``: a release missing one of its published files is an
    error instead of a warning.
    ``session_gap`` is accepted for interface symmetry; the builder cuts gap sessions.
    """
    del session_gap  # sessions are cut by the builder from user and time_ms
    plan = plan_read(data_dir, tasks=tasks, include_random=include_random, user_features=user_features,
                     video_features=video_features, sessions=sessions, strict=strict, **options)
    logs = [_read_log(p, plan.log_columns, plan.selected) for p in plan.files["log"]]
    n_read = sum(k for _, k in logs)
    n_random = sum(len(t["user_id"]) for p, (t, _) in zip(plan.files["log"], logs) if p.name.startswith("log_random"))
    log = {c: np.concatenate([t[c] for t, _ in logs]) for c in plan.log_columns}
    n = len(log["user_id"])
    if n == 0:
        raise DataError(f"no log row belongs to the {len(plan.selected)} selected user(s); expected at least one",
                        path=plan.files["log"][0].parent, column="user_id")
    dropped = {} if n == n_read else {"user not among the selected users": n_read - n}
    if not keep_duplicates:
        first = ~duplicate_rows(log)
        if not first.all():
            dropped[DROP_DUPLICATE] = int((~first).sum())
            log = {c: v[first] for c, v in log.items()}
    sides = load_sides(plan, log["user_id"], log["video_id"])
    frame, sparse, dense, notes = events_frame(log, plan, sides)
    if include_random:
        notes = {"random_exposures (log_random)": int(n_random), **notes}
    warnings = plan.warnings + _date_like_warnings(frame, dense, log["time_ms"])
    return raw_events(frame, sparse, dense, plan, events_read=n_read, dropped=dropped, notes=notes, warnings=warnings)


@dataclass
class ReadPlan:
    """What a read of one release folder needs, decided before any log row is read: the
    files, the tasks, the side-feature columns, the log columns and the selected users.
    Shared by read_kuairand and the sharded prepare (rmtl.data.shards)."""
    files: dict
    task_map: dict
    user_cols: list
    video_cols: list
    sessions: str
    selected: np.ndarray | None
    log_columns: list
    warnings: list


def plan_read(data_dir, *, tasks=None, include_random=False, user_features=None, video_features=None,
              sessions="gap", strict=False, **options) -> ReadPlan:
    unknown = sorted(set(options) - {"release", "users"})
    if unknown:
        raise unknown_name("kuairand reader option", unknown[0], KNOWN_OPTIONS)
    if sessions not in SESSION_RULES:
        raise unknown_name("kuairand session rule (reader option 'sessions')", str(sessions), SESSION_RULES)
    task_map = parse_tasks(tasks)
    user_cols = _check_feature_list(user_features, DEFAULT_USER_FEATURES, USER_SPARSE + USER_DENSE, "user_features")
    video_cols = _check_feature_list(video_features, DEFAULT_VIDEO_FEATURES, VIDEO_SPARSE + VIDEO_DENSE, "video_features")
    chosen = options.get("users")
    warnings: list[str] = []
    files = find_files(data_dir, release=options.get("release"), include_random=bool(include_random),
                       need_users=bool(user_cols) or isinstance(chosen, (int, np.integer)), need_videos=bool(video_cols),
                       strict=bool(strict), warnings=warnings)
    selected = _select_users(chosen, files["user"])
    label_cols = sorted({c for expr in task_map.values() for c in expr})
    log_cols = ["user_id", "video_id", "time_ms", "tab", "duration_ms", *label_cols]
    return ReadPlan(files, task_map, user_cols, video_cols, sessions, selected, log_cols, warnings)


def load_sides(plan: ReadPlan, user_ids: np.ndarray, video_ids: np.ndarray) -> dict:
    """The user and video side tables, cut to the ids the log uses (None when not read)."""
    return {
        "user": load_side(plan.files["user"], "user_id", plan.user_cols, np.unique(user_ids)) if plan.user_cols else None,
        "video": load_side(plan.files["video"], "video_id", plan.video_cols, np.unique(video_ids)) if plan.video_cols else None,
    }


def events_frame(log: dict[str, np.ndarray], plan: ReadPlan, sides: dict) -> tuple[dict, list, list, dict]:
    """Per-row frame of validated, de-duplicated log rows: ids, time, exposure context,
    side features joined, tasks. Row-local (no row depends on another row's values except
    the user_day session ids), so it gives the same rows on a whole log or on one user shard."""
    n = len(log["user_id"])
    user_id, video_id, time_ms = log["user_id"], log["video_id"], log["time_ms"]  # int64
    hour, weekday = beijing_hour_weekday(time_ms)
    frame: dict[str, object] = {"user": user_id, "item": video_id, "time": time_ms,
                                "user_id": user_id, "video_id": video_id, "tab": log["tab"],
                                "hour": hour, "weekday": weekday}
    sparse = ["user_id", "video_id", "tab", "hour", "weekday"]
    dense = ["log_duration_s"]
    frame["log_duration_s"] = np.log1p(log["duration_ms"] / 1000.0)
    notes: dict[str, int] = {}
    if plan.sessions == "user_day":
        frame["session"] = _user_day_sessions(user_id, time_ms)
    if plan.user_cols:
        notes["rows_without_user_features"] = join_side(frame, sparse, dense, sides["user"], user_id)
    if plan.video_cols:
        notes["rows_without_video_features"] = join_side(frame, sparse, dense, sides["video"], video_id)
    for name, cols in plan.task_map.items():
        if name in frame:
            raise ConfigError(f"task name '{name}' is also a column of the KuaiRand events; pick another name", key="tasks")
        y = np.ones(n, dtype=bool)
        for c in cols:
            y &= log[c] == 1
        frame[name] = y.astype(np.int8)
    leaked = set(sparse + dense) & set(OUTCOME_COLUMNS)
    assert not leaked, f"outcome column(s) among the features: {leaked}"  # guards future edits
    return frame, sparse, dense, notes


def raw_events(frame: dict, sparse: list, dense: list, plan: ReadPlan, *, events_read: int, dropped: dict,
               notes: dict, warnings: list) -> RawEvents:
    return RawEvents(
        frame=pd.DataFrame(frame, copy=False),
        sparse=sparse,
        dense=dense,
        tasks=list(plan.task_map),
        source=SOURCE,
        events_read=events_read,
        dropped=dropped,
        user_field="user_id",
        item_field="video_id",
        author_field="author_id" if "author_id" in sparse else None,
        min_session_events=1 if plan.sessions == "gap_keep_single" else 2,
        notes=notes,
        warnings=warnings,
    )


# ---------------------------------------------------------------- real-file quirks

def duplicate_rows(log: dict[str, np.ndarray]) -> np.ndarray:
    """True for every row identical in all read columns to an earlier row. Candidates are
    the rows whose time_ms another row shares (one sort; rare), then compared on every column."""
    t = log["time_ms"]
    out = np.zeros(len(t), dtype=bool)
    ts = np.sort(t)
    shared = np.unique(ts[1:][ts[1:] == ts[:-1]])
    if len(shared) == 0:
        return out
    slot = np.minimum(np.searchsorted(shared, t), len(shared) - 1)
    candidates = np.flatnonzero(shared[slot] == t)
    if len(candidates):
        sub = pd.DataFrame({c: v[candidates] for c, v in log.items()})
        out[candidates] = sub.duplicated(keep="first").to_numpy()
    return out


def beijing_hour_weekday(time_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hour (0-23) and weekday (Monday = 0) of UTC milliseconds in Beijing time (UTC+8, no DST).
    Not from ``hourmin``: the log stamps the last minutes of an hour with the next hour."""
    local = np.asarray(time_ms, dtype=np.int64) + BEIJING_OFFSET_MS
    hour = ((local // 3_600_000) % 24).astype(np.int8)
    weekday = ((local // DAY_MS + 3) % 7).astype(np.int8)  # 1970-01-01 was a Thursday
    return hour, weekday


def _user_day_sessions(user_id: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
    """One session id per (user, Beijing calendar day)."""
    day = (time_ms + BEIJING_OFFSET_MS) // DAY_MS
    user_codes = pd.factorize(user_id)[0].astype(np.int64)
    key = user_codes * (int(day.max() - day.min()) + 1) + (day - day.min())
    return pd.factorize(key)[0].astype(np.int64)


def _date_like_warnings(frame: dict, dense: list[str], time_ms: np.ndarray) -> list[str]:
    """A warning per dense feature that tracks the impression's calendar day (e.g. the
    video age when every video was uploaded within a few days of each other)."""
    out = []
    day = ((time_ms + BEIJING_OFFSET_MS) // DAY_MS).astype(np.float64)
    if np.ptp(day) == 0:
        return out
    for name in dense:
        x = np.asarray(frame[name], dtype=np.float64)
        ok = np.isfinite(x)
        if ok.sum() < 3 or np.ptp(x[ok]) == 0:
            continue
        r = float(np.corrcoef(x[ok], day[ok])[0, 1])
        if r >= DATE_LIKE_CORRELATION:
            out.append(f"feature '{name}' follows the calendar date (correlation {r:.2f} with the impression day): "
                       "under the time split its val/test values lie beyond the train range; "
                       "leave it out (video_features without upload_dt) unless that is intended")
    return out


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

def expected_log_files(release: str | None) -> list[str]:
    """The standard log names a release publishes (without .gz), in time order."""
    suffix = f"_{release}" if release else ""
    parts = ["_part1", "_part2"] if release == "27k" else [""]
    return [f"log_standard_{span}{suffix}{p}.csv" for span in SPANS for p in parts]


def find_files(data_dir: str | Path, *, release: str | None = None, include_random: bool = False,
               need_users: bool = True, need_videos: bool = True, strict: bool = False,
               warnings: list[str] | None = None) -> dict[str, list[Path]]:
    """The release's files: {'log': [...], 'user': [...], 'video': [...]} in name order
    (which is time order: 4_08_to_4_21 before 4_22_to_5_08, part1 before part2).

    A standard log the release publishes but the folder lacks is a line in ``warnings``
    (a DataError with ``strict``); a folder of release folders names the one to pass."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError("expected a directory holding the KuaiRand CSV files (log_standard_*.csv, ...)", path=root)
    if not _has_kuairand_files(root) and (root / "data").is_dir():
        root = root / "data"
    if not _has_kuairand_files(root):
        _raise_if_parent_of_releases(root)
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
    have = {p.name[:-3] if p.name.endswith(".gz") else p.name for p in out["log"]}
    missing = [name for name in expected_log_files(wanted) if name not in have]
    if missing:
        message = (f"missing file(s) {', '.join(missing)}: the {wanted or 'KuaiRand'} release has "
                   f"{len(expected_log_files(wanted))} standard logs; only {', '.join(sorted(have))} will be read")
        if strict:
            raise DataError(message + " (strict)", path=root)
        if warnings is not None:
            warnings.append(f"{root}: {message}")
    if include_random:
        out["log"] += pick("log_random", True)
    out["user"] = pick("user_features", need_users)
    out["video"] = pick("video_features_basic", need_videos)
    return out


def _has_kuairand_files(folder: Path) -> bool:
    try:
        return any(_FILE_RE.match(p.name) for p in folder.iterdir())
    except PermissionError:
        raise DataError("permission denied: cannot list this folder", path=folder) from None


def _raise_if_parent_of_releases(root: Path) -> None:
    """A folder holding release folders (KuaiRand-Pure/, KuaiRand-1K/ ...): say which to pass."""
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for candidate in (sub, sub / "data"):
            if candidate.is_dir() and _has_kuairand_files(candidate):
                found.append(sub)
                break
    if found:
        raise DataError(f"holds no KuaiRand file itself but the release folder(s) {', '.join(p.name for p in found)}; "
                        f"pass one of them, e.g. --data-dir {found[0]}", path=root)


def _header(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        # utf-8-sig: a byte-order mark is not part of the first column's name (arrow skips it too)
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            line = fh.readline()
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start} of the header); "
                        "expected a UTF-8 CSV", path=path) from None
    except (OSError, EOFError) as err:  # permissions, a fake or truncated .gz
        raise DataError(f"cannot read the file ({_os_reason(err)})", path=path) from None
    if not line.strip():
        raise DataError("empty file; expected a CSV header and rows", path=path)
    return [c.strip().strip('"') for c in line.rstrip("\r\n").split(",")]


def _os_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


BLOCK_BYTES = 1 << 25  # streamed in ~32 MB blocks: peak memory stays near the kept rows
# pyarrow's streaming CSV reader reads its source ahead on an I/O thread without limit (a
# 118 MB file was read whole before the 4th 4 MB block was consumed): a streamed read
# (block_bytes given) lets it run at most this many blocks ahead of the batches taken.
READ_AHEAD_BLOCKS = 4


class ReadAhead:
    """A file object for pyarrow's CSV reader whose reads wait until the consumer has taken
    the batches parsed so far, ``ahead`` blocks at most (arrow needs the block after a
    batch's to finish its last row, so ``ahead`` >= 3). ``taken()`` after each batch;
    ``close()`` also frees a reader thread left waiting."""

    def __init__(self, raw, ahead: int = READ_AHEAD_BLOCKS):
        self.raw = raw
        self.tokens = threading.Semaphore(ahead)
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        self.tokens.acquire()
        return b"" if self.closed else self.raw.read(size)

    def taken(self) -> None:
        self.tokens.release()

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.tokens.release(1 << 16)
            self.raw.close()

    def __getattr__(self, name):  # e.g. ByteRange.quoted
        return getattr(self.raw, name)


# Compact dtypes of the log columns once validated (a 27K-size log is 300 M rows).
LOG_DTYPES = {"user_id": np.int64, "video_id": np.int64, "time_ms": np.int64,
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
    chunks: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    n_read = 0
    for data, rows in iter_csv(path, columns, what, check=check, keep=keep, dtypes=dtypes):
        n_read += rows
        for c, v in data.items():
            chunks[c].append(v)
    # column by column, each column's blocks dropped once joined: the peak is the table plus
    # one column, not twice the table
    return {c: np.concatenate(chunks.pop(c)) for c in columns}, n_read


def iter_csv(path: Path, columns: Iterable[str], what: str, *, check=None, keep=None, dtypes: dict | None = None,
             block_bytes: int | None = None, byte_range=None):
    """The blocks of :func:`_read_csv` one at a time: yields ``(columns, rows read in the
    block before filtering)``; memory stays at one block (the sharded prepare's pass 1).
    ``byte_range``: a ``csv_ranges.ByteRange`` of ``path`` (its header line, then some of
    its rows) to read instead of the whole file; row numbers in errors then count from the
    range's first row."""
    columns = list(dict.fromkeys(columns))
    header = _header(path)
    for c in columns:
        if c not in header:
            raise DataError(f"missing column; expected the published {what} columns", path=path, column=c)
    types = {c: (TEXT_TYPE if c in STRING_COLUMNS else pa.int64() if c in EXACT_INT_COLUMNS else pa.float64())
             for c in columns}
    n_read = 0
    # Arrow reads its source ahead of the batches taken, without limit (about a GB held on a
    # 1 GB log). The streaming passes (block_bytes given) need memory bounded by the block:
    # a file object throttled to READ_AHEAD_BLOCKS; .gz keeps the path (arrow picks the
    # codec from the name).
    if byte_range is not None:
        source = ReadAhead(byte_range)
    else:
        source = ReadAhead(open(path, "rb")) if block_bytes and path.suffix != ".gz" else path
    try:
        reader = pacsv.open_csv(
            source,
            read_options=pacsv.ReadOptions(block_size=block_bytes or BLOCK_BYTES),
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
            yield {c: (v.astype(dtypes[c]) if dtypes and c in dtypes else v) for c, v in data.items()}, batch.num_rows
            if source is not path:
                source.taken()
    except pa.ArrowInvalid as err:
        raise _csv_error(err, path, header, what) from None
    except (OSError, EOFError) as err:  # a truncated or fake .gz, a file that vanished
        raise DataError(f"cannot read the file after row {n_read} ({_os_reason(err)}); expected a complete "
                        f"{what} CSV", path=path) from None
    finally:
        if source is not path:
            source.close()  # (a byte range: the caller's, closed again by it)
    if n_read == 0 and byte_range is None:
        raise DataError("empty file: a header but no rows", path=path)


def _csv_error(err: Exception, path: Path, header: list[str], what: str) -> DataError:
    msg = str(err)
    m = re.search(r"column #(\d+)", msg)
    if m and int(m.group(1)) < len(header):
        column = header[int(m.group(1))]
        if "invalid UTF8" in msg:
            return DataError("not UTF-8 text; expected a UTF-8 CSV", path=path, column=column)
        kind = "whole numbers" if column in EXACT_INT_COLUMNS else "numbers"
        return DataError(f"wrong type: expected {kind} ({msg.split(': ', 1)[-1]})", path=path, column=column)
    return DataError(f"unreadable CSV ({msg}); expected the published {what} columns", path=path)


# Text columns (a few distinct values each: 'middle_active', '(50,100]') are read
# dictionary-encoded: a block's rows then point to one Python string per distinct value
# (8 B per row) instead of one string object per cell (~60 B), which was most of the user
# side file's memory with millions of users.
TEXT_TYPE = pa.dictionary(pa.int32(), pa.string())


def _dictionary_objects(col: pa.Array) -> np.ndarray:
    """A dictionary-encoded text column as an object array (None for empty cells), its
    equal cells sharing one str object."""
    values = np.array([*col.dictionary.to_pylist(), None], dtype=object)
    idx = col.indices.fill_null(len(values) - 1).to_numpy(zero_copy_only=False)
    return values[idx]


def _batch_arrays(batch: pa.RecordBatch, columns: list[str], path: Path, first_row: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for c in columns:
        col = batch.column(c)
        if c in STRING_COLUMNS:
            out[c] = _dictionary_objects(col)
            continue
        if pa.types.is_integer(col.type):
            if col.null_count:
                row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                expected = "0 or 1" if c in LABEL_COLUMNS else "a value"
                raise DataError(f"missing (NaN) value in row {first_row + row + 1}; expected {expected} in every row",
                                path=path, column=c)
            out[c] = col.to_numpy()  # int64, exact
            continue
        values = col.to_numpy(zero_copy_only=False)  # float64, NaN for empty cells
        if c in INTEGRAL_COLUMNS:
            bad = np.flatnonzero(~np.isnan(values) & ((values != np.round(values)) | (np.abs(values) > FLOAT_EXACT_LIMIT)))
            if len(bad):
                v = values[bad[0]]
                why = "beyond 2**53 (not exactly representable)" if abs(v) > FLOAT_EXACT_LIMIT else "not whole"
                raise DataError(f"wrong type: expected whole numbers, found {v:g} ({why}) in row {first_row + bad[0] + 1}",
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
        if data[c].dtype.kind in "iu":
            continue  # integer columns: nulls were refused while converting
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
    for c, (low, high) in LOG_RANGES.items():
        if c in data:
            bad = np.flatnonzero((data[c] < low) | (data[c] > high))
            if len(bad):
                raise DataError(f"value {data[c][bad[0]]} in row {first_row + bad[0] + 1} is outside {low}..{high}",
                                path=path, column=c)


def _read_log(path: Path, columns: list[str], users: np.ndarray | None) -> tuple[dict[str, np.ndarray], int]:
    return _read_csv(path, columns, "KuaiRand log", check=_check_log_block, keep=_user_filter(users), dtypes=LOG_DTYPES)


def iter_log(path: Path, columns: list[str], users: np.ndarray | None, block_bytes: int | None = None,
             byte_range=None):
    """The validated blocks of one log file (see iter_csv), users filtered, compact dtypes."""
    return iter_csv(path, columns, "KuaiRand log", check=_check_log_block, keep=_user_filter(users),
                    dtypes=LOG_DTYPES, block_bytes=block_bytes, byte_range=byte_range)


def _user_filter(users: np.ndarray | None):
    return None if users is None else (lambda data: np.isin(data["user_id"], users))


def _read_side(paths: list[Path], key: str, columns: list[str], needed: np.ndarray | None = None,
               block_bytes: int | None = None) -> dict:
    """A user or video side file (parts concatenated), one row per unique key; only the
    rows of ``needed`` ids are kept (the 27K video file lists 32 M videos). Read block by
    block: each sparse column kept as per-block codes (``_BlockCodes``, 4 B per row), so the
    file's raw columns (8 B per cell, strings) are never all held at once."""
    what = "KuaiRand user_features" if key == "user_id" else "KuaiRand video_features_basic"
    keep = None if needed is None else (lambda data: np.isin(data[key], needed))
    sparse = [c for c in columns if c in USER_SPARSE or c in VIDEO_SPARSE]
    coded = {c: _BlockCodes() for c in sparse}
    chunks: dict[str, list[np.ndarray]] = {c: [] for c in [key, *columns] if c not in coded}
    for p in paths:
        # block_bytes: read through ReadAhead, a few blocks ahead (the 27K video file is GBs)
        for data, _ in iter_csv(p, [key, *columns], what, keep=keep, block_bytes=block_bytes or BLOCK_BYTES,
                                check=lambda d, path, row: _require_values(d, [key], path, row)):
            for c in sparse:
                coded[c].add(_first_tag(data[c]) if c == "tag" else data[c])
            for c in chunks:
                chunks[c].append(data[c])
            del data
    table: dict = {c: np.concatenate(chunks.pop(c)) for c in list(chunks)}
    table.update(coded)
    ids = table[key].astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{int((counts > 1).sum())} duplicated id(s) (e.g. {uniq[counts > 1][0]}); expected one row per {key}",
                        path=paths[0], column=key)
    table[key] = ids
    return table


class _BlockCodes:
    """pd.factorize of a column read block by block, without the whole column: each block
    factorised alone (codes, its uniques in first-appearance order); at the end the blocks'
    uniques, concatenated in block order, are factorised once -- a value's first place there
    is in the first block holding it, in that block's order, so the result is the whole
    column's first-appearance order exactly. Missing (None / NaN) -> code -1."""

    def __init__(self):
        self.codes: list[np.ndarray] = []
        self.uniques: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> None:
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        self.codes.append(codes.astype(np.int32) if len(uniques) < 2**31 - 1 else codes)
        self.uniques.append(np.asarray(uniques))

    def result(self) -> tuple[np.ndarray, pd.Index]:
        if not self.uniques:
            return np.zeros(0, np.int32), pd.Index([])
        sizes = [len(u) for u in self.uniques]
        global_codes, uniques = pd.factorize(np.concatenate(self.uniques), use_na_sentinel=True)
        small = np.int32 if len(uniques) < 2**31 - 1 else np.int64
        global_codes = global_codes.astype(small)
        offsets = np.r_[0, np.cumsum(sizes)[:-1]]
        out = np.concatenate([take_or(global_codes, np.where(c >= 0, c + o, -1), -1)  # block code -1 stays -1
                              for c, o in zip(self.codes, offsets)])
        self.codes, self.uniques = [], []
        return out, pd.Index(uniques)


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


def load_side(paths: list[Path], key: str, columns: list[str], needed: np.ndarray | None = None,
              block_bytes: int | None = None) -> dict:
    """A side file read once: its ids (a pd.Index for the lookup), every sparse column
    factorised (codes, uniques; ``tag`` cut to its first tag), dense columns as read.
    ``block_bytes``: CSV block size of the read (default BLOCK_BYTES)."""
    table = _read_side(paths, key, columns, needed=needed, block_bytes=block_bytes)
    side = {"key": key, "paths": paths, "columns": columns, "index": pd.Index(table[key])}
    for c in columns:
        side[c] = table.pop(c).result() if c in USER_SPARSE or c in VIDEO_SPARSE else table.pop(c)
    return side


def join_side(frame: dict, sparse: list[str], dense: list[str], side: dict, ids: np.ndarray) -> int:
    """Add the side file's features to ``frame`` per row (by its key); returns the number
    of rows whose id has no side row (they keep unknown features)."""
    idx = side["index"].get_indexer(ids)  # -1 where the id has no side row
    for c in side["columns"]:
        if c in USER_SPARSE or c in VIDEO_SPARSE:
            codes, uniques = side[c]
            frame[c] = _take_sparse(codes, uniques, idx)
            sparse.append(c)
        else:
            name, values = _dense_feature(c, side[c], idx, frame["time"], side["paths"])
            frame[name] = values
            dense.append(name)
    return int((idx < 0).sum())


def take_or(values: np.ndarray, idx: np.ndarray, missing, dtype=None) -> np.ndarray:
    """``values[idx]`` with ``missing`` where idx is -1 (an id without a side row). Costs
    O(len(idx)): appending the fill value to ``values`` first copied the whole side column
    for every shard of the sharded prepare (users x shards)."""
    out = np.full(len(idx), missing, dtype=dtype or values.dtype)
    ok = idx >= 0
    out[ok] = values[idx[ok]]
    return out


def _take_sparse(codes: np.ndarray, uniques: pd.Index, idx: np.ndarray) -> pd.Categorical:
    """Per-row categorical of an entity-level column; -1 (no side row) and None/NaN -> missing."""
    row_codes = take_or(codes, idx, -1)
    return pd.Categorical.from_codes(row_codes, dtype=pd.CategoricalDtype(uniques), validate=False)


def _take_dense(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return take_or(values, idx, np.nan, dtype=np.float64)


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
