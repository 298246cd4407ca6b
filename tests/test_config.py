"""Config validation, round trips and registry errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
from toy_accelerators import ProbeConfig, ReuseBlocksConfig

from accel import AccelConfig, register_accelerator
from accel.config import check_choice, check_float, check_int
from accel.registry import available, resolve, unregister_accelerator

CONFIGS = [ProbeConfig(), ProbeConfig(intercept_attention=False), ReuseBlocksConfig(), ReuseBlocksConfig(3, 0.25)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{'-'.join(map(str, c.to_dict().values()))}")
def test_json_round_trip(config):
    restored = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config and restored.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"period": 0}, "period=0 must be at least 1"),
        ({"period": 1.5}, "period=1.5 must be an integer"),
        ({"period": True}, "must be an integer"),
        ({"fraction": -0.1}, "fraction=-0.1 must be at least 0.0"),
        ({"fraction": 1.5}, "must be at most 1.0"),
        ({"fraction": float("nan")}, "must be a finite number"),
        ({"fraction": "half"}, "must be a finite number"),
    ],
)
def test_bad_values_raise_value_error(changes, match):
    with pytest.raises(ValueError, match=match):
        ReuseBlocksConfig(**changes)
    with pytest.raises(ValueError, match=match):
        ReuseBlocksConfig().replace(**changes)


def test_from_dict_rejects_unknown_fields_and_other_methods():
    with pytest.raises(ValueError, match="no field"):
        ReuseBlocksConfig.from_dict({"period": 2, "colour": "red"})
    with pytest.raises(ValueError, match="expected 'test-reuse'"):
        ReuseBlocksConfig.from_dict({"method": "test-probe"})
    with pytest.raises(ValueError, match="expects a dict"):
        ReuseBlocksConfig.from_dict([1, 2])


def test_validators():
    check_choice("metric", "cosine", ("cosine", "l1"))
    with pytest.raises(ValueError, match="choose one of 'cosine', 'l1'"):
        check_choice("metric", "l2", ("cosine", "l1"))
    check_float("tau", 0.5, minimum=0.0, maximum=1.0, open_min=True)
    with pytest.raises(ValueError, match="greater than 0.0"):
        check_float("tau", 0.0, minimum=0.0, open_min=True)
    check_int("k", 3, minimum=3, maximum=5)


def test_resolve_names_configs_and_lists():
    assert resolve("test-reuse") == [ReuseBlocksConfig()]
    assert resolve(["test-reuse-3", ProbeConfig()]) == [ReuseBlocksConfig(period=3), ProbeConfig()]
    assert resolve([]) == []
    assert resolve("test-reuse", {"fraction": 0.75}) == [ReuseBlocksConfig(fraction=0.75)]


def test_registry_errors():
    with pytest.raises(ValueError, match=r"Unknown accelerator 'nope'\. Known names: .*test-reuse"):
        resolve("nope")
    with pytest.raises(ValueError, match="Did you mean 'test-probe'"):
        resolve("test-prob")

    @dataclasses.dataclass
    class Unregistered(AccelConfig):
        method = "unregistered"

    with pytest.raises(ValueError, match="not a registered accelerator config"):
        resolve(Unregistered())
    with pytest.raises(ValueError, match="non-empty `method`"):
        register_accelerator(AccelConfig, lambda scope, config: None, description="x")

    @dataclasses.dataclass
    class Clash(AccelConfig):
        method = "clash"

    with pytest.raises(ValueError, match="already belong"):
        register_accelerator(Clash, lambda s, c: None, description="x", presets={"test-reuse": Clash})
    unregister_accelerator(Clash)
    assert "clash" not in {entry["name"] for entry in available()}
