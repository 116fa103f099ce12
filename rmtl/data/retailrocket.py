"""Reader of the public RetailRocket e-commerce logs -> RawEvents (one row per impression).

Files (the published schemas, optionally gzipped):
  events.csv                   timestamp (ms), visitorid, event in {view, addtocart, transaction}, itemid, transactionid
  item_properties_part1.csv,
  item_properties_part2.csv    timestamp (ms), itemid, property, value
  category_tree.csv            categoryid, parentid (empty for a root)

An impression is the FIRST view of an item within a session (sessions are cut per
visitor at ``session_gap`` seconds of inactivity; None = one session per visitor).
Labels: ``ctr`` = that item added to cart later in the same session, ``ctcvr`` = bought
later in the same session. "Later" means at a time >= the first view's time: a cart
logged in the same millisecond as its view follows it, one logged before it does not.
With ``purchase_implies_cart`` (default) a purchase also sets ``ctr``, so ctcvr <= ctr
as ESMM-style models assume.

Item features are point-in-time: the value of a property in force at the impression's
time (the latest property row with timestamp <= that time), never a later one; none
yet -> unknown. The join is a vectorised as-of search on sorted (item, time) keys.
"""

from __future__ import annotations

import gzip
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from rmtl.data.raw import RawEvents
from rmtl.data.sessions import assign_sessions
from rmtl.errors import ConfigError, DataError

EVENTS_FILE = "events.csv"
PROPERTY_FILES = ("item_properties_part1.csv", "item_properties_part2.csv")
CATEGORY_FILE = "category_tree.csv"
EVENT_TYPES = ("view", "addtocart", "transaction")
VIEW, CART, BUY = 0, 1, 2
TASKS = ["ctr", "ctcvr"]
# Properties that are ids even though their values look like numbers.
CATEGORICAL_PROPERTIES = ("categoryid", "available")
NUMERIC_VALUE = r"^n-?[0-9]+(\.[0-9]*)?$"  # RetailRocket writes numbers as "n123.000"
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000

DROP_REPEAT_VIEW = "repeat view of an item already viewed in the session"
DROP_CART_NO_VIEW = "addtocart with no earlier view of the item in the session"
DROP_BUY_NO_VIEW = "transaction with no earlier view of the item in the session"

_OPTIONS = ("purchase_implies_cart", "log_numeric", "use_threads")


def read_retailrocket(
    data_dir: str | Path,
    *,
    session_gap: float | None = 1800.0,
    properties: Iterable[str] = ("available",),
    **options,
) -> RawEvents:
    """Read a RetailRocket directory into one row per impression with point-in-time features.

    ``properties``: item properties to use besides ``categoryid`` (always used, with its
    parent from category_tree.csv); "available" by default, other names as they appear in
    the ``property`` column (e.g. "790", "888"). A property whose every non-empty value is
    numeric ("n123.000") becomes a dense feature, any other a categorical one.
    Options: ``purchase_implies_cart`` (True), ``log_numeric`` (True: dense values x ->
    sign(x) log1p|x|, taming price-like tails), ``use_threads`` (True).
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown RetailRocket reader option(s) {unknown}; known: {', '.join(_OPTIONS)}", key=unknown[0])
    purchase_implies_cart = bool(options.get("purchase_implies_cart", True))
    log_numeric = bool(options.get("log_numeric", True))
    use_threads = bool(options.get("use_threads", True))
    if session_gap is not None and not (isinstance(session_gap, (int, float, np.number)) and session_gap > 0):
        raise ConfigError(f"expected a positive number of seconds or None, got {session_gap!r}", key="session_gap")
    if isinstance(properties, str):
        properties = [properties]
    extra = [p for p in dict.fromkeys(str(p) for p in properties) if p != "categoryid"]

    root = Path(data_dir)
    if not root.is_dir():
        raise DataError("not a directory; expected the RetailRocket folder holding events.csv, item_properties_part1/2.csv and category_tree.csv", path=root)
    events_path = _resolve(root, EVENTS_FILE, "events")
    property_paths = [_resolve(root, name, "item properties") for name in PROPERTY_FILES]
    category_path = _resolve(root, CATEGORY_FILE, "category tree")
    tree = _read_category_tree(category_path, use_threads)  # small: read first to fail fast

    # The property files (the bulk of the bytes) are parsed on a second thread while the
    # events are read and labelled here: both halves release the GIL in arrow / numpy.
    with ThreadPoolExecutor(max_workers=1) as pool:
        props_job = pool.submit(_read_properties, property_paths, ["categoryid", *extra], use_threads)
        try:
            ev = _read_events(events_path, use_threads)
            imp, labels, dropped = _impressions(ev, session_gap, purchase_implies_cart)
        except BaseException:
            props_job.cancel()  # an events error wins; the pool still lets a running read finish
            raise
        props = props_job.result()

    frame = pd.DataFrame(
        {
            "user": imp["visitorid"],
            "item": imp["itemid"],
            "time": imp["time"],
            "session": imp["session"],
            "visitorid": imp["visitorid"],
            "itemid": imp["itemid"],
            "hour": ((imp["time"] // MS_PER_HOUR) % 24).astype(np.int64),
            # 1970-01-01 was a Thursday: Monday = 0
            "weekday": ((imp["time"] // MS_PER_DAY + 3) % 7).astype(np.int64),
        }
    )
    sparse = ["visitorid", "itemid", "hour", "weekday"]
    dense: list[str] = []

    category = _as_of(props.get("categoryid"), imp["itemid"], imp["time"])
    cat_ids = _category_ids(props.get("categoryid"), category)
    frame["categoryid"] = cat_ids
    frame["parent_categoryid"] = _parents(tree, cat_ids)
    sparse += ["categoryid", "parent_categoryid"]
    for name in extra:
        rows = props.get(name)
        column = name if name in CATEGORICAL_PROPERTIES else f"prop_{name}"
        values, numeric = _property_feature(rows, name, imp, log_numeric)
        frame[column] = values
        (dense if numeric else sparse).append(column)

    for k, task in enumerate(TASKS):
        frame[task] = labels[:, k]
    return RawEvents(
        frame=frame,
        sparse=sparse,
        dense=dense,
        tasks=list(TASKS),
        source="retailrocket",
        events_read=int(ev["n"]),
        dropped=dropped,
        user_field="visitorid",
        item_field="itemid",
    )


# ----------------------------------------------------------------------------- files

def _resolve(directory: Path, name: str, what: str) -> Path:
    """``directory/name`` or its gzipped twin; DataError when neither exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"file not found; expected the RetailRocket {what} file '{name}' (or '{name}.gz') in {directory}", path=directory / name)


def _read_header(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            line = fh.readline()
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte 0x{err.object[err.start]:02x} in the header); expected a UTF-8 CSV",
                        path=path) from None
    except (OSError, EOFError) as err:  # permissions, a fake or truncated .gz
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise DataError(f"cannot read the file ({reason})", path=path) from None
    return [c.strip().strip('"').strip() for c in line.rstrip("\r\n").split(",")] if line.strip() else []


def _type_word(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "integers"
    if pa.types.is_floating(t):
        return "numbers"
    return "text"


def _read_csv(path: Path, columns: dict[str, pa.DataType], *, required: Iterable[str], header_only: Iterable[str] = (),
              what: str, use_threads: bool) -> pa.Table:
    """Read ``columns`` (name -> arrow type), multi-threaded, with one DataError per problem.

    ``header_only`` columns must be in the header but are not parsed. ``required``
    columns may not hold an empty or NaN cell; text columns never become null.
    """
    header_only = list(header_only)
    expected = [*columns, *header_only]
    header = _read_header(path)
    if not header:
        raise DataError(f"empty file; expected a {what} CSV with header {','.join(expected)}", path=path)
    missing = [c for c in expected if c not in header]
    if missing:
        raise DataError(f"missing column; expected a {what} CSV with columns {', '.join(expected)}, found {', '.join(header)}",
                        path=path, column=missing[0])
    convert = pacsv.ConvertOptions(column_types=columns, include_columns=list(columns), strings_can_be_null=False)
    try:
        table = _parse(path, convert, use_threads)
    except (OSError, EOFError) as err:  # a truncated or fake .gz, permissions
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise DataError(f"cannot read the file ({reason}); expected a complete {what} CSV", path=path) from None
    except pa.ArrowInvalid as err:
        message = str(err)
        if "invalid UTF8" in message:
            found = re.search(r"CSV column #(\d+)", message)
            column = header[int(found.group(1))] if found and int(found.group(1)) < len(header) else None
            raise DataError("not UTF-8 text; expected a UTF-8 CSV", path=path, column=column) from None
        found = re.search(r"CSV column #(\d+)", message)
        column = header[int(found.group(1))] if found and int(found.group(1)) < len(header) else None
        expect = _type_word(columns[column]) if column in columns else "well-formed CSV rows"
        raise DataError(f"wrong type; expected {expect} ({message})", path=path, column=column) from None
    if table.num_rows == 0:
        raise DataError(f"empty file: a header but no rows; expected at least one {what} row", path=path)
    for name in required:
        col = table.column(name)
        bad = col.null_count
        if not bad and pa.types.is_floating(col.type):
            bad = int(pc.sum(pc.is_nan(col)).as_py() or 0)
        if bad:
            raise DataError(f"{bad} empty or NaN value(s); expected {_type_word(columns[name])} in every row", path=path, column=name)
    return table


BLOCK_BYTES = 1 << 22  # parse blocks; a row longer than this gets a larger block (retry)
MAX_BLOCK_BYTES = 1 << 31


def _parse(path: Path, convert: pacsv.ConvertOptions, use_threads: bool) -> pa.Table:
    """pyarrow.csv.read_csv in BLOCK_BYTES blocks; a legal row longer than a block (a
    property value of tens of MB) is retried with blocks large enough to hold it."""
    block = BLOCK_BYTES
    while True:
        try:
            return pacsv.read_csv(path, read_options=pacsv.ReadOptions(use_threads=use_threads, block_size=block),
                                  convert_options=convert)
        except pa.ArrowInvalid as err:
            if "straddling" not in str(err) or block >= MAX_BLOCK_BYTES:
                raise
            block = min(max(block * 4, path.stat().st_size + 1), MAX_BLOCK_BYTES)


def _read_events(path: Path, use_threads: bool) -> dict:
    table = _read_csv(
        path,
        {"timestamp": pa.int64(), "visitorid": pa.int64(), "event": pa.dictionary(pa.int32(), pa.string()), "itemid": pa.int64()},
        required=("timestamp", "visitorid", "itemid"),
        header_only=("transactionid",),
        what="RetailRocket events",
        use_threads=use_threads,
    )
    # dictionary-encoded: map each chunk's few distinct names, then its indices
    event = table.column("event")
    known = pa.array(EVENT_TYPES)
    code = pa.chunked_array([pc.take(pc.index_in(chunk.dictionary, value_set=known), chunk.indices) for chunk in event.chunks],
                            type=pa.int32())
    if code.null_count:
        bad = pc.unique(pc.filter(event, pc.is_null(code)).combine_chunks().dictionary_decode())
        examples = sorted(str(v) for v in bad.to_pylist())[:5]
        raise DataError(f"{code.null_count} row(s) with an unknown event type (e.g. {examples}); expected one of {', '.join(EVENT_TYPES)}",
                        path=path, column="event")
    return {
        "n": table.num_rows,
        "path": path,
        "time": table.column("timestamp").to_numpy(),
        "visitorid": table.column("visitorid").to_numpy(),
        "itemid": table.column("itemid").to_numpy(),
        "event": code.to_numpy().astype(np.int8),
    }


def _read_properties(paths: list[Path], wanted: list[str], use_threads: bool) -> dict[str, dict]:
    """The rows of the wanted properties only, per property: {'item', 'time', 'value', 'path'}.

    The 20 M published rows are cut to the few wanted properties file by file, right
    after parsing, so only one file is ever held in full.
    """
    value_set = pa.array(wanted)
    parts = []
    for path in paths:
        table = _read_csv(
            path,
            {"timestamp": pa.int64(), "itemid": pa.int64(), "property": pa.string(), "value": pa.string()},
            required=("timestamp", "itemid"),
            what="RetailRocket item properties",
            use_threads=use_threads,
        )
        which = pc.index_in(table.column("property"), value_set=value_set)
        keep = pc.is_valid(which)
        parts.append((path, table.filter(keep).drop_columns(["property"]), pc.filter(which, keep)))
        del table
    out: dict[str, dict] = {}
    for k, name in enumerate(wanted):
        items, times, values, where = [], [], [], []
        for path, rows, which in parts:
            mask = pc.equal(which, k)
            sel = rows.filter(mask)
            if sel.num_rows:
                items.append(sel.column("itemid").to_numpy())
                times.append(sel.column("timestamp").to_numpy())
                values.append(sel.column("value").combine_chunks())
                where.append(path)
        if items:
            out[name] = {
                "item": np.concatenate(items),
                "time": np.concatenate(times),
                "value": pa.concat_arrays(values),
                "path": where[0],
            }
    absent = [name for name in wanted if name not in out]
    if absent:  # most likely a mistyped name in `properties`
        raise DataError(f"no row of property {absent[0]!r} in {' or '.join(p.name for p in paths)}; expected the names "
                        f"of the `properties` option to appear in this column (e.g. 'categoryid', 'available', '790')",
                        path=paths[0], column="property")
    return out


def _read_category_tree(path: Path, use_threads: bool) -> tuple[np.ndarray, np.ndarray]:
    table = _read_csv(path, {"categoryid": pa.int64(), "parentid": pa.int64()}, required=("categoryid",),
                      what="RetailRocket category tree", use_threads=use_threads)
    parent = table.column("parentid").to_numpy(zero_copy_only=False)  # float, NaN for roots
    return table.column("categoryid").to_numpy(), np.asarray(parent, dtype=np.float64)


# ----------------------------------------------------------------------------- sessions and labels

def _impressions(ev: dict, session_gap: float | None, purchase_implies_cart: bool) -> tuple[dict, np.ndarray, dict]:
    """First views per (session, item) with their labels, in (visitor, time) order."""
    session, order = assign_sessions(ev["visitorid"], ev["time"], session_gap)
    s = session[order]
    t = ev["time"][order]
    kind = ev["event"][order]
    item = ev["itemid"][order]
    i0, i1 = int(item.min()), int(item.max())
    if (i1 - i0 + 1) * (int(s[-1]) + 1) < 2**62:
        pair = s * (i1 - i0 + 1) + (item - i0)  # one key per (session, item)
    else:  # ids too wide to pack: factorise them first
        codes = pd.factorize(item)[0]
        pair = s * (int(codes.max()) + 1) + codes

    views = np.flatnonzero(kind == VIEW)
    if len(views) == 0:
        raise DataError("no 'view' events; expected views (impressions are the viewed items)", path=ev["path"], column="event")
    # One stable sort of the views by (session, item) finds the first view of each pair
    # (views are in time order, so the first of a run is the earliest) and leaves the
    # impressions sorted by pair for the cart / purchase look-ups below.
    view_pair = pair[views]
    by_view_pair = np.argsort(view_pair, kind="stable")
    run_start = np.r_[True, view_pair[by_view_pair[1:]] != view_pair[by_view_pair[:-1]]]
    first_in_pair_order = by_view_pair[run_start]  # index into `views`, ordered by pair
    is_first = np.zeros(len(views), dtype=bool)
    is_first[first_in_pair_order] = True
    first_view = views[is_first]  # positions in (visitor, time) order, so still time-ordered
    dropped = {DROP_REPEAT_VIEW: int(len(views) - len(first_view))}
    # impression index (time order) of each pair, in pair order
    by_pair = (np.cumsum(is_first) - 1)[first_in_pair_order]
    sorted_pair = view_pair[first_in_pair_order]
    labels = np.zeros((len(first_view), len(TASKS)), dtype=np.int8)
    for k, (code, reason) in enumerate(((CART, DROP_CART_NO_VIEW), (BUY, DROP_BUY_NO_VIEW))):
        rows = np.flatnonzero(kind == code)
        slot = np.minimum(np.searchsorted(sorted_pair, pair[rows]), len(sorted_pair) - 1)
        imp = by_pair[slot]
        later = (sorted_pair[slot] == pair[rows]) & (t[rows] >= t[first_view[imp]])
        dropped[reason] = int((~later).sum())
        labels[imp[later], k] = 1
    if purchase_implies_cart:
        labels[:, 0] |= labels[:, 1]
    src = order[first_view]
    imp = {
        "visitorid": ev["visitorid"][src],
        "itemid": ev["itemid"][src],
        "time": t[first_view],
        "session": s[first_view],
    }
    return imp, labels, {k: v for k, v in dropped.items() if v}


# ----------------------------------------------------------------------------- point-in-time features

def _as_of(rows: dict | None, item: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Index into ``rows`` of the latest row of the same item with time <= the query's; -1 if none.

    (item id, time) are packed into one int64 key, so one sort of the property rows plus
    one searchsorted answers every query; ties on (item, time) resolve to the row read
    last. Falls back to pandas' merge_asof when ids and times are too wide to pack.
    """
    n = len(item)
    if rows is None or len(rows["item"]) == 0 or n == 0:
        return np.full(n, -1, dtype=np.int64)
    p_item, p_time = rows["item"], rows["time"]
    i0 = int(min(p_item.min(), item.min()))
    t0 = int(min(p_time.min(), time.min()))
    span = int(max(p_time.max(), time.max())) - t0 + 1
    if (int(max(p_item.max(), item.max())) - i0 + 1) * span >= 2**62:
        return _as_of_pandas(p_item, p_time, item, time)
    p_key = (p_item - i0) * span + (p_time - t0)
    by_key = np.argsort(p_key, kind="stable")
    p_key = p_key[by_key]
    pos = np.searchsorted(p_key, (item - i0) * span + (time - t0), side="right") - 1
    safe = np.maximum(pos, 0)
    hit = (pos >= 0) & (p_key[safe] // span == item - i0)  # the row found belongs to this item
    return np.where(hit, by_key[safe], -1)


def _as_of_pandas(p_item, p_time, item, time) -> np.ndarray:
    left = pd.DataFrame({"item": item, "time": time, "q": np.arange(len(item))}).sort_values("time", kind="stable")
    right = pd.DataFrame({"item": p_item, "time": p_time, "row": np.arange(len(p_item))}).sort_values("time", kind="stable")
    merged = pd.merge_asof(left, right, on="time", by="item", direction="backward", allow_exact_matches=True)
    out = np.full(len(item), -1, dtype=np.int64)
    found = merged["row"].notna().to_numpy()
    out[merged["q"].to_numpy()[found]] = merged["row"].to_numpy()[found].astype(np.int64)
    return out


def _category_ids(rows: dict | None, index: np.ndarray) -> np.ndarray:
    """Category id in force per impression (float, NaN = unknown)."""
    out = np.full(len(index), np.nan)
    if rows is None:
        return out
    hit = index >= 0
    values = pc.take(rows["value"], pa.array(index[hit]))
    try:
        out[hit] = pc.cast(pc.utf8_trim_whitespace(values), pa.int64()).to_numpy()
    except pa.ArrowInvalid:
        raise DataError("property 'categoryid' has a value that is not an integer category id", path=rows["path"], column="value") from None
    return out


def _parents(tree: tuple[np.ndarray, np.ndarray], category: np.ndarray) -> np.ndarray:
    ids, parent = tree
    by_id = np.argsort(ids, kind="stable")
    sorted_ids = ids[by_id]
    known = ~np.isnan(category)
    out = np.full(len(category), np.nan)
    if len(sorted_ids) and known.any():
        c = category[known].astype(np.int64)
        slot = np.minimum(np.searchsorted(sorted_ids, c), len(sorted_ids) - 1)
        found = sorted_ids[slot] == c
        vals = np.full(len(c), np.nan)
        vals[found] = parent[by_id[slot[found]]]
        out[known] = vals
    return out


def _property_feature(rows: dict | None, name: str, imp: dict, log_numeric: bool) -> tuple[np.ndarray, bool]:
    """Point-in-time values of one property as a float column (NaN = unknown): (column, is_numeric).

    Numeric properties ("n123.000") give their number. Categorical ones give the value
    itself when every value is an integer (categoryid, available, ...), otherwise the
    index of the distinct value text among the property's rows; an empty value is unknown.
    """
    n = len(imp["itemid"])
    if rows is None:
        return np.full(n, np.nan), False
    values = rows["value"]
    empty = pc.equal(values, "")
    numeric = name not in CATEGORICAL_PROPERTIES and bool(
        pc.all(pc.or_(empty, pc.match_substring_regex(values, NUMERIC_VALUE))).as_py())
    if numeric:
        x = pc.cast(pc.utf8_slice_codeunits(pc.if_else(empty, pa.scalar(None, pa.string()), values), 1), pa.float64())
        x = x.to_numpy(zero_copy_only=False)
        if log_numeric:
            x = np.sign(x) * np.log1p(np.abs(x))
    else:
        try:
            x = pc.cast(pc.if_else(empty, pa.scalar(None, pa.string()), values), pa.int64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            x = pd.factorize(values.to_numpy(zero_copy_only=False))[0].astype(np.float64)
            x[empty.to_numpy(zero_copy_only=False)] = np.nan
    x = np.asarray(x, dtype=np.float64)
    index = _as_of(rows, imp["itemid"], imp["time"])
    out = np.full(n, np.nan)
    hit = index >= 0
    out[hit] = x[index[hit]]
    return out, numeric
