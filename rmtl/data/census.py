"""Reader of the UCI KDD Census-Income files (census-income.data / .test, gzipped or not).

The two-task benchmark of MMoE and DRGrad: task ``income`` = income above 50K (label
"50000+."), task ``marital`` = marital status "Never married". Both label columns are
removed from the inputs; 'instance weight' is a survey weight, not a feature (it stays
in the frame as ``instance_weight`` for callers who want it). The rows have no users,
items or times: user = time = row number, item = 0, and every row is its own one-event
session (``min_session_events = 1``), so the builder splits them at random.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from rmtl.data.raw import RawEvents
from rmtl.errors import ConfigError, DataError

# The 42 columns in file order, as named in census-income.names (snake_case).
COLUMNS = [
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode",
    "education", "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat",
    "major_industry_code", "major_occupation_code", "race", "hispanic_origin", "sex",
    "member_of_a_labor_union", "reason_for_unemployment", "full_or_part_time_employment_stat",
    "capital_gains", "capital_losses", "dividends_from_stocks", "tax_filer_stat",
    "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household",
    "instance_weight", "migration_code_change_in_msa", "migration_code_change_in_reg",
    "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother",
    "country_of_birth_self", "citizenship", "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits", "weeks_worked_in_year",
    "year", "income",
]
# Continuous per census-income.names; the numerically coded nominal columns (industry and
# occupation recodes, own business, veterans benefits, year) are categorical.
DENSE = [
    "age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
    "num_persons_worked_for_employer", "weeks_worked_in_year",
]
LABEL_COLUMNS = ("income", "marital_stat")
NOT_FEATURES = ("instance_weight",)
SPARSE = [c for c in COLUMNS if c not in DENSE and c not in LABEL_COLUMNS and c not in NOT_FEATURES]
TASKS = ["income", "marital"]

PARTS = {"data": "census-income.data", "test": "census-income.test"}
INCOME_LABELS = {"50000+": 1, "-50000": 0}  # after removing spaces and the trailing "."
NEVER_MARRIED = "Never married"


def census_files(path: str | Path, parts=("data", "test")) -> list[Path]:
    """The census files a path stands for: the file itself, or the parts found in a folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError("no such file or directory; expected census-income.data[.gz] / census-income.test[.gz] or their folder", path=path)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"unknown census part(s) {unknown}; known: {', '.join(PARTS)}", key="parts")
    found = []
    for part in parts:
        for name in (PARTS[part], PARTS[part] + ".gz"):
            if (path / name).is_file():
                found.append(path / name)
                break
    if not found:
        wanted = ", ".join(f"{PARTS[p]}[.gz]" for p in parts)
        raise DataError(f"no census file found; expected {wanted}", path=path)
    return found


def read_census(path: str | Path, *, parts=("data", "test"), fixed_test: bool | None = None,
                strict: bool = False, **options) -> RawEvents:
    """Read census-income.data / .test (a file, or a folder holding either or both).

    ``parts`` chooses which files of a folder are read (rows of .data first, then .test).
    ``fixed_test``: the MMoE paper's protocol, train on .data and test on .test (val carved
    from .data); None = whenever both files are read, False = pool the rows and split them
    at random, True = require both files. ``strict``: a folder missing one of the two files
    is an error (otherwise a warning in the summary).
    """
    if options:
        raise ConfigError(f"unknown census reader option(s) {sorted(options)}; known: parts, fixed_test, strict",
                          key=sorted(options)[0])
    files = census_files(path, parts)
    warnings = []
    if Path(path).is_dir() and len(files) < len(parts):
        missing = [PARTS[p] for p in parts if not any(f.name.startswith(PARTS[p]) for f in files)]
        message = f"missing {', '.join(missing)}[.gz]: only {', '.join(f.name for f in files)} is read and split at random"
        if strict or fixed_test:
            raise DataError(message + (" (strict)" if strict else " (fixed_test needs both files)"), path=path)
        warnings.append(f"{path}: {message}")
    frames = [_read_one(f) for f in files]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    n = len(frame)
    rows = np.arange(n, dtype=np.int64)
    out = pd.DataFrame({"user": rows, "item": np.zeros(n, dtype=np.int64), "time": rows})
    out = pd.concat([out, frame[SPARSE + DENSE + ["instance_weight"]], frame[TASKS]], axis=1)
    is_test = np.concatenate([np.full(len(fr), f.name.startswith(PARTS["test"])) for f, fr in zip(files, frames)])
    use_fixed = (fixed_test is not False) and is_test.any() and not is_test.all()
    if use_fixed:
        out["from_test_file"] = is_test.astype(np.int8)
    return RawEvents(
        frame=out, sparse=list(SPARSE), dense=list(DENSE), tasks=list(TASKS), source="census",
        events_read=n, dropped={}, min_session_events=1, warnings=warnings,
        test_column="from_test_file" if use_fixed else None,
    )


def _read_one(file: Path) -> pd.DataFrame:
    # pyarrow's CSV reader (gzip detected from the name) is strict about the column count
    # and several times faster than pandas' on this file.
    try:
        table = pcsv.read_csv(
            file,
            read_options=pcsv.ReadOptions(column_names=COLUMNS),
            convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS},
                                                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as err:
        msg = str(err).splitlines()[0]
        if "invalid UTF8" in msg:
            found = re.search(r"CSV column #(\d+)", msg)
            column = COLUMNS[int(found.group(1))] if found and int(found.group(1)) < len(COLUMNS) else None
            raise DataError("not UTF-8 text; expected a UTF-8 census file", path=file, column=column) from None
        if "Empty CSV file" in msg or "Empty" in msg:
            raise DataError("empty file; expected 42 comma-separated columns per row", path=file) from None
        raise DataError(f"expected 42 comma-separated columns per row ({msg})", path=file) from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise DataError(f"cannot read the file ({reason}); expected a complete census file", path=file) from None
    if table.num_rows == 0:
        raise DataError("no rows; expected census records", path=file)

    columns = {}
    for name in COLUMNS:
        values = pc.utf8_trim_whitespace(table.column(name))
        columns[name] = pc.if_else(pc.equal(values, "?"), pa.scalar(None, pa.string()), values)  # '?' = missing
    for name in DENSE + ["instance_weight"]:
        try:
            columns[name] = pc.cast(columns[name], pa.float64())
        except pa.ArrowInvalid:
            _raise_bad_number(columns[name].to_pandas(), file, name)
    income = columns.pop("income")
    marital = columns.pop("marital_stat")
    frame = pa.table(columns).to_pandas()

    income_key = pc.utf8_rtrim(pc.replace_substring(income, " ", ""), ".").to_pandas()
    mapped = income_key.map(INCOME_LABELS)
    bad = mapped.isna().to_numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        shown = "an empty value" if not income_key.iloc[first] or pd.isna(income_key.iloc[first]) else repr(income[first].as_py())
        raise DataError(f"row {first + 1}: {shown}; expected '50000+.' or '- 50000.'", path=file, column="income")
    frame["income"] = mapped.to_numpy(dtype=np.int8)

    missing = pc.is_null(marital).to_numpy(zero_copy_only=False)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise DataError(f"row {first + 1}: missing value ('?'); expected a marital status", path=file, column="marital_stat")
    frame["marital"] = pc.equal(marital, NEVER_MARRIED).to_numpy(zero_copy_only=False).astype(np.int8)
    return frame


def _raise_bad_number(col: pd.Series, file: Path, name: str) -> None:
    values = pd.to_numeric(col, errors="coerce")
    bad = (values.isna() & col.notna()).to_numpy()
    first = int(np.flatnonzero(bad)[0]) if bad.any() else 0
    raise DataError(f"row {first + 1}: {col.iloc[first]!r} is not a number", path=file, column=name)
