"""RetailRocket reader and synthetic writer: hand-made CSVs and a synthetic round trip."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from rmtl.data import retailrocket as rr
from rmtl.data.retailrocket import read_retailrocket
from rmtl.data.synth_retailrocket import HEADERS, write_retailrocket
from rmtl.errors import ConfigError, DataError

H = 3_600_000  # one hour in ms
EVENTS_HEADER = "timestamp,visitorid,event,itemid,transactionid"
PROPS_HEADER = "timestamp,itemid,property,value"


def write_dir(tmp: Path, events: list[str], props1: list[str] | None = None, props2: list[str] | None = None,
              tree: list[str] | None = None, *, events_header: str = EVENTS_HEADER) -> Path:
    """A RetailRocket folder from row lists (without headers)."""
    (tmp / "events.csv").write_text("\n".join([events_header, *events]) + "\n")
    (tmp / "item_properties_part1.csv").write_text("\n".join([PROPS_HEADER, *(props1 or ["0,10,categoryid,5", "0,10,available,1"])]) + "\n")
    (tmp / "item_properties_part2.csv").write_text("\n".join([PROPS_HEADER, *(props2 or ["0,11,categoryid,6"])]) + "\n")
    (tmp / "category_tree.csv").write_text("\n".join(["categoryid,parentid", *(tree or ["5,1", "6,1", "1,"])]) + "\n")
    return tmp


def by_time(raw, user: int | None = None) -> dict:
    f = raw.frame if user is None else raw.frame[raw.frame["user"] == user]
    return {int(t): row for t, row in zip(f["time"], f.to_dict("records"))}


# ----------------------------------------------------------------------------- point in time

def test_property_changing_between_two_views_gives_each_view_its_value(tmp_path):
    events = ["1000,1,view,10,", "5000,2,view,10,", "9000,3,view,10,"]
    props1 = ["0,10,categoryid,5", "0,10,available,1", "4000,10,available,0", "8000,10,available,1"]
    props2 = ["2000,10,790,n100.000", "6000,10,790,n250.000", "0,11,categoryid,6"]
    raw = read_retailrocket(write_dir(tmp_path, events, props1, props2), properties=["available", "790"], log_numeric=False)
    rows = by_time(raw)
    assert [rows[t]["available"] for t in (1000, 5000, 9000)] == [1.0, 0.0, 1.0]
    # the price set at 2000 is unknown at 1000 (no later value leaks back), 100 at 5000, 250 at 9000
    assert np.isnan(rows[1000]["prop_790"])
    assert rows[5000]["prop_790"] == 100.0 and rows[9000]["prop_790"] == 250.0
    assert "prop_790" in raw.dense and "available" in raw.sparse


def test_value_set_at_the_exact_view_time_is_in_force(tmp_path):
    events = ["4000,1,view,10,", "3999,2,view,10,"]
    props1 = ["0,10,categoryid,5", "0,10,available,1", "4000,10,available,0"]
    raw = read_retailrocket(write_dir(tmp_path, events, props1))
    rows = by_time(raw)
    assert rows[4000]["available"] == 0.0 and rows[3999]["available"] == 1.0


def test_category_parent_numeric_log_and_categorical_text(tmp_path):
    events = ["1000,1,view,10,", "2000,1,view,11,", "3000,1,view,12,"]
    props1 = ["0,10,categoryid,5", "0,11,categoryid,6", "0,10,888,abc n12.000", "0,11,888,xyz"]
    props2 = ["0,10,790,n99.000", "0,11,790,n0.000"]  # item 12 has no properties at all
    raw = read_retailrocket(write_dir(tmp_path, events, props1, props2, ["5,1", "6,2", "1,", "2,"]), properties=["790", "888"])
    rows = by_time(raw)
    assert rows[1000]["categoryid"] == 5 and rows[1000]["parent_categoryid"] == 1
    assert rows[2000]["categoryid"] == 6 and rows[2000]["parent_categoryid"] == 2
    assert np.isnan(rows[3000]["categoryid"]) and np.isnan(rows[3000]["parent_categoryid"])
    assert rows[1000]["prop_790"] == pytest.approx(np.log1p(99.0))  # log_numeric default
    assert "prop_888" in raw.sparse and rows[1000]["prop_888"] != rows[2000]["prop_888"]
    assert np.isnan(rows[3000]["prop_888"])
    assert raw.user_field == "visitorid" and raw.item_field == "itemid"


def test_hour_and_weekday_context(tmp_path):
    t = 1_430_746_200_000  # 2015-05-04 13:30 UTC, a Monday
    raw = read_retailrocket(write_dir(tmp_path, [f"{t},1,view,10,", f"{t + 1000},1,view,11,", f"{t + 24 * H},2,view,10,"]))
    rows = by_time(raw)
    assert (rows[t]["hour"], rows[t]["weekday"]) == (13, 0)
    assert (rows[t + 24 * H]["hour"], rows[t + 24 * H]["weekday"]) == (13, 1)
    assert {"hour", "weekday", "visitorid", "itemid", "categoryid", "parent_categoryid", "available"} <= set(raw.sparse)


def test_as_of_matches_pandas_merge_asof():
    rng = np.random.default_rng(3)
    rows = {"item": rng.integers(0, 50, 2000), "time": rng.integers(0, 10_000, 2000)}
    q_item, q_time = rng.integers(0, 60, 3000), rng.integers(0, 10_000, 3000)
    fast = rr._as_of(rows, q_item, q_time)
    slow = rr._as_of_pandas(rows["item"], rows["time"], q_item, q_time)
    found = fast >= 0
    assert np.array_equal(found, slow >= 0)
    # same (item, time) key; equal-key rows may differ in which one is chosen
    assert np.array_equal(rows["time"][fast[found]], rows["time"][slow[found]])
    assert np.all(rows["item"][fast[found]] == q_item[found]) and np.all(rows["time"][fast[found]] <= q_time[found])


# ----------------------------------------------------------------------------- labels and sessions

def test_labels_count_only_later_events_of_the_same_session(tmp_path):
    events = [
        "500,1,addtocart,11,",  # cart BEFORE item 11 is viewed: does not count
        "1000,1,view,10,",
        "2000,1,view,11,",
        "3000,1,addtocart,10,",  # after the view of 10: ctr
        "3500,1,view,10,",  # repeat view: skipped
        "5000,1,transaction,10,7",  # bought: ctcvr
        "6000,1,view,12,",
        "6000,1,addtocart,12,",  # same millisecond as the view: counts as later
        "9000,1,transaction,13,8",  # item 13 never viewed
    ]
    raw = read_retailrocket(write_dir(tmp_path, events))
    rows = by_time(raw)
    assert len(raw.frame) == 3
    assert (rows[1000]["ctr"], rows[1000]["ctcvr"]) == (1, 1)
    assert (rows[2000]["ctr"], rows[2000]["ctcvr"]) == (0, 0)
    assert (rows[6000]["ctr"], rows[6000]["ctcvr"]) == (1, 0)
    assert raw.dropped == {rr.DROP_REPEAT_VIEW: 1, rr.DROP_CART_NO_VIEW: 1, rr.DROP_BUY_NO_VIEW: 1}
    assert raw.events_read == len(events) and raw.tasks == ["ctr", "ctcvr"]


def test_purchase_without_cart_sets_ctr_unless_disabled(tmp_path):
    events = ["1000,1,view,10,", "2000,1,transaction,10,1"]
    d = write_dir(tmp_path, events)
    assert by_time(read_retailrocket(d))[1000]["ctr"] == 1
    row = by_time(read_retailrocket(d, purchase_implies_cart=False))[1000]
    assert (row["ctr"], row["ctcvr"]) == (0, 1)


def test_session_gap_cuts_sessions_and_labels_do_not_cross_them(tmp_path):
    events = ["0,1,view,10,", "1000,1,view,11,", f"{2 * H},1,addtocart,10,", f"{2 * H + 1000},1,view,10,"]
    d = write_dir(tmp_path, events)
    raw = read_retailrocket(d, session_gap=1800.0)
    rows = by_time(raw)
    assert rows[0]["session"] == rows[1000]["session"] != rows[2 * H + 1000]["session"]
    # the cart 2 h later is in a new session where item 10 was not yet viewed
    assert rows[0]["ctr"] == 0 and rows[2 * H + 1000]["ctr"] == 0
    assert raw.dropped[rr.DROP_CART_NO_VIEW] == 1
    # one session per visitor: the later cart now labels the first view; the re-view is a repeat
    one = read_retailrocket(d, session_gap=None)
    assert one.frame["session"].nunique() == 1 and len(one.frame) == 2
    assert by_time(one)[0]["ctr"] == 1 and one.dropped[rr.DROP_REPEAT_VIEW] == 1
    # a wider gap joins them too
    assert read_retailrocket(d, session_gap=3 * 3600.0).frame["session"].nunique() == 1


def test_sessions_are_per_visitor(tmp_path):
    events = ["1000,1,view,10,", "1500,2,view,10,", "2000,2,addtocart,10,"]
    raw = read_retailrocket(write_dir(tmp_path, events))
    rows = by_time(raw)
    assert rows[1000]["session"] != rows[1500]["session"]
    assert rows[1000]["ctr"] == 0 and rows[1500]["ctr"] == 1


def test_gzipped_files_are_read(tmp_path):
    d = write_dir(tmp_path, ["1000,1,view,10,", "2000,1,addtocart,10,"])
    data = (d / "events.csv").read_bytes()
    (d / "events.csv").unlink()
    with gzip.open(d / "events.csv.gz", "wb") as fh:
        fh.write(data)
    assert by_time(read_retailrocket(d))[1000]["ctr"] == 1


# ----------------------------------------------------------------------------- bad input

GOOD = ["1000,1,view,10,", "2000,1,addtocart,10,"]


@pytest.mark.parametrize("missing", ["events.csv", "item_properties_part1.csv", "item_properties_part2.csv", "category_tree.csv"])
def test_missing_file(tmp_path, missing):
    d = write_dir(tmp_path, GOOD)
    (d / missing).unlink()
    with pytest.raises(DataError, match=missing):
        read_retailrocket(d)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        read_retailrocket(tmp_path / "nowhere")


def test_missing_column(tmp_path):
    d = write_dir(tmp_path, ["1000,1,view,10"], events_header="timestamp,visitorid,event,itemid")
    with pytest.raises(DataError, match=r"events\.csv.*column 'transactionid'.*missing column") as err:
        read_retailrocket(d)
    assert err.value.column == "transactionid"


def test_missing_property_column(tmp_path):
    d = write_dir(tmp_path, GOOD)
    (d / "item_properties_part2.csv").write_text("timestamp,itemid,value\n0,10,5\n")
    with pytest.raises(DataError, match=r"item_properties_part2\.csv.*column 'property'"):
        read_retailrocket(d)


@pytest.mark.parametrize("row,column", [("1000,abc,view,10,", "visitorid"), ("1.5e3,1,view,10,", "timestamp"), ("1000,1,view,x10,", "itemid")])
def test_wrong_type(tmp_path, row, column):
    d = write_dir(tmp_path, [row, *GOOD])
    with pytest.raises(DataError, match=rf"events\.csv, column '{column}': wrong type; expected integers") as err:
        read_retailrocket(d)
    assert err.value.column == column


def test_wrong_type_in_category_tree(tmp_path):
    d = write_dir(tmp_path, GOOD, tree=["5,top"])
    with pytest.raises(DataError, match=r"category_tree\.csv, column 'parentid': wrong type"):
        read_retailrocket(d)


def test_non_integer_category_value(tmp_path):
    d = write_dir(tmp_path, GOOD, props1=["0,10,categoryid,shoes", "0,10,available,1"])
    with pytest.raises(DataError, match=r"column 'value'.*categoryid"):
        read_retailrocket(d)


def test_unknown_event_type(tmp_path):
    d = write_dir(tmp_path, [*GOOD, "3000,1,click,10,"])
    with pytest.raises(DataError, match=r"events\.csv, column 'event': 1 row\(s\) with an unknown event type \(e\.g\. \['click'\]\)"):
        read_retailrocket(d)


@pytest.mark.parametrize("row,column", [(",1,view,10,", "timestamp"), ("1000,NaN,view,10,", "visitorid"), ("1000,1,view,,", "itemid")])
def test_nan_in_required_column(tmp_path, row, column):
    d = write_dir(tmp_path, [*GOOD, row])
    with pytest.raises(DataError, match=rf"column '{column}': 1 empty or NaN value"):
        read_retailrocket(d)


def test_nan_in_property_item(tmp_path):
    d = write_dir(tmp_path, GOOD, props2=["0,,categoryid,6"])
    with pytest.raises(DataError, match=r"item_properties_part2\.csv, column 'itemid': 1 empty or NaN"):
        read_retailrocket(d)


@pytest.mark.parametrize("content", ["", EVENTS_HEADER + "\n"])
def test_empty_events_file(tmp_path, content):
    d = write_dir(tmp_path, GOOD)
    (d / "events.csv").write_text(content)
    with pytest.raises(DataError, match=r"events\.csv: empty file"):
        read_retailrocket(d)


def test_empty_property_file(tmp_path):
    d = write_dir(tmp_path, GOOD)
    (d / "item_properties_part1.csv").write_text("")
    with pytest.raises(DataError, match=r"item_properties_part1\.csv: empty file"):
        read_retailrocket(d)


def test_no_views(tmp_path):
    with pytest.raises(DataError, match=r"column 'event': no 'view' events"):
        read_retailrocket(write_dir(tmp_path, ["1000,1,addtocart,10,"]))


def test_property_that_never_appears(tmp_path):
    with pytest.raises(DataError, match=r"item_properties_part1\.csv, column 'property': no row of property '79'"):
        read_retailrocket(write_dir(tmp_path, GOOD), properties=["available", "79"])


def test_unknown_option_and_bad_gap(tmp_path):
    d = write_dir(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="properies"):
        read_retailrocket(d, properies=["790"])
    for gap in (0, -5.0, "30min"):
        with pytest.raises(ConfigError, match="session_gap"):
            read_retailrocket(d, session_gap=gap)


# ----------------------------------------------------------------------------- synthetic logs

SMALL = dict(users=500, items=150, sessions_per_user=3.0, views_per_session=5.0)


def test_synthetic_files_have_the_real_schemas_and_are_deterministic(tmp_path):
    a = write_retailrocket(tmp_path / "a", seed=7, **SMALL)
    b = write_retailrocket(tmp_path / "b", seed=7, **SMALL)
    c = write_retailrocket(tmp_path / "c", seed=8, **SMALL)
    assert set(a) == set(HEADERS)
    for name, path in a.items():
        first = path.read_text().splitlines()[0]
        assert first == HEADERS[name]
        assert path.read_bytes() == b[name].read_bytes()
    assert a["events"].read_bytes() != c["events"].read_bytes()
    assert not list((tmp_path / "a").glob(".*tmp"))  # no temporary file left
    lines = a["events"].read_text().splitlines()[1:]
    assert all(len(line.split(",")) == 5 for line in lines[:200])
    assert lines[0].split(",")[0].isdigit() and len(lines[0].split(",")[0]) == 13  # ms timestamps
    props = (a["item_properties_part1"].read_text() + a["item_properties_part2"].read_text()).splitlines()
    assert any(",790,n" in line and line.endswith(".000") for line in props)
    tree = a["category_tree"].read_text().splitlines()[1:]
    assert any(line.endswith(",") for line in tree) and any(not line.endswith(",") for line in tree)


def test_synthetic_round_trip_has_the_planted_rates(tmp_path):
    paths = write_retailrocket(tmp_path, seed=1, cart_rate=0.2, buy_rate=0.4, **SMALL)
    raw = read_retailrocket(tmp_path, properties=["available", "790", "888"])
    f = raw.frame
    assert 3000 < len(f) < 12000
    assert f["ctr"].mean() == pytest.approx(0.2, abs=0.03)
    assert f["ctcvr"].mean() == pytest.approx(0.2 * 0.4, abs=0.02)
    assert (f["ctcvr"] <= f["ctr"]).all()
    # the planted noise shows up as skipped rows of each kind
    assert set(raw.dropped) == {rr.DROP_REPEAT_VIEW, rr.DROP_CART_NO_VIEW, rr.DROP_BUY_NO_VIEW}
    assert raw.events_read == len(paths["events"].read_text().splitlines()) - 1
    # features are mostly known, and availability changes over time for some items
    assert f["categoryid"].notna().mean() > 0.8 and f["parent_categoryid"].notna().mean() > 0.8
    assert (f.groupby("itemid")["available"].nunique() > 1).any()
    assert "prop_790" in raw.dense and "prop_888" in raw.sparse
    # the affinity is learnable: items carted more often in the first half stay ahead in the second
    half = f["time"] < f["time"].median()
    rate = f.groupby([half, "itemid"])["ctr"].mean().unstack(0).dropna()
    assert np.corrcoef(rate[True], rate[False])[0, 1] > 0.2


def test_unavailable_items_are_carted_less(tmp_path):
    write_retailrocket(tmp_path, seed=2, **SMALL)
    f = read_retailrocket(tmp_path).frame
    assert f.loc[f["available"] == 0, "ctr"].mean() < 0.5 * f.loc[f["available"] == 1, "ctr"].mean()


def test_task_correlation_moves_the_conversion_factor(tmp_path):
    # with rho = 1 buying follows the carting affinity; with rho = -1 it opposes it,
    # so among carted impressions the users who cart most buy least
    def buy_given_cart_by_user_cart_rate(rho, out):
        write_retailrocket(out, seed=4, users=400, items=60, sessions_per_user=4.0, views_per_session=6.0,
                           task_correlation=rho, cart_rate=0.3, buy_rate=0.5, signal=2.5)
        f = read_retailrocket(out).frame
        pair = f.groupby(["visitorid", "itemid"]).agg(ctr=("ctr", "mean"), ctcvr=("ctcvr", "sum"), n=("ctr", "size"))
        carted = pair[pair["ctr"] > 0]
        return np.corrcoef(carted["ctr"], carted["ctcvr"] / np.maximum(carted["n"] * carted["ctr"], 1))[0, 1]

    assert buy_given_cart_by_user_cart_rate(1.0, tmp_path / "pos") > buy_given_cart_by_user_cart_rate(-1.0, tmp_path / "neg")


def test_synthetic_rejects_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="task_correlation"):
        write_retailrocket(tmp_path, task_correlation=1.5)
    with pytest.raises(ConfigError, match="sesions_per_user"):
        write_retailrocket(tmp_path, sesions_per_user=2)
    with pytest.raises(ConfigError, match="cart_rate"):
        write_retailrocket(tmp_path, cart_rate=0.0)


# ----------------------------------------------------------------------------- through prepare()

def test_prepare_builds_from_synthetic_files_and_leaves_no_cache_on_bad_input(tmp_path):
    from rmtl.data.prepare import prepare

    raw_dir = tmp_path / "raw"
    write_retailrocket(raw_dir, seed=3, **SMALL)
    p = prepare("retailrocket", raw_dir, cache_dir=tmp_path / "cache")
    spec = p.log.spec
    assert spec.tasks == ["ctr", "ctcvr"] and spec.user_field == "visitorid" and spec.item_field == "itemid"
    assert {"categoryid", "parent_categoryid", "available", "hour", "weekday"} <= set(spec.sparse_fields)
    assert p.summary["dropped"]["reader"][rr.DROP_REPEAT_VIEW] > 0
    # one session per visitor gives fewer, longer sessions
    q = prepare("retailrocket", raw_dir, cache_dir=tmp_path / "cache", session_gap=None)
    assert q.log.num_sessions < p.log.num_sessions

    bad = tmp_path / "bad"
    write_retailrocket(bad, seed=3, users=50, items=20)
    with open(bad / "events.csv", "a") as fh:
        fh.write("1430622000000,1,purchase,3,\n")
    before = set((tmp_path / "cache").rglob("*"))
    with pytest.raises(DataError, match="unknown event type"):
        prepare("retailrocket", bad, cache_dir=tmp_path / "cache")
    assert set((tmp_path / "cache").rglob("*")) == before
