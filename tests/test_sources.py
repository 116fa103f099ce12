"""The data-source registry: a new source is one reader (+ optional synthetic writer) and
one registration; prepare, the embedded default, the CLI and the split order follow."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from rmtl.cli import main
from rmtl.data import sources
from rmtl.data.prepare import prepare
from rmtl.data.raw import RawEvents
from rmtl.errors import ConfigError, DataError


def write_toy(out_dir, *, users, items, seed=0):
    """A toy raw schema: one CSV of (user, item, ts, colour, price, click, buy)."""
    rng = np.random.default_rng(seed)
    n = users * 6
    frame = pd.DataFrame({"user": np.repeat(np.arange(users), 6), "item": rng.integers(0, items, n),
                          "ts": np.tile(np.arange(6) * 60, users) + np.repeat(np.arange(users) * 10_000, 6),
                          "colour": rng.choice(["red", "blue"], n), "price": rng.random(n)})
    frame["click"] = (rng.random(n) < 0.4).astype(int)
    frame["buy"] = frame["click"] & (rng.random(n) < 0.5)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / "toy.csv", index=False)
    return {"events": out_dir / "toy.csv"}


def read_toy(data_dir, **options):
    path = data_dir / "toy.csv"
    if not path.is_file():
        raise DataError("no toy.csv", path=path)
    raw = pd.read_csv(path)
    frame = pd.DataFrame({"user": raw["user"], "item": raw["item"], "time": raw["ts"].astype(np.int64) * 1000,
                          "user_id": raw["user"], "item_id": raw["item"], "colour": raw["colour"],
                          "price": raw["price"], "ctr": raw["click"], "ctcvr": raw["buy"]})
    return RawEvents(frame=frame, sparse=["user_id", "item_id", "colour"], dense=["price"], tasks=["ctr", "ctcvr"],
                     source="toy", events_read=len(raw), user_field="user_id", item_field="item_id")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))  # registrations end with the test
    sources.register_source("toy", sources.DataSource(reader=read_toy, synthetic_writer=write_toy,
                                                      synthetic_sizes={"users": 80, "items": 20}))
    return "toy"


def test_a_registered_source_prepares_from_its_embedded_default(toy, tmp_path):
    assert "toy" in sources.source_names() and "toy" in sources.synthetic_names()
    p = prepare("toy", cache_dir=tmp_path)
    assert p.log.spec.tasks == ["ctr", "ctcvr"] and p.log.num_rows == 480
    assert p.data_dir.name.startswith("toy-default-")
    assert prepare("toy", cache_dir=tmp_path).from_cache


def test_a_registered_source_trains_from_the_command_line(toy, tmp_path, capsys):
    code = main(["train", "-c", "quickstart", "data.source=toy", f"data.cache_dir={tmp_path / 'cache'}",
                 "--run-dir", str(tmp_path / "run"), "--no-progress", "train.max_steps=4", "train.batch_size=64",
                 "model.options.expert_dims=[8]", "train.num_threads=1"])
    assert code == 0
    assert (tmp_path / "run" / "train" / "metrics.json").is_file()


def test_unknown_or_bad_registrations_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown data source 'nosuch'.*census"):
        prepare("nosuch", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="already registered"):
        sources.register_source("census", sources.get_source("census"))
    with pytest.raises(ConfigError, match="module:function"):
        sources.DataSource(reader="no_colon")
    with pytest.raises(ConfigError, match="split_order"):
        sources.DataSource(reader="a:b", split_order="shuffled")
    with pytest.raises(DataError, match="no embedded synthetic default"):
        prepare("census", cache_dir=tmp_path)  # census has no writer: the user must give the file


def test_the_sources_split_order_is_the_default(monkeypatch, toy, tmp_path):
    monkeypatch.setitem(sources._SOURCES, "toy", dataclasses.replace(sources.get_source("toy"), split_order="random"))
    p = prepare("toy", cache_dir=tmp_path)
    assert p.summary["options"]["split_order"] is None and p.log.spec.extra["split_order"] == "random"


def test_cli_rejects_an_unknown_source_before_loading(tmp_path, capsys):
    assert main(["train", "-c", "quickstart", "data.source=tenrec", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "data.source" in err and "tenrec" in err and not (tmp_path / "r").exists()


def _doc_blocks():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "adding-a-data-source.md").read_text()
    return [b.split("\n```", 1)[0] for b in text.split("```python\n")[1:]]


def test_the_docs_examples_run(tmp_path, monkeypatch):
    """docs/adding-a-data-source.md: the Tenrec reader on a file in the assumed schema, the
    strategy and the backbone, each registered as the page says, trained one step."""
    import types

    from rmtl import backbones, weighting
    from rmtl.config import load_config
    from rmtl.train import fit

    reader_src, source_line, strategy_src, strategy_line, backbone_src, backbone_line = _doc_blocks()
    mods = {}
    for name, src in (("tenrec", reader_src), ("my_method", strategy_src), ("two_tower", backbone_src)):
        mods[name] = types.ModuleType(name)
        exec(compile(src, f"<docs {name}>", "exec"), mods[name].__dict__)
    # the registration lines, as they would sit in their registry dicts
    assert source_line.strip().startswith('"tenrec": DataSource(reader="rmtl.data.tenrec:read_tenrec")')
    assert strategy_line.strip() == '"my_method": "rmtl.weighting.my_method:MyMethod",'
    assert backbone_line.strip() == '"two_tower": "rmtl.backbones.two_tower:TwoTower",'
    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    sources.register_source("tenrec", sources.DataSource(reader=mods["tenrec"].read_tenrec))
    weighting.register_strategy("my_method", mods["my_method"].MyMethod)
    backbones.register("two_tower", mods["two_tower"].TwoTower)

    rng = np.random.default_rng(0)
    n = 600
    click = rng.integers(0, 2, n)
    pd.DataFrame({"user_id": np.repeat(np.arange(60), 10), "item_id": rng.integers(0, 50, n), "click": click,
                  "follow": 0, "like": click & rng.integers(0, 2, n), "share": 0,
                  "video_category": rng.integers(0, 5, n), "watching_times": rng.integers(0, 3, n),
                  "gender": rng.integers(0, 3, n), "age": rng.integers(0, 8, n)}).to_csv(tmp_path / "QB-video.csv",
                                                                                          index=False)
    cfg = load_config("quickstart", ["data.source=tenrec", f"data.data_dir={tmp_path}", f"run_dir={tmp_path / 'run'}",
                                     f"data.cache_dir={tmp_path / 'cache'}", "data.session_gap=null",
                                     "model.name=two_tower", "model.options.hidden=8", "strategy.name=my_method",
                                     "strategy.options.temperature=0.5", "train.max_steps=3", "train.batch_size=64",
                                     "train.progress=false", "train.num_threads=1"])
    try:
        result = fit(cfg)
    finally:
        weighting.registry._REGISTRY.pop("my_method", None)
        backbones.registry._REGISTRY.pop("two_tower", None)
    assert result.steps == 3 and set(result.metrics["test"]) == {"ctr", "ctcvr"}


def test_strict_reaches_only_readers_registered_as_taking_it(monkeypatch, tmp_path):
    import inspect

    seen = []

    def read_strict(data_dir, **options):
        seen.append(options.get("strict"))
        return read_toy(data_dir)

    builtin = sources.source_names()
    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    for name, takes in (("toy_strict", True), ("toy_plain", False)):
        sources.register_source(name, sources.DataSource(reader=read_strict, synthetic_writer=write_toy,
                                                         synthetic_sizes={"users": 20, "items": 5},
                                                         reader_takes_strict=takes))
        assert main(["prepare", "--source", name, "--no-cache", "--strict", "--out", str(tmp_path)]) == 0
    assert seen == [True, None]
    # the built-in registrations say what their readers take
    for name in builtin:
        params = inspect.signature(sources.reader(name)).parameters
        assert sources.get_source(name).reader_takes_strict == ("strict" in params), name


def test_writer_version_names_the_loaded_code_not_the_file_on_disk(tmp_path, monkeypatch):
    """A long-lived process holding an old writer must not tag its output with the version
    of a newer file on disk: the digest is taken when the writer module is imported."""
    import importlib
    from pathlib import Path

    from rmtl.data import synthetic

    for schema in synthetic.schemas():
        module = importlib.import_module(synthetic.writer(schema).__module__)
        before = synthetic.writer_version(schema)
        copy = tmp_path / f"{schema}.py"
        copy.write_bytes(Path(module.__file__).read_bytes() + b"\n# edited after import\n")
        monkeypatch.setattr(module, "__file__", str(copy))
        assert synthetic.writer_version(schema) == before  # the file changed, the loaded writer did not
