"""read_census on small hand-made files, its bad-input errors, and the real test file when present."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from rmtl.data.build import build_session_log
from rmtl.data.census import COLUMNS, DENSE, SPARSE, read_census
from rmtl.errors import ConfigError, DataError

from shared_data import shared_data_dir

_SHARED = shared_data_dir()
REAL_TEST = (_SHARED or Path("/nonexistent")) / "census-income" / "census-income.test.gz"


def record(age=38, marital="Married-civilian spouse present", income="- 50000.", **over) -> list[str]:
    """One census row (42 fields) with plausible values; keyword overrides by column name."""
    values = {name: "Not in universe" for name in COLUMNS}
    values.update({
        "age": str(age), "class_of_worker": "Private", "detailed_industry_recode": "6",
        "detailed_occupation_recode": "36", "education": "High school graduate", "wage_per_hour": "0",
        "marital_stat": marital, "race": "White", "sex": "Female", "capital_gains": "0",
        "capital_losses": "0", "dividends_from_stocks": "0", "instance_weight": "1032.38",
        "migration_code_change_in_msa": "?", "num_persons_worked_for_employer": "4",
        "own_business_or_self_employed": "0", "veterans_benefits": "2", "weeks_worked_in_year": "52",
        "year": "95", "income": income,
    })
    values.update({k: str(v) for k, v in over.items()})
    return [values[name] for name in COLUMNS]


def write(path: Path, rows: list[list[str]], *, gz: bool = False) -> Path:
    text = "".join(", ".join(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def small_rows(n: int = 10) -> list[list[str]]:
    rows = []
    for i in range(n):
        rows.append(record(age=20 + i, marital="Never married" if i % 3 == 0 else "Divorced",
                           income="50000+." if i % 4 == 0 else "- 50000.", education=f"edu{i % 2}"))
    return rows


def test_reads_labels_and_drops_label_columns_from_features(tmp_path):
    raw = read_census(write(tmp_path / "census-income.data", small_rows(10)))
    assert raw.tasks == ["income", "marital"]
    assert raw.frame["income"].tolist() == [1 if i % 4 == 0 else 0 for i in range(10)]
    assert raw.frame["marital"].tolist() == [1 if i % 3 == 0 else 0 for i in range(10)]
    features = set(raw.sparse) | set(raw.dense)
    assert not features & {"income", "marital_stat", "marital", "instance_weight"}
    assert set(raw.dense) == set(DENSE) and "education" in raw.sparse and "year" in raw.sparse
    assert len(raw.sparse) + len(raw.dense) == 42 - 3
    assert raw.frame["user"].tolist() == list(range(10)) and raw.frame["time"].tolist() == list(range(10))
    assert raw.min_session_events == 1 and raw.events_read == 10
    assert np.isnan(raw.frame["instance_weight"]).sum() == 0
    assert raw.frame["migration_code_change_in_msa"].isna().all()  # '?' = missing


def test_folder_with_gzipped_data_and_test_reads_both(tmp_path):
    write(tmp_path / "census-income.data.gz", small_rows(6), gz=True)
    write(tmp_path / "census-income.test", small_rows(4))
    assert len(read_census(tmp_path).frame) == 10
    assert len(read_census(tmp_path, parts=["test"]).frame) == 4
    with pytest.raises(ConfigError, match="nope"):
        read_census(tmp_path, nope=1)


def test_builds_into_a_random_split_session_log(tmp_path):
    raw = read_census(write(tmp_path / "c.data", small_rows(30)))
    log, summary = build_session_log(raw)
    assert log.num_rows == 30 and log.num_sessions == 30
    assert log.spec.extra["split_order"] == "random"
    assert summary["splits"]["train"]["rows"] == 15  # census default 50/25/25, as configs/census.yaml
    assert log.labels.sum(axis=0).tolist() == [8.0, 10.0]
    log6, summary6 = build_session_log(raw, split_ratios=(0.6, 0.2, 0.2))
    assert summary6["splits"]["train"]["rows"] == 18


def census_folder(tmp_path: Path, **rows: int) -> Path:
    """A folder with census-income.<part> of ``rows[part]`` small rows per given part."""
    folder = tmp_path / "census"
    folder.mkdir()
    for part, n in rows.items():
        write(folder / f"census-income.{part}", small_rows(n))
    return folder


def test_train_on_data_test_on_test_when_both_files_exist(tmp_path):
    """The MMoE paper's protocol: .test is the test split, val is carved from .data."""
    folder = census_folder(tmp_path, data=40, test=20)
    raw = read_census(folder)
    assert raw.test_column == "from_test_file" and raw.warnings == []
    log, summary = build_session_log(raw, split_ratios=(0.5, 0.25, 0.25))
    assert summary["splits"]["test"]["rows"] == 20  # exactly the .test rows
    assert summary["splits"]["train"]["rows"] + summary["splits"]["val"]["rows"] == 40
    assert summary["splits"]["val"]["rows"] == 13  # 1/3 of .data (0.25 : 0.5)
    lo, hi = log.splits["test"]
    test_rows = log.session_ptr[lo], log.session_ptr[hi]
    assert log.time[test_rows[0]:test_rows[1]].min() >= 40  # the reader's row numbers of the .test rows
    pooled = read_census(folder, fixed_test=False)
    assert pooled.test_column is None
    _, s2 = build_session_log(pooled, split_ratios=(0.5, 0.25, 0.25))
    assert s2["splits"]["train"]["rows"] == 30


def test_a_folder_with_one_census_file_warns_and_strict_fails(tmp_path):
    folder = census_folder(tmp_path, test=20)
    raw = read_census(folder)
    assert raw.test_column is None and any("census-income.data" in w for w in raw.warnings)
    with pytest.raises(DataError, match="strict"):
        read_census(folder, strict=True)
    with pytest.raises(DataError, match="fixed_test"):
        read_census(folder, fixed_test=True)


def test_prepare_cli_and_census_yaml_agree_on_the_split(tmp_path, capsys):
    from rmtl.cli import main
    from rmtl.config import load_config
    from rmtl.train import load_data

    folder = census_folder(tmp_path, test=40)
    cache = tmp_path / "cache"
    assert main(["prepare", "--source", "census", "--data-dir", str(folder), "--out", str(cache)]) == 0
    out = capsys.readouterr().out
    entry = Path(out.split("wrote ")[-1].strip())
    from rmtl.data.cache import load

    cli_log, _ = load(entry)
    cfg = load_config("census", [f"data.data_dir={folder}", f"data.cache_dir={cache}"])
    yaml_log = load_data(cfg.data, cfg.seed).log
    for split in ("train", "val", "test"):  # the same rows (row numbers) in each split
        np.testing.assert_array_equal(np.sort(cli_log.split(split).time), np.sort(yaml_log.split(split).time))


@pytest.mark.parametrize("case, column", [
    ("short", None), ("long", None), ("age", "age"), ("income", "income"), ("empty", None), ("marital", "marital_stat"),
])
def test_bad_input_names_file_and_column(tmp_path, case, column):
    rows = small_rows(5)
    if case == "short":
        rows = [r[:40] for r in rows]
    elif case == "long":
        rows[2] = rows[2] + ["extra"]
    elif case == "age":
        rows[3][COLUMNS.index("age")] = "thirty"
    elif case == "income":
        rows[1][COLUMNS.index("income")] = "rich."
    elif case == "empty":
        rows = []
    elif case == "marital":
        rows[4][COLUMNS.index("marital_stat")] = "?"
    path = write(tmp_path / "census-income.data", rows)
    with pytest.raises(DataError) as err:
        read_census(path)
    assert str(path) in str(err.value)
    if column:
        assert f"'{column}'" in str(err.value)


def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="census-income.data"):
        read_census(tmp_path)  # empty folder
    with pytest.raises(DataError, match="no such file"):
        read_census(tmp_path / "absent")


def test_real_test_file():
    if not REAL_TEST.is_file():
        pytest.skip(f"real census file not present at {REAL_TEST}")
    raw = read_census(REAL_TEST)
    assert len(raw.frame) == 99_762
    income, marital = raw.frame["income"].mean(), raw.frame["marital"].mean()
    assert income == pytest.approx(0.0620, abs=0.001)  # measured: 6,186 / 99,762
    assert marital == pytest.approx(0.4325, abs=0.002)  # measured: 43.25 % never married
    assert "marital_stat" not in raw.sparse and "income" not in raw.sparse
    assert sorted(raw.sparse + raw.dense) == sorted(SPARSE + DENSE)
