"""load_config: packaged names, overrides, and errors that name the offending key."""

import pytest
import yaml

from rmtl.config import RunConfig, load_config, packaged_configs, save_config
from rmtl.errors import ConfigError


def test_packaged_configs_load_by_name():
    names = packaged_configs()
    assert {"quickstart", "retailrocket", "kuairand", "census"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
    census = load_config("census")
    assert census.data.source == "census"
    assert list(census.data.split_ratios) == [0.5, 0.25, 0.25]
    assert census.data.split_order == "random"
    assert load_config("quickstart.yaml").model.name == "mmoe"


def test_overrides_and_types():
    cfg = load_config("quickstart", ["train.lr=0.01", "model.name=ple", "model.options.num_levels=2",
                                     "train.max_steps=7", "data.synthetic.users=300"])
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.model.name == "ple" and cfg.model.options["num_levels"] == 2
    assert cfg.train.max_steps == 7
    assert cfg.data.synthetic["users"] == 300
    assert "${" not in cfg.run_dir  # the ${now:...} default is resolved


@pytest.mark.parametrize("override, key, hint", [
    (["train.lrr=0.1"], "train.lrr", "train.lr"),
    (["trian.lr=0.1"], "trian", "train"),
    (["data.sesion_gap=10"], "data.sesion_gap", "data.session_gap"),
])
def test_typo_in_override_names_full_key_and_close_match(override, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", override)
    assert err.value.key == key
    assert f"did you mean {hint}" in str(err.value)


def test_typo_in_yaml_file_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_sise: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "train.batch_sise"
    assert "train.batch_size" in str(err.value)


@pytest.mark.parametrize("override, key, expected", [
    (["train.lr=fast"], "train.lr", "float"),
    (["train.epochs=many"], "train.epochs", "int"),
    (["train.optimizer=sgd"], "train.optimizer", "adam, adamw"),
    (["data.split_ratios=[0.5,0.5]"], "data.split_ratios", "three"),
    (["train.batch_size=0"], "train.batch_size", ">= 1"),
])
def test_wrong_values_name_key_and_expected(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", override)
    assert err.value.key == key
    assert expected in str(err.value)


def test_unknown_config_lists_packaged_names():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("no_such_config")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("quickstart", ["train.lr"])


def test_save_config_round_trips(tmp_path):
    cfg = load_config("quickstart", ["train.lr=0.02", "seed=5"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 0.02
    again = load_config(path)
    assert again == cfg
    assert not [p for p in path.parent.iterdir() if p.name != "config.yaml"]  # no temporary left behind
