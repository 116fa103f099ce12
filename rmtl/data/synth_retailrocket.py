"""Synthetic RetailRocket logs in exactly the published raw schemas, with planted structure.

Writes ``events.csv``, ``item_properties_part1.csv``, ``item_properties_part2.csv`` and
``category_tree.csv`` (same headers, millisecond timestamps, "n123.000" numeric property
values, weekly property snapshots that change over time, a three-level category tree),
so ``read_retailrocket`` reads them exactly as it reads the real files.

Planted structure (see docs/retailrocket.md for the figures):
* Visitors have geometric(>= 1) sessions (mean ``sessions_per_user``), each starting
  1 hour + exponential (mean ``gap_days``) after the previous one ends; a session views a geometric number of distinct items (mean
  ``views_per_session``, drawn by Zipf-like popularity) seconds-to-minutes apart.
* Add-to-cart after a view: logit = a_c + ``signal`` * z1 - 2.5 [item unavailable at view
  time], where z1 = (b_user + b_item + <u1, v1>/sqrt(d)) / sqrt(3): user and item biases
  plus a user x item affinity (item biases and factors lean on their category's), unit
  variance. a_c is calibrated so that P(cart | impression) = ``cart_rate``.
* Purchase after a cart: logit = a_b + ``signal`` * z2 - 0.3 * (standardised log price),
  z2 = rho z1 + sqrt(1 - rho^2) z', z' an independent factor built like z1,
  rho = ``task_correlation``; a_b is
  calibrated so that P(buy | cart) = ``buy_rate``. So CTR ~ cart_rate and
  CTCVR ~ cart_rate * buy_rate per impression.
* Session dynamics (``dynamics`` = s, default 1; rmtl.data.session_dynamics): a latent
  intent moved by earlier carts, fatigue with position and leaving that depends on intent
  and the last outcome (rows after leaving are not written), all scaled by s; a cart is
  also likelier (+0.6 s) when the session viewed the same category before, and a purchase
  leans on the intent at cart time (+0.5 s h). s = 0 writes exactly the independent draws
  of before (the negative control).
* Noise the reader must skip: repeat views (``repeat_rate`` of impressions) and
  carts / purchases with no earlier view in their session (``orphan_rate`` of sessions).
Everything is drawn with numpy from one seeded generator: same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from rmtl.atomic import atomic_path
from rmtl.data import session_dynamics as dyn
from rmtl.data.synthetic import source_digest
from rmtl.errors import ConfigError

# The cache tag of this writer's output (rmtl.data.synthetic.writer_version): taken at
# import, so it names the code loaded here, session dynamics included.
WRITER_DIGEST = source_digest(__file__, dyn.__file__)

START_MS = 1_430_622_000_000  # 2015-05-03, where the public RetailRocket log begins
SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WEEK = 7 * DAY
LATENT_DIM = 8

DEFAULTS = dict(
    sessions_per_user=3.0,
    views_per_session=5.0,
    cart_rate=0.10,
    buy_rate=0.35,
    signal=1.5,
    repeat_rate=0.10,
    orphan_rate=0.02,
    gap_days=2.0,
    days=60.0,
    new_item_rate=0.05,
    filler_properties=20,
    filler_rows_per_item=6.0,
    property_rows=None,  # total property rows wanted; sets the filler rows when given
    dynamics=1.0,  # strength of the session dynamics; 0 = independent draws
)

HEADERS = {
    "events": "timestamp,visitorid,event,itemid,transactionid",
    "item_properties_part1": "timestamp,itemid,property,value",
    "item_properties_part2": "timestamp,itemid,property,value",
    "category_tree": "categoryid,parentid",
}


def write_retailrocket(
    out_dir: str | Path,
    *,
    users: int = 3000,
    items: int = 800,
    seed: int = 0,
    task_correlation: float = 0.5,
    **options,
) -> dict[str, Path]:
    """Write the four RetailRocket CSVs into ``out_dir``; returns {name: path}.

    Options (defaults in ``DEFAULTS``): sessions_per_user, views_per_session, cart_rate,
    buy_rate, signal, repeat_rate, orphan_rate, gap_days, days, new_item_rate,
    filler_properties, filler_rows_per_item, property_rows.
    The defaults give about 43 k impressions (3000 users x 3 sessions x 5 distinct
    views); 5000 users (the embedded default of ``rmtl.data.synthetic``) about 70 k. Each file is written to a temporary name and then renamed.
    """
    cfg = _check(users, items, task_correlation, options)
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tree, leaf_ids = _category_tree(rng, items)
    item_ids = np.sort(rng.choice(max(2 * items, 10), size=items, replace=False)).astype(np.int64)
    item_leaf = rng.integers(0, len(leaf_ids), items)

    sess, views = _sessions_and_views(rng, users, items, cfg)
    snap0 = START_MS - WEEK + 3 * HOUR
    t_last = int(views["time"].max()) + 2 * HOUR
    n_snap = int((t_last - snap0) // WEEK) + 2
    timeline = _item_timelines(rng, items, n_snap, cfg)

    events = _decide(rng, users, items, item_leaf, sess, views, timeline, snap0, cfg, task_correlation)
    props = _property_rows(rng, items, item_ids, leaf_ids, item_leaf, timeline, snap0, n_snap, cfg)

    visitor_ids = rng.permutation(users).astype(np.int64)
    paths = {}
    paths["events"] = _write(out / "events.csv", HEADERS["events"], _events_table(events, visitor_ids, item_ids))
    half = rng.random(props.num_rows) < 0.55  # the public split is uneven too
    paths["item_properties_part1"] = _write(out / "item_properties_part1.csv", HEADERS["item_properties_part1"], props.filter(pa.array(half)))
    paths["item_properties_part2"] = _write(out / "item_properties_part2.csv", HEADERS["item_properties_part2"], props.filter(pa.array(~half)))
    paths["category_tree"] = _write(out / "category_tree.csv", HEADERS["category_tree"], tree)
    return paths


# ----------------------------------------------------------------------------- checks

def _check(users: int, items: int, rho: float, options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown synthetic RetailRocket option(s) {unknown}; known: {', '.join(sorted(DEFAULTS))}", key=unknown[0])
    cfg = {**DEFAULTS, **options}
    if int(users) < 1:
        raise ConfigError(f"expected an integer >= 1, got {users!r}", key="users")
    if int(items) < 2:
        raise ConfigError(f"expected an integer >= 2, got {items!r}", key="items")
    if not -1.0 <= float(rho) <= 1.0:
        raise ConfigError(f"expected a number in [-1, 1], got {rho!r}", key="task_correlation")
    for key in ("sessions_per_user", "views_per_session"):
        if not float(cfg[key]) >= 1.0:
            raise ConfigError(f"expected a mean >= 1, got {cfg[key]!r}", key=key)
    for key in ("cart_rate", "buy_rate"):
        if not 0.0 < float(cfg[key]) < 1.0:
            raise ConfigError(f"expected a rate in (0, 1), got {cfg[key]!r}", key=key)
    for key in ("repeat_rate", "orphan_rate", "new_item_rate"):
        if not 0.0 <= float(cfg[key]) <= 1.0:
            raise ConfigError(f"expected a rate in [0, 1], got {cfg[key]!r}", key=key)
    for key in ("gap_days", "days"):
        if not float(cfg[key]) > 0:
            raise ConfigError(f"expected a positive number of days, got {cfg[key]!r}", key=key)
    cfg["dynamics"] = dyn.check_strength(cfg["dynamics"])
    if int(cfg["filler_properties"]) < 1 or float(cfg["filler_rows_per_item"]) < 0:
        raise ConfigError("expected filler_properties >= 1 and filler_rows_per_item >= 0", key="filler_properties")
    return cfg


# ----------------------------------------------------------------------------- generation

def _category_tree(rng: np.random.Generator, items: int) -> tuple[pa.Table, np.ndarray]:
    """Roots -> mid categories -> leaves (items sit on leaves); roots have an empty parent."""
    n_leaf = int(np.clip(items // 20, 4, 1200))
    n_mid = max(2, n_leaf // 8)
    n_root = max(1, n_mid // 4)
    total = n_root + n_mid + n_leaf
    ids = rng.choice(3 * total + 10, size=total, replace=False).astype(np.int64)
    roots, mids, leaves = ids[:n_root], ids[n_root : n_root + n_mid], ids[n_root + n_mid :]
    parent = np.concatenate([np.zeros(n_root, np.int64), roots[rng.integers(0, n_root, n_mid)], mids[rng.integers(0, n_mid, n_leaf)]])
    has_parent = np.r_[np.zeros(n_root, bool), np.ones(n_mid + n_leaf, bool)]
    order = rng.permutation(total)
    table = pa.table({"categoryid": ids[order], "parentid": pa.array(parent[order], mask=~has_parent[order])})
    return table, leaves


def _within_group_cumsum(values: np.ndarray, group_start: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at every group (rows of a group are contiguous)."""
    c = np.cumsum(values)
    return c - (c[group_start] - values[group_start])[group]


def _sessions_and_views(rng: np.random.Generator, users: int, items: int, cfg: dict) -> tuple[dict, dict]:
    n_sess = rng.geometric(1.0 / float(cfg["sessions_per_user"]), users)
    sess_user = np.repeat(np.arange(users), n_sess)
    n_total = len(sess_user)
    first_sess = np.r_[0, np.cumsum(n_sess)[:-1]]

    n_views = rng.geometric(1.0 / float(cfg["views_per_session"]), n_total)
    view_sess = np.repeat(np.arange(n_total), n_views)
    popularity = (1.0 + rng.permutation(items)) ** -0.8
    item = rng.choice(items, size=len(view_sess), p=popularity / popularity.sum())
    # distinct items per session: duplicate draws are removed (repeat views come later)
    _, first = np.unique(view_sess * items + item, return_index=True)
    first.sort()
    view_sess, item = view_sess[first], item[first]
    starts_at = np.flatnonzero(np.r_[True, view_sess[1:] != view_sess[:-1]])
    step = np.clip(rng.exponential(90 * SECOND, len(view_sess)), SECOND, 20 * MINUTE)
    step[starts_at] = 0.0
    group = np.repeat(np.arange(len(starts_at)), np.diff(np.r_[starts_at, len(view_sess)]))
    offset = _within_group_cumsum(step, starts_at, group)

    # a session starts 1 h + exponential after the previous one ENDS (its last view plus
    # room for the carts, purchases and repeat views that follow it), so none overlap
    duration = np.zeros(n_total)
    duration[view_sess[starts_at]] = np.add.reduceat(step, starts_at) + 30 * MINUTE
    gaps = HOUR + rng.exponential(float(cfg["gap_days"]) * DAY, n_total)
    gaps[first_sess] = 0.0
    advance = gaps + np.r_[0.0, duration[:-1]]
    advance[first_sess] = 0.0
    first_start = rng.uniform(0, 0.6 * float(cfg["days"]) * DAY, users)
    start = START_MS + first_start[sess_user] + _within_group_cumsum(advance, first_sess, sess_user)
    sess = {"user": sess_user, "start": start}
    views = {"session": view_sess, "item": item, "time": np.round(start[view_sess] + offset).astype(np.int64)}
    return sess, views


def _item_timelines(rng: np.random.Generator, items: int, n_snap: int, cfg: dict) -> dict:
    """Per item and weekly snapshot: availability and log price; first snapshot with data."""
    first = np.zeros(items, dtype=np.int64)
    new = rng.random(items) < float(cfg["new_item_rate"])
    first[new] = rng.integers(1, max(n_snap - 1, 2), int(new.sum()))
    flips = rng.random((items, n_snap)) < 0.15
    available = (rng.random(items) < 0.85)[:, None] ^ (np.cumsum(flips, axis=1) % 2 == 1)
    log_price0 = rng.normal(4.0, 0.9, items)
    changes = rng.random((items, n_snap)) < 0.10
    log_price = log_price0[:, None] + np.cumsum(changes * rng.normal(0.0, 0.15, (items, n_snap)), axis=1)
    return {"first": first, "available": available, "log_price": log_price, "log_price0": log_price0}


def _calibrate(x: np.ndarray, rate: float) -> float:
    """Intercept a with mean(sigmoid(a + x)) = rate (bisection on at most 200 k values)."""
    if len(x) == 0:  # nothing to calibrate on (a tiny log without carts)
        return 0.0
    if len(x) > 200_000:
        x = x[:: len(x) // 200_000 + 1]
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(mid + x)))) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _decide(rng, users, items, item_leaf, sess, views, timeline, snap0, cfg, rho) -> dict:
    """Carts, purchases, repeat views and orphan events around the views; all event rows."""
    d = LATENT_DIM
    leaf_vec = rng.normal(size=(int(item_leaf.max()) + 1, d))
    u1, u2 = rng.normal(size=(users, d)), rng.normal(size=(users, d))
    v1 = 0.6 * leaf_vec[item_leaf] + 0.8 * rng.normal(size=(items, d))
    v2 = 0.6 * leaf_vec[item_leaf][:, ::-1] + 0.8 * rng.normal(size=(items, d))
    vu = sess["user"][views["session"]]
    vi = views["item"]
    # each factor = (user bias + item bias + user x item affinity) / sqrt(3), unit variance;
    # item biases lean on their category's, so categories carry signal for rare items
    n_leaf = len(leaf_vec)
    b_user = rng.normal(size=(2, users))
    b_item = 0.6 * rng.normal(size=(2, n_leaf))[:, item_leaf] + 0.8 * rng.normal(size=(2, items))
    z1 = (b_user[0, vu] + b_item[0, vi] + np.einsum("nd,nd->n", u1[vu], v1[vi]) / np.sqrt(d)) / np.sqrt(3.0)
    z_other = (b_user[1, vu] + b_item[1, vi] + np.einsum("nd,nd->n", u2[vu], v2[vi]) / np.sqrt(d)) / np.sqrt(3.0)
    z2 = rho * z1 + np.sqrt(max(0.0, 1.0 - rho * rho)) * z_other

    snap = np.clip((views["time"] - snap0) // WEEK, 0, timeline["available"].shape[1] - 1)
    known = snap >= timeline["first"][vi]
    unavailable = known & ~timeline["available"][vi, snap]
    signal = float(cfg["signal"])
    x_cart = signal * z1 - 2.5 * unavailable
    a_c = _calibrate(x_cart, float(cfg["cart_rate"]))
    strength = float(cfg["dynamics"])
    if strength > 0:  # carts come easier once the session has looked at the category
        x_cart = x_cart + 0.6 * strength * dyn.earlier_in_session(views["session"], item_leaf[vi])
    uniform = rng.random(len(vi))  # the same draws as without dynamics
    dyn_seed = int(rng.integers(2**62)) if strength > 0 else 0  # only then: s = 0 keeps the old stream
    cart, keep, intent, a_c = dyn.simulate_calibrated(uniform, x_cart, views["session"], strength, dyn_seed,
                                                      float(cfg["cart_rate"]), a_c)
    if not keep.all():  # the user left: later views never happened
        views = {k: v[keep] for k, v in views.items()}
        vi, vu, z2, cart, intent = vi[keep], vu[keep], z2[keep], cart[keep], intent[keep]
    price_z = (timeline["log_price0"] - timeline["log_price0"].mean()) / (timeline["log_price0"].std() + 1e-9)
    x_buy = signal * z2[cart] - 0.3 * price_z[vi[cart]] + 0.5 * strength * intent[cart]
    a_b = _calibrate(x_buy, float(cfg["buy_rate"]))
    buy_idx = np.flatnonzero(cart)[rng.random(len(x_buy)) < 1.0 / (1.0 + np.exp(-(a_b + x_buy)))]

    n = len(vi)
    cart_time = views["time"] + rng.integers(5 * SECOND, 120 * SECOND, n)
    buy_time = cart_time[buy_idx] + rng.integers(30 * SECOND, 600 * SECOND, len(buy_idx))
    rep = rng.random(n) < float(cfg["repeat_rate"])
    rep_time = views["time"][rep] + rng.integers(10 * SECOND, 900 * SECOND, int(rep.sum()))
    # orphans: a cart / purchase just before a session's first view, so never labelled
    n_sessions = len(sess["user"])
    orphan_sess = np.flatnonzero(rng.random(n_sessions) < float(cfg["orphan_rate"]))
    orphan_kind = np.where(rng.random(len(orphan_sess)) < 0.7, 1, 2)
    orphan_time = np.round(sess["start"][orphan_sess]).astype(np.int64) - rng.integers(SECOND, 60 * SECOND, len(orphan_sess))
    orphan_item = rng.integers(0, items, len(orphan_sess))

    kind = np.concatenate([np.zeros(n, np.int8), np.zeros(int(rep.sum()), np.int8), np.ones(int(cart.sum()), np.int8),
                           np.full(len(buy_idx), 2, np.int8), orphan_kind.astype(np.int8)])
    time = np.concatenate([views["time"], rep_time, cart_time[cart], buy_time, orphan_time])
    user = np.concatenate([vu, vu[rep], vu[cart], vu[buy_idx], sess["user"][orphan_sess]])
    item = np.concatenate([vi, vi[rep], vi[cart], vi[buy_idx], orphan_item])
    session = np.concatenate([views["session"], views["session"][rep], views["session"][cart], views["session"][buy_idx], orphan_sess])
    order = np.argsort(time, kind="stable")
    return {"kind": kind[order], "time": time[order], "user": user[order], "item": item[order], "session": session[order],
            "a_cart": a_c, "a_buy": a_b}


def _events_table(ev: dict, visitor_ids: np.ndarray, item_ids: np.ndarray) -> pa.Table:
    is_buy = ev["kind"] == 2
    # one transaction id per session with purchases (a basket), numbered in time order
    _, basket = np.unique(ev["session"][is_buy], return_inverse=True)
    first_seen = np.full(basket.max() + 1 if len(basket) else 0, -1)
    order_seen = np.unique(basket, return_index=True)[1]
    first_seen[basket[np.sort(order_seen)]] = np.arange(len(order_seen))
    tid = np.zeros(len(ev["kind"]), np.int64)
    tid[is_buy] = first_seen[basket]
    names = pa.array(["view", "addtocart", "transaction"])
    return pa.table({
        "timestamp": ev["time"],
        "visitorid": visitor_ids[ev["user"]],
        "event": pc.take(names, pa.array(ev["kind"].astype(np.int32))),
        "itemid": item_ids[ev["item"]],
        "transactionid": pa.array(tid, mask=~is_buy),
    })


def _n_prefixed(x: np.ndarray) -> pa.Array:
    """Integers as RetailRocket writes numbers: 'n123.000'."""
    return pc.binary_join_element_wise("n", pc.cast(pa.array(x.astype(np.int64)), pa.string()), ".000", "")


def _property_rows(rng, items, item_ids, leaf_ids, item_leaf, timeline, snap0, n_snap, cfg) -> pa.Table:
    first = timeline["first"]
    snap_time = snap0 + np.arange(n_snap, dtype=np.int64) * WEEK
    after_first = np.arange(n_snap)[None, :] > first[:, None]
    filler = [str(1000 + 7 * k) for k in range(int(cfg["filler_properties"]))]
    names = ["categoryid", "available", "790", "888", *filler]
    blocks: list[tuple[np.ndarray, np.ndarray, int | np.ndarray, pa.Array]] = []  # (item, time, property index, value)

    # categoryid: at the first snapshot, and a re-categorisation for a few items
    blocks.append((np.arange(items), snap_time[first], 0, pc.cast(pa.array(leaf_ids[item_leaf]), pa.string())))
    moved = np.flatnonzero(rng.random(items) < 0.03)
    moved_at = np.minimum(first[moved] + rng.integers(1, 4, len(moved)), n_snap - 1)
    blocks.append((moved, snap_time[moved_at], 0, pc.cast(pa.array(leaf_ids[rng.integers(0, len(leaf_ids), len(moved))]), pa.string())))

    # available / price ("790"): a row at the first snapshot and at every change after it
    avail = timeline["available"]
    changed = np.zeros_like(avail)
    changed[:, 1:] = avail[:, 1:] != avail[:, :-1]
    i, j = np.nonzero((changed & after_first) | (np.arange(n_snap)[None, :] == first[:, None]))
    blocks.append((i, snap_time[j], 1, pc.cast(pa.array(avail[i, j].astype(np.int8)), pa.string())))
    price = np.round(np.exp(timeline["log_price"])).astype(np.int64) + 1
    changed = np.zeros(price.shape, bool)
    changed[:, 1:] = price[:, 1:] != price[:, :-1]
    i, j = np.nonzero((changed & after_first) | (np.arange(n_snap)[None, :] == first[:, None]))
    blocks.append((i, snap_time[j], 2, _n_prefixed(price[i, j])))
    # "888": a multi-token categorical value (brand id and a size), constant per item
    brand = rng.integers(100_000, 100_000 + max(items // 10, 2), items)
    size = rng.integers(1, 50, items) * 12
    blocks.append((np.arange(items), snap_time[first], 3,
                   pc.binary_join_element_wise(pc.cast(pa.array(brand), pa.string()), _n_prefixed(size), " ")))

    core = sum(len(b[0]) for b in blocks)
    if cfg["property_rows"] is not None:
        n_fill = max(0, int(cfg["property_rows"]) - core)
    else:
        n_fill = int(round(float(cfg["filler_rows_per_item"]) * items))
    f_item = rng.integers(0, items, n_fill)
    f_snap = np.minimum(first[f_item] + (rng.random(n_fill) * (n_snap - first[f_item])).astype(np.int64), n_snap - 1)
    f_name = rng.integers(4, len(names), n_fill)
    f_num = rng.integers(0, 100_000, n_fill)
    f_value = pc.if_else(pa.array(rng.random(n_fill) < 0.5), _n_prefixed(f_num), pc.cast(pa.array(f_num), pa.string()))
    blocks.append((f_item, snap_time[f_snap], f_name, f_value))

    item = np.concatenate([b[0] for b in blocks])
    time = np.concatenate([b[1] for b in blocks])
    prop = np.concatenate([np.full(len(b[0]), b[2]) if np.isscalar(b[2]) else b[2] for b in blocks]).astype(np.int32)
    # rows stay grouped by kind; write_retailrocket deals them at random to the two parts
    return pa.table({
        "timestamp": time,
        "itemid": item_ids[item],
        "property": pa.DictionaryArray.from_arrays(pa.array(prop), pa.array(names)),
        "value": pa.chunked_array([b[3] for b in blocks]),
    })


# ----------------------------------------------------------------------------- writing

def _write(path: Path, header: str, table: pa.Table) -> Path:
    """Header line + unquoted rows, written to a temporary name and renamed into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write((header + "\n").encode())
        pacsv.write_csv(table, fh, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return path
