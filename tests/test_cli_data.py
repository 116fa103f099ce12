"""`rmtl prepare` and `rmtl synth` through rmtl.cli.main."""

from __future__ import annotations

import pytest

from rmtl.cli import main
from test_census import small_rows, write


def test_prepare_prints_summary_then_hits_cache(tmp_path, capsys):
    data = write(tmp_path / "census-income.data", small_rows(20))
    argv = ["prepare", "--source", "census", "--data-dir", str(data), "--out", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "events read   20" in out and "pos income" in out and "pos marital" in out
    assert "cache: miss, wrote" in out
    assert main(argv) == 0
    assert "cache: hit" in capsys.readouterr().out


def test_prepare_no_cache_and_session_gap_none(tmp_path, capsys):
    data = write(tmp_path / "census-income.data", small_rows(10))
    argv = ["prepare", "--source", "census", "--data-dir", str(data), "--out", str(tmp_path / "cache"),
            "--session-gap", "none", "--min-count", "2", "--no-cache"]
    assert main(argv) == 0
    assert "cache: not used" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()


def test_bad_file_exits_2_with_one_line_and_no_cache(tmp_path, capsys):
    rows = small_rows(5)
    rows[1][-1] = "lots."
    data = write(tmp_path / "census-income.data", rows)
    code = main(["prepare", "--source", "census", "--data-dir", str(data), "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rmtl prepare: error:")
    assert str(data) in lines[0] and "'income'" in lines[0]
    assert not any(p.name.startswith("census-") for p in (tmp_path / "cache").glob("*"))


def test_census_without_data_dir_asks_for_it(tmp_path, capsys):
    assert main(["prepare", "--source", "census", "--out", str(tmp_path)]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_bad_session_gap_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--source", "census", "--session-gap", "soon"])
    assert exc.value.code == 2


def test_synth_writes_files_the_prepare_command_reads(tmp_path, capsys):
    out = tmp_path / "kr"
    assert main(["synth", "--schema", "kuairand", "--out", str(out), "--users", "40", "--items", "30",
                 "--seed", "3", "--task-correlation", "0.5"]) == 0
    listed = capsys.readouterr().out
    assert any(p.is_file() for p in out.iterdir()) and str(out) in listed
    assert main(["prepare", "--source", "kuairand", "--data-dir", str(out), "--out", str(tmp_path / "cache")]) == 0
    assert "pos ctr" in capsys.readouterr().out


def test_split_ratios_and_reader_options_reach_prepare(tmp_path, capsys):
    folder = tmp_path / "census"
    folder.mkdir()
    write(folder / "census-income.data", small_rows(10))
    write(folder / "census-income.test", small_rows(20))
    argv = ["prepare", "--source", "census", "--data-dir", str(folder), "--no-cache",
            "--split-ratios", "0.5,0.25,0.25", "--reader-option", 'parts=["test"]']
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "events read   20" in out
    train_line = next(line for line in out.splitlines() if line.startswith("train"))
    assert train_line.split()[1] == "10"
    assert main(argv[:-1] + ["parts=[\"nope\"]"]) == 2
    assert "nope" in capsys.readouterr().err
