"""Synthetic KuaiRand release: raw CSV files in exactly the published schemas and names.

Planted structure (all vectorised, deterministic per seed):

* Latent user / video vectors and biases give every impression a click factor ``z1``
  (standardised). A second factor ``z2 = rho * z1 + sqrt(1 - rho^2) * z_ind`` -- with
  ``z_ind`` built the same way from independent latents -- drives ``long_view`` given a
  click, so ``task_correlation`` (rho) makes CTR and CTCVR cooperate (> 0) or conflict (< 0).
* Observable inputs carry part of the signal: the video's first tag is the nearest of a
  few prototypes of its latent vector, ads click less, tabs and hours shift the click rate,
  short videos are watched through more often, user activity sets user_active_degree.
* Rarer feedback (like, follow, comment, forward, profile entry) follows from the same
  factors at realistic low rates, only after a click; hate moves against z1.
* ``play_time_ms`` obeys the published definitions: a click is a valid play (> 7 s),
  a long view is a play >= min(duration, 18 s); videos last at least 8 s so both can differ.
* Users have a gamma-Poisson number of sessions over 2022-04-08 .. 2022-05-08 (Beijing
  time), started at daytime / evening hours and at least 31 minutes apart; a session is a
  geometric number of impressions separated by the play time plus a short swipe gap.
* Session dynamics (``dynamics`` = s, default 1; rmtl.data.session_dynamics): a latent
  intent moved by earlier clicks, fatigue with position, and leaving that depends on
  intent and the last click (impressions after leaving are not written), scaled by s; a
  long view leans on the intent (+0.5 s h). s = 0 writes the independent draws of before.
* Intercepts are solved so the mean click probability equals ``click_rate`` and the mean
  long-view probability among clicks equals ``long_view_rate``.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from rmtl.atomic import atomic_path
from rmtl.data import session_dynamics as dyn
from rmtl.data.synthetic import source_digest
from rmtl.errors import ConfigError, unknown_name

# The cache tag of this writer's output (rmtl.data.synthetic.writer_version): taken at
# import, so it names the code loaded here, session dynamics included.
WRITER_DIGEST = source_digest(__file__, dyn.__file__)

RELEASES = ("pure", "1k", "27k")
SPANS = ("4_08_to_4_21", "4_22_to_5_08")
WINDOW_START = np.datetime64("2022-04-08T00:00:00")  # Beijing time
PERIOD2_START = np.datetime64("2022-04-22T00:00:00")
WINDOW_DAYS = 31
BEIJING_OFFSET_MS = 8 * 3600 * 1000
MIN_SESSION_GAP_MS = 31 * 60 * 1000  # > the default 30-minute session gap

# Categorical vocabularies as published.
ACTIVE_DEGREES = np.array(["full_active", "high_active", "middle_active", "UNKNOWN"], dtype=object)
FOLLOW_EDGES, FOLLOW_RANGES = [0, 10, 50, 100, 150, 250, 500], ["0", "(0,10]", "(10,50]", "(50,100]", "(100,150]", "(150,250]", "(250,500]", "500+"]
FANS_EDGES, FANS_RANGES = [0, 9, 99, 999, 4999, 9999], ["0", "[1,10)", "[10,100)", "[100,1k)", "[1k,5k)", "[5k,1w)", "[1w,10w)"]
FRIEND_EDGES, FRIEND_RANGES = [0, 4, 29, 59, 119, 249], ["0", "[1,5)", "[5,30)", "[30,60)", "[60,120)", "[120,250)", "250+"]
REGISTER_EDGES, REGISTER_RANGES = [30, 60, 90, 180, 365, 730], ["15-30", "31-60", "61-90", "91-180", "181-365", "366-730", "730+"]
ONEHOT_SIZES = [2, 7, 50, 1471, 15, 34, 3, 118, 454, 7, 5, 5, 2, 2, 2, 2, 2, 2]
UPLOAD_TYPES = np.array(["ShortImport", "Web", "Kmovie", "LongImport", "PictureSet", "ShareFromOtherApp",
                         "FollowShoot", "ShortCamera", "UNKNOWN"], dtype=object)
UPLOAD_TYPE_P = [0.45, 0.12, 0.1, 0.1, 0.08, 0.05, 0.04, 0.04, 0.02]
RESOLUTIONS = np.array([(720, 1280), (576, 1024), (1080, 1920), (540, 960), (1280, 720)])
RESOLUTION_P = [0.6, 0.15, 0.15, 0.05, 0.05]
MUSIC_TYPES = np.array([4.0, 9.0, 11.0, 8.0, np.nan])
MUSIC_TYPE_P = [0.45, 0.25, 0.1, 0.05, 0.15]
TABS = np.arange(15)
TAB_P = np.array([0.2, 0.5, 0.1, 0.02, 0.08, 0.01, 0.04, 0.01, 0.01, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005])
HOUR_P = np.array([2, 1, 0.5, 0.3, 0.3, 0.5, 1, 2, 3, 3, 3, 3.5, 4.5, 4, 3.5, 3.5, 3.5, 4, 4.5, 5.5, 6.5, 7, 6, 4])

DEFAULT_RATES = {  # unconditional positive rates of the rarer feedback
    "like_rate": 0.015, "follow_rate": 0.002, "comment_rate": 0.003, "forward_rate": 0.002,
    "hate_rate": 0.001, "profile_enter_rate": 0.008,
}
KNOWN_OPTIONS = ("sessions_per_user", "session_length", "click_rate", "long_view_rate", "random_share",
                 "missing_video_features", "factor_dim", "signal", "dynamics", *DEFAULT_RATES)


def kuairand_file_names(release: str = "1k") -> dict[str, list[str]]:
    """The published file names of a release: {'log_standard', 'log_random', 'user', 'video'}."""
    if release not in RELEASES:
        raise unknown_name("kuairand release", str(release), RELEASES)
    parts = ["_part1", "_part2"] if release == "27k" else [""]
    return {
        "log_standard": [f"log_standard_{span}_{release}{p}.csv" for span in SPANS for p in parts],
        "log_random": [f"log_random_{SPANS[1]}_{release}.csv"],
        "user": [f"user_features_{release}.csv"],
        "video": [f"video_features_basic_{release}.csv"],
    }


def write_kuairand(
    out_dir: str | Path,
    *,
    users: int = 1000,
    items: int = 2000,
    seed: int = 0,
    task_correlation: float = 0.3,
    release: str = "1k",
    sessions_per_user: float = 5.0,
    session_length: float = 12.0,
    click_rate: float = 0.35,
    long_view_rate: float = 0.55,
    random_share: float = 0.04,
    missing_video_features: float = 0.0,
    factor_dim: int = 8,
    signal: float = 1.2,
    dynamics: float = 1.0,
    users_per_chunk: int | None = None,
    **rates: float,
) -> dict[str, Path]:
    """Write a synthetic KuaiRand release into ``out_dir``; returns file stem -> path.

    Defaults give about 57 k impressions (1000 users x ~5 sessions x ~12 impressions).
    ``long_view_rate`` is P(long_view | click); the CTCVR rate is about
    click_rate * long_view_rate. ``random_share`` of the impressions from 2022-04-22 on are
    random exposures (log_random_*.csv, is_rand = 1). ``missing_video_features`` leaves
    that share of videos out of video_features_basic (their rows keep unknown features).
    Rare-feedback rates: like_rate, follow_rate, comment_rate, forward_rate, hate_rate,
    profile_enter_rate (unconditional). ``dynamics`` in [0, 3] scales the session dynamics
    (0 = independent draws). ``users_per_chunk``: simulate and append the users in blocks of
    this many (memory bounded by one block, for logs of 10^8 rows); each block draws from its
    own seed ``[seed, block]`` and calibrates its own intercepts, so the files differ from
    the one-block ones of the same seed (and are deterministic per seed and block size).
    """
    unknown = sorted(set(rates) - set(DEFAULT_RATES))
    if unknown:
        raise unknown_name("write_kuairand option", unknown[0], KNOWN_OPTIONS)
    rates = {**DEFAULT_RATES, **rates}
    names = kuairand_file_names(release)
    _check_options(users, items, task_correlation, sessions_per_user, session_length, click_rate,
                   long_view_rate, random_share, missing_video_features, factor_dim, rates)
    users, items, factor_dim = int(users), int(items), int(factor_dim)
    dynamics = dyn.check_strength(dynamics)
    if users_per_chunk is not None and (isinstance(users_per_chunk, bool) or not isinstance(users_per_chunk, (int, np.integer))
                                        or users_per_chunk < 1):
        raise ConfigError(f"expected a positive whole number, got {users_per_chunk!r}", key="users_per_chunk")
    rng = np.random.default_rng(seed)
    sim = dict(items=items, session_length=session_length, random_share=random_share, rho=float(task_correlation),
               dim=factor_dim, signal=float(signal), click_rate=float(click_rate), lv_rate=float(long_view_rate),
               rates=rates, dynamics=dynamics)
    if users_per_chunk is None or users_per_chunk >= users:
        user_lat = _latents(rng, users, factor_dim)
        video_lat = _latents(rng, items, factor_dim)
        n_sessions = 1 + rng.poisson(rng.gamma(2.0, max(sessions_per_user - 1.0, 1e-9) / 2.0, users))
        user_table = _user_features(rng, users, n_sessions, user_lat)
        video_table, video_info = _video_features(rng, items, video_lat)
        blocks = [(user_table, _simulate_log(rng, n_sessions, user_lat, video_lat, video_info, **sim))]
    else:
        video_lat = _latents(rng, items, factor_dim)
        video_table, video_info = _video_features(rng, items, video_lat)
        blocks = _user_blocks(seed, users, int(users_per_chunk), sessions_per_user, video_lat, video_info, sim)
    if missing_video_features > 0:
        keep = rng.random(items) >= missing_video_features
        video_table = video_table.loc[keep].reset_index(drop=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_blocks = 1 if isinstance(blocks, list) else -(-users // int(users_per_chunk))
    return _write_release(out, names, blocks, n_blocks, video_table)


def _user_blocks(seed, users: int, per_block: int, sessions_per_user: float, video_lat: dict, video_info: dict, sim: dict):
    """(user table, sorted log frame) of each block of users, ids offset by the block's start."""
    for b, first in enumerate(range(0, users, per_block)):
        n = min(per_block, users - first)
        rng = np.random.default_rng([seed, b])
        user_lat = _latents(rng, n, sim["dim"])
        n_sessions = 1 + rng.poisson(rng.gamma(2.0, max(sessions_per_user - 1.0, 1e-9) / 2.0, n))
        user_table = _user_features(rng, n, n_sessions, user_lat)
        frame = _simulate_log(rng, n_sessions, user_lat, video_lat, video_info, **sim)
        user_table["user_id"] += first
        frame["user_id"] += first
        yield user_table, frame


def _simulate_log(rng, n_sessions, user_lat, video_lat, video_info, *, items, session_length, random_share, rho, dim,
                  signal, click_rate, lv_rate, rates, dynamics) -> pd.DataFrame:
    """The impressions of these users, in the published columns, sorted by (user_id, time_ms)."""
    events = _impressions(rng, n_sessions, items, session_length, random_share, video_info["popularity"])
    labels, keep = _labels(rng, events, user_lat, video_lat, video_info, rho, dim, signal, click_rate, lv_rate,
                           rates, dynamics)
    if not keep.all():  # the user left: later impressions never happened
        n_imp = len(keep)
        events = {k: (v[keep] if len(v) == n_imp and k not in ("session_user", "session_start") else v)
                  for k, v in events.items()}
    play = _play_times(rng, labels, video_info["duration_ms"][events["video"]])
    log = _timestamps(rng, events, play)
    log.update(labels)
    log["play_time_ms"] = play
    log["duration_ms"] = video_info["duration_ms"][events["video"]]
    log["profile_stay_time"] = np.where(labels["is_profile_enter"] == 1, np.exp(rng.normal(9.0, 1.0, len(play))), 0).astype(np.int64)
    reads_comments = (labels["is_comment"] == 1) | ((labels["is_click"] == 1) & (rng.random(len(play)) < 0.03))
    log["comment_stay_time"] = np.where(reads_comments, np.exp(rng.normal(9.5, 1.0, len(play))), 0).astype(np.int64)
    log["is_rand"] = (events["is_rand"] & (log["time_ms"] >= _utc_ms(PERIOD2_START))).astype(np.int64)
    return pd.DataFrame({c: log[c] for c in _LOG_ORDER}).sort_values(["user_id", "time_ms"], kind="stable")


def _write_release(out: Path, names: dict, blocks, n_blocks: int, video_table: pd.DataFrame) -> dict[str, Path]:
    """Append each block's rows to the span / part files (27k: one block goes to one part,
    or with a single block its rows are cut in two), the user rows to the user file; every
    file is written under a temporary name and renamed at the end."""
    log_names = [*names["log_standard"], names["log_random"][0]]
    paths = {name: out / name for name in [*log_names, names["user"][0]]}
    written: dict[str, Path] = {}
    with ExitStack() as stack:
        handles = {name: stack.enter_context(open(stack.enter_context(atomic_path(path)), "wb")) for name, path in paths.items()}
        for name in log_names:
            handles[name].write((",".join(_LOG_ORDER) + "\n").encode())
        for b, (user_table, frame) in enumerate(blocks):
            period2 = frame["date"].to_numpy() >= 20220422
            is_rand = frame["is_rand"].to_numpy() == 1
            for span_rows, span in ((~period2 & ~is_rand, SPANS[0]), (period2 & ~is_rand, SPANS[1])):
                files = [n for n in names["log_standard"] if span in n]
                part = frame.loc[span_rows]
                if n_blocks == 1:
                    cut = np.array_split(np.arange(len(part)), len(files))  # 27k: row chunks part1, part2
                else:
                    cut = [np.arange(len(part)) if i == min(b * len(files) // n_blocks, len(files) - 1)
                           else np.arange(0) for i in range(len(files))]
                for name, rows in zip(files, cut):
                    _append_int_csv(part.iloc[rows], handles[name])
            _append_int_csv(frame.loc[is_rand], handles[names["log_random"][0]])
            user_table.to_csv(handles[names["user"][0]], index=False, header=b == 0)
    for name, path in paths.items():
        written[name[:-4]] = path
    written[names["video"][0][:-4]] = _write_csv(video_table, out / names["video"][0])
    return written


_LOG_ORDER = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
              "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
              "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab"]


def _check_options(users, items, rho, spu, slen, click_rate, lv_rate, random_share, missing, dim, rates) -> None:
    if int(users) < 1 or int(items) < 1:
        raise ConfigError(f"expected users >= 1 and items >= 1, got users={users}, items={items}", key="users")
    if not -1.0 <= float(rho) <= 1.0:
        raise ConfigError(f"expected a value in [-1, 1], got {rho}", key="task_correlation")
    if float(spu) < 1 or float(slen) < 1:
        raise ConfigError(f"expected sessions_per_user >= 1 and session_length >= 1, got {spu}, {slen}", key="sessions_per_user")
    for key, value in {"click_rate": click_rate, "long_view_rate": lv_rate, **rates}.items():
        if not 0.0 < float(value) < 1.0:
            raise ConfigError(f"expected a rate strictly between 0 and 1, got {value}", key=key)
    for key, value in {"random_share": random_share, "missing_video_features": missing}.items():
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"expected a share in [0, 1), got {value}", key=key)
    if int(dim) < 1:
        raise ConfigError(f"expected an integer >= 1, got {dim}", key="factor_dim")


def _latents(rng: np.random.Generator, n: int, dim: int) -> dict[str, np.ndarray]:
    """Click-factor and independent second-factor latents of one entity kind."""
    return {"vec": rng.standard_normal((n, dim)), "bias": rng.normal(0, 0.7, n),
            "vec2": rng.standard_normal((n, dim)), "bias2": rng.normal(0, 0.7, n)}


def _bucket(values: np.ndarray, edges: list[int], labels: list[str]) -> np.ndarray:
    return np.asarray(labels, dtype=object)[np.searchsorted(edges, values, side="left")]


def _user_features(rng, users: int, n_sessions: np.ndarray, lat: dict) -> pd.DataFrame:
    activity_rank = np.argsort(np.argsort(-n_sessions - rng.random(users) * 0.5)) / max(users, 1)
    degree = np.select([activity_rank < 0.4, activity_rank < 0.7], [0, 1], 2)
    degree[rng.random(users) < 0.05] = 3
    follow = np.where(rng.random(users) < 0.1, 0, np.exp(rng.normal(3.0, 1.5, users))).astype(np.int64).clip(0, 5000)
    fans = np.where(rng.random(users) < 0.4, 0, np.exp(rng.normal(2.0, 2.0, users))).astype(np.int64).clip(0, 99999)
    friends = np.where(rng.random(users) < 0.5, 0, np.exp(rng.normal(1.5, 1.2, users))).astype(np.int64).clip(0, 2000)
    register = (15 + np.exp(rng.normal(6.0, 1.0, users))).astype(np.int64).clip(15, 3650)
    table = {
        "user_id": np.arange(users, dtype=np.int64),
        "user_active_degree": ACTIVE_DEGREES[degree],
        "is_lowactive_period": (rng.random(users) < np.where(degree == 2, 0.15, 0.02)).astype(np.int64),
        "is_live_streamer": (rng.random(users) < 0.02).astype(np.int64),
        "is_video_author": ((fans > 0) & (rng.random(users) < 0.6)).astype(np.int64),
        "follow_user_num": follow, "follow_user_num_range": _bucket(follow, FOLLOW_EDGES, FOLLOW_RANGES),
        "fans_user_num": fans, "fans_user_num_range": _bucket(fans, FANS_EDGES, FANS_RANGES),
        "friend_user_num": friends, "friend_user_num_range": _bucket(friends, FRIEND_EDGES, FRIEND_RANGES),
        "register_days": register, "register_days_range": _bucket(register, REGISTER_EDGES, REGISTER_RANGES),
    }
    # Two encrypted features are noisy bins of the user bias (observable signal), the rest noise.
    for i, size in enumerate(ONEHOT_SIZES):
        if i in (1, 4):
            noisy = lat["bias"] + rng.normal(0, 0.5, users)
            table[f"onehot_feat{i}"] = np.searchsorted(np.quantile(noisy, np.linspace(0, 1, size + 1)[1:-1]), noisy)
        else:
            table[f"onehot_feat{i}"] = np.minimum(rng.zipf(1.6, users) - 1, size - 1)
    return pd.DataFrame(table)


def _distinct_ids(rng, low: int, high: int, n: int) -> np.ndarray:
    """n distinct random ids in [low, high) without materialising the whole range."""
    ids = np.unique(rng.integers(low, high, 2 * n + 16))
    while len(ids) < n:  # only when n approaches high - low
        ids = np.unique(np.r_[ids, rng.integers(low, high, 2 * n + 16)])
    return rng.permutation(ids)[:n]


def _video_features(rng, items: int, lat: dict) -> tuple[pd.DataFrame, dict]:
    n_authors = max(1, items // 3)
    author_pool = _distinct_ids(rng, 0, 8_839_735, n_authors)
    author = author_pool[np.minimum(rng.zipf(1.5, items) - 1, n_authors - 1)]
    n_proto = 30
    protos = rng.standard_normal((lat["vec"].shape[1], n_proto))
    tag_names = rng.choice(69, n_proto, replace=False)
    first_tag = tag_names[np.argmax(lat["vec"] @ protos, axis=1)]
    second = rng.integers(0, 69, items)
    tags = first_tag.astype(str).astype(object)
    with_second = (rng.random(items) < 0.4) & (second != first_tag)
    tags[with_second] = tags[with_second] + "," + second[with_second].astype(str).astype(object)
    duration = np.round(np.exp(rng.normal(np.log(25_000), 0.8, items)).clip(8_000, 600_000), -2)
    upload_age_days = np.exp(rng.normal(4.0, 1.3, items)).astype(np.int64).clip(0, 2000)
    upload_dt = (WINDOW_START.astype("datetime64[D]") - upload_age_days.astype("timedelta64[D]")).astype(str).astype(object)
    res = RESOLUTIONS[rng.choice(len(RESOLUTIONS), items, p=RESOLUTION_P)]
    is_ad = rng.random(items) < 0.04
    table = pd.DataFrame({
        "video_id": np.arange(items, dtype=np.int64),
        "author_id": author.astype(np.int64),
        "video_type": np.where(is_ad, "AD", "NORMAL").astype(object),
        "upload_dt": upload_dt,
        "upload_type": UPLOAD_TYPES[rng.choice(len(UPLOAD_TYPES), items, p=UPLOAD_TYPE_P)],
        "visible_status": np.where(rng.random(items) < 0.97, 1, 0).astype(np.int64),
        "video_duration": duration,
        "server_width": res[:, 0], "server_height": res[:, 1],
        "music_id": _distinct_ids(rng, 10**8, 10**9, max(1, items // 4))[rng.integers(0, max(1, items // 4), items)],
        "music_type": MUSIC_TYPES[rng.choice(len(MUSIC_TYPES), items, p=MUSIC_TYPE_P)],
        "tag": tags,
    })
    # Exposure popularity: Zipf over a random ranking, tilted towards videos users like.
    popularity = (1.0 / (rng.permutation(items) + 20.0) ** 0.8) * np.exp(0.5 * lat["bias"])
    info = {"duration_ms": duration.astype(np.int64), "is_ad": is_ad, "popularity": popularity / popularity.sum()}
    return table, info


def _impressions(rng, n_sessions: np.ndarray, items: int, session_length: float, random_share: float,
                 popularity: np.ndarray) -> dict[str, np.ndarray]:
    users = len(n_sessions)
    session_user = np.repeat(np.arange(users), n_sessions)
    n_sess = len(session_user)
    length = rng.geometric(1.0 / session_length, n_sess)
    session_of = np.repeat(np.arange(n_sess), length)
    n = len(session_of)
    # Session start (before spacing): a day of the window and an hour weighted to evenings.
    day = rng.integers(0, WINDOW_DAYS - 1, n_sess)
    hour = rng.choice(24, n_sess, p=HOUR_P / HOUR_P.sum())
    start = (day * 24 + hour) * 3_600_000 + rng.integers(0, 3_600_000, n_sess)
    is_rand = rng.random(n) < random_share
    video = rng.choice(items, n, p=popularity)
    video[is_rand] = rng.integers(0, items, int(is_rand.sum()))  # random exposure: uniform
    return {"user": session_user[session_of], "session": session_of, "session_user": session_user,
            "session_start": start, "video": video, "tab": rng.choice(TABS, n_sess, p=TAB_P / TAB_P.sum())[session_of],
            "start_hour": hour[session_of], "is_rand": is_rand}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _intercept(score: np.ndarray, target: float) -> float:
    """The a with mean(sigmoid(a + score)) == target: Newton steps kept inside a bisection
    bracket (the mean is increasing in a), so a handful of passes over the scores."""
    lo, hi = -40.0, 40.0
    a = float(np.log(target / (1.0 - target)) - score.mean())
    for _ in range(100):
        p = _sigmoid(a + score)
        gap = p.mean() - target
        if abs(gap) < 1e-10:
            break
        lo, hi = (a, hi) if gap < 0 else (lo, a)
        slope = float((p * (1.0 - p)).mean())
        step = a - gap / slope if slope > 0 else np.nan
        a = step if lo < step < hi else 0.5 * (lo + hi)
    return a


def _bernoulli(rng, score: np.ndarray, target: float, among: np.ndarray | None = None) -> np.ndarray:
    """0/1 draws with logit a + score; a calibrated so the mean rate (among ``among``) is ``target``."""
    mask = np.ones(len(score), dtype=bool) if among is None else among
    a = _intercept(score[mask], target) if mask.any() else 0.0
    draw = rng.random(len(score)) < _sigmoid(a + score)
    return (draw & mask).astype(np.int64)


def _labels(rng, ev: dict, ul: dict, vl: dict, video_info: dict, rho: float, dim: int, signal: float,
            click_rate: float, lv_rate: float, rates: dict, strength: float = 0.0) -> tuple[dict, np.ndarray]:
    """(labels of the kept impressions, keep mask over ``ev``'s impressions)."""
    u, v = ev["user"], ev["video"]
    norm = np.sqrt(2 * 0.7 ** 2 + 1.0)
    z1 = (ul["bias"][u] + vl["bias"][v] + np.einsum("ij,ij->i", ul["vec"][u], vl["vec"][v]) / np.sqrt(dim)) / norm
    z_ind = (ul["bias2"][u] + vl["bias2"][v] + np.einsum("ij,ij->i", ul["vec2"][u], vl["vec2"][v]) / np.sqrt(dim)) / norm
    z2 = rho * z1 + np.sqrt(max(1.0 - rho * rho, 0.0)) * z_ind
    tab_effect = np.linspace(0.3, -0.4, 15)[ev["tab"]]
    hour_effect = 0.15 * np.cos((ev["start_hour"] - 21) / 24 * 2 * np.pi)
    duration = video_info["duration_ms"][v]
    score = signal * z1 + tab_effect + hour_effect - 0.6 * video_info["is_ad"][v]
    a = _intercept(score, click_rate)
    uniform = rng.random(len(score))  # the same draws _bernoulli made before the dynamics
    dyn_seed = int(rng.integers(2**62)) if strength > 0 else 0  # only then: s = 0 keeps the old stream
    drawn, keep, intent, _ = dyn.simulate_calibrated(uniform, score, ev["session"], strength, dyn_seed, click_rate, a)
    click = drawn[keep].astype(np.int64)
    z1, z2, duration, v, intent = z1[keep], z2[keep], duration[keep], v[keep], intent[keep]
    clicked = click == 1
    long_view = _bernoulli(rng, signal * z2 - 0.5 * np.log(duration / 25_000.0) + 0.5 * strength * intent, lv_rate,
                           among=clicked)
    engaged = 0.8 * signal * (z1 + z2) + 1.0 * long_view
    cond = {k: min(rates[k] / max(clicked.mean(), 1e-9), 0.9) for k in rates}
    profile = _bernoulli(rng, engaged, cond["profile_enter_rate"], among=clicked)
    return {
        "is_click": click,
        "long_view": long_view,
        "is_like": _bernoulli(rng, engaged, cond["like_rate"], among=clicked),
        "is_follow": _bernoulli(rng, engaged + 2.0 * profile, cond["follow_rate"], among=clicked),
        "is_comment": _bernoulli(rng, engaged, cond["comment_rate"], among=clicked),
        "is_forward": _bernoulli(rng, engaged, cond["forward_rate"], among=clicked),
        "is_hate": _bernoulli(rng, -signal * z1, rates["hate_rate"]),
        "is_profile_enter": profile,
    }, keep


def _play_times(rng, labels: dict, duration: np.ndarray) -> np.ndarray:
    """Play time consistent with the published is_click (> 7 s) and long_view (>= min(d, 18 s))."""
    r = rng.random(len(duration))
    long_thr = np.minimum(duration, 18_000)
    no_click = r * 6_900
    short_play = 7_001 + r * (long_thr - 7_001 - 1)
    long_play = long_thr + r * np.maximum(1.3 * duration - long_thr, 1_000)
    play = np.where(labels["long_view"] == 1, long_play, np.where(labels["is_click"] == 1, short_play, no_click))
    return play.astype(np.int64)


def _segment_cumsum_exclusive(values: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Per-segment exclusive running sum (segments contiguous and in order)."""
    total = np.cumsum(values) - values
    first = np.r_[0, np.flatnonzero(segment[1:] != segment[:-1]) + 1]
    seg_start = np.repeat(total[first], np.diff(np.r_[first, len(values)]))
    return total - seg_start


def _timestamps(rng, ev: dict, play: np.ndarray) -> dict[str, np.ndarray]:
    """time_ms, date and hourmin of every impression; sessions of a user never overlap."""
    dwell = play + 1_000 + rng.exponential(2_000, len(play)).astype(np.int64)
    offset = _segment_cumsum_exclusive(dwell, ev["session"])
    session_ms = np.bincount(ev["session"], weights=dwell).astype(np.int64)
    # Sort each user's session starts, then push them apart so each one begins at least
    # MIN_SESSION_GAP_MS after the previous one ends: s'_i = C_i + max_{j<=i}(s_j - C_j).
    su = ev["session_user"]
    order = np.lexsort((ev["session_start"], su))
    s = ev["session_start"][order].astype(np.int64)
    length = session_ms[order]
    c = _segment_cumsum_exclusive(length + MIN_SESSION_GAP_MS, su[order])
    big = (np.abs(s).max() + np.abs(c).max() + 1) * 4
    run = np.maximum.accumulate(s - c + su[order] * big) - su[order] * big
    start = np.empty_like(s)
    start[order] = c + run
    local_ms = start[ev["session"]] + offset  # Beijing time since WINDOW_START
    time_ms = _utc_ms(WINDOW_START) + local_ms
    # date / hourmin as the real log stamps them: the hour of a moment 5 + Exp(6) minutes
    # later, so the last minutes of an hour often carry the next hour (18 % of rows, as in
    # KuaiRand-Pure) and a few of the last minutes of a day the next date. time_ms is exact.
    delay_min = np.minimum(5.0 + rng.exponential(6.0, len(local_ms)), 59.0)
    stamp_ms = local_ms + (delay_min * 60_000).astype(np.int64)
    day, day_of_row = np.unique(stamp_ms // 86_400_000, return_inverse=True)  # few distinct days
    ymd = (WINDOW_START.astype("datetime64[D]") + day.astype("timedelta64[D]")).astype(str)
    date = np.array([int(d.replace("-", "")) for d in ymd], dtype=np.int64)[day_of_row]
    hour = (stamp_ms % 86_400_000) // 3_600_000
    return {"user_id": ev["user"].astype(np.int64), "video_id": ev["video"].astype(np.int64),
            "date": date, "hourmin": hour * 100, "time_ms": time_ms, "tab": ev["tab"].astype(np.int64)}


def _utc_ms(beijing: np.datetime64) -> int:
    return int(beijing.astype("datetime64[ms]").astype(np.int64)) - BEIJING_OFFSET_MS


def _append_int_csv(frame: pd.DataFrame, fh) -> None:
    """All-integer rows (the logs) without a header, fast: pyarrow's writer."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pacsv.write_csv(table, fh, write_options=pacsv.WriteOptions(include_header=False))


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write like the published files (pandas to_csv: bare header, NaN as empty), atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path
