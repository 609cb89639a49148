"""Config machinery: unknown keys and wrong types are errors naming the key; TOML round trips."""

from __future__ import annotations

import dataclasses

import pytest

from recscale.config import (
    EvalConfig,
    IngestConfig,
    SplitConfig,
    TrainConfig,
    config_from_dict,
    load_toml,
    write_toml,
)
from recscale.errors import ConfigError


def test_unknown_key_is_named_with_the_allowed_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"run\.toml \[train\]: unknown key 'epoch'; allowed keys are: .*epochs"
    ):
        config_from_dict(TrainConfig, {"epoch": 3}, where="run.toml [train]")


@pytest.mark.parametrize(
    ("cls", "data", "message"),
    [
        (TrainConfig, {"epochs": "3"}, r"epochs: got '3'; expected an integer"),
        (TrainConfig, {"epochs": True}, r"epochs: got True; expected an integer"),
        (TrainConfig, {"epochs": 0}, r"epochs must be > 0, got 0"),
        (IngestConfig, {"dedupe": "first"}, r"dedupe: got 'first'; expected one of 'keep-first'"),
        (SplitConfig, {"test_fraction": 1.5}, r"test_fraction must be between 0 and 1, got 1.5"),
        (EvalConfig, {"ks": [10, "x"]}, r"ks\[1\]: got 'x'; expected an integer"),
        (EvalConfig, {"ks": []}, r"ks must name at least one cut-off"),
    ],
)
def test_wrong_values_are_config_errors(cls: type, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(cls, data)


def test_ints_are_accepted_for_floats_and_lists_become_tuples() -> None:
    config = config_from_dict(IngestConfig, {"positive_threshold": 4})
    assert config.positive_threshold == 4.0 and isinstance(config.positive_threshold, float)
    assert config_from_dict(EvalConfig, {"ks": [5, 10]}).ks == (5, 10)


def test_toml_round_trip(tmp_path) -> None:
    train = TrainConfig(model="ials", epochs=7, num_threads=2)
    evaluate = EvalConfig(ks=(1, 5))
    path = tmp_path / "c.toml"
    write_toml(path, {"train": train, "evaluate": evaluate, "model": {"factors": 32}})
    tables = load_toml(path)
    assert config_from_dict(TrainConfig, tables["train"]) == train
    assert config_from_dict(EvalConfig, tables["evaluate"]) == evaluate
    assert tables["model"] == {"factors": 32}
    # None-valued fields are left out of the file and come back as their default
    assert (
        "threads"
        not in load_toml(
            write_toml(tmp_path / "i.toml", {"i": IngestConfig()}) or tmp_path / "i.toml"
        )["i"]
    )


def test_bad_toml_and_missing_file(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match=r"config file '.*nope\.toml' does not exist"):
        load_toml(tmp_path / "nope.toml")


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().epochs = 3  # type: ignore[misc]
