"""Stacking: every ordered pair of registered accelerators composes, or ``accel.wrap`` refuses it with a
``ValueError`` naming both, exactly as ``accel.registry.stacking_conflict`` says, and the matrix in
docs/benchmarks/stacking.md is that rule's."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from stacking_configs import FAMILY, config

import accel
from accel.eval.metrics import output_array
from accel.pipelines import tiny
from accel.registry import STACKING_ROLES, register_accelerator, registered, stacking_conflict, stacking_warning

STACKING_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "stacking.md"
NAMES = sorted(spec.name for spec in registered() if spec.role is not None)
SPECS = {spec.name: spec for spec in registered()}


def run(pipe) -> np.ndarray:
    return output_array(pipe(**tiny.example_inputs(FAMILY)))


def test_every_registered_accelerator_declares_its_role():
    assert set(NAMES) == {"adaspa", "afa", "bac", "delta-dit", "ilf", "quest", "vmoba"}
    assert {SPECS[name].role for name in NAMES} <= set(STACKING_ROLES)


@pytest.mark.parametrize(("first", "second"), list(itertools.permutations(NAMES, 2)))
def test_a_pair_composes_or_is_refused_as_the_rule_says(first, second, caplog):
    plain = run(tiny.build(FAMILY))
    conflict = stacking_conflict([SPECS[first], SPECS[second]])
    pipe = tiny.build(FAMILY)
    if conflict is not None:
        with pytest.raises(ValueError) as refusal:
            accel.wrap(pipe, [config(first), config(second)])
        assert str(refusal.value) == conflict and first in conflict and second in conflict
        assert not accel.is_wrapped(pipe)
        np.testing.assert_array_equal(run(pipe), plain)
        return
    with caplog.at_level("WARNING", logger="accel.api"):
        accel.wrap(pipe, [config(first), config(second)])
    caution = stacking_warning([SPECS[first], SPECS[second]])
    assert (caution in caplog.text) if caution else ("do not stack" not in caplog.text)
    output = run(pipe)
    assert np.isfinite(output).all()
    assert [entry["method"] for entry in accel.summary(pipe).methods] == [first, second]
    np.testing.assert_array_equal(run(pipe), output)  # same seed, same output; nothing leaks between calls
    np.testing.assert_array_equal(run(accel.wrap(tiny.build(FAMILY), [config(first), config(second)])), output)
    accel.unwrap(pipe)
    np.testing.assert_array_equal(run(pipe), plain)


def test_a_conflict_with_a_method_applied_by_an_earlier_wrap_is_refused_too():
    pipe = accel.wrap(tiny.build(FAMILY), config("bac"))
    with pytest.raises(ValueError, match="bac and ilf do not stack: ilf re-runs"):
        accel.wrap(pipe, config("ilf"))
    assert [entry["method"] for entry in accel.summary(pipe).methods] == ["bac"]


def test_ensembling_must_come_first_whatever_sits_between():
    specs = [SPECS["quest"], SPECS["vmoba"], SPECS["afa"]]
    assert stacking_conflict(specs).startswith("afa must be applied first (before quest, vmoba)")
    assert stacking_conflict([SPECS["afa"], SPECS["quest"], SPECS["vmoba"]]) is None


def test_an_unknown_role_is_refused():
    from accel.config import AccelConfig

    class Toy(AccelConfig):
        method = "toy-role"

    with pytest.raises(ValueError, match="role must be one of ensembling, caching"):
        register_accelerator(Toy, lambda scope, config: None, description="toy", role="speeding up")


def test_the_published_matrix_is_the_rule():
    text = STACKING_MD.read_text(encoding="utf-8")
    section = text.split("## Which pairs stack", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| **")]
    assert len(rows) == len(NAMES)
    for line in rows:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        first = re.sub(r"\*\*(.*)\*\*.*", r"\1", cells[0])
        for second, cell in zip(NAMES, cells[1:]):
            if first == second:
                assert cell == "—"
                continue
            if stacking_conflict([SPECS[first], SPECS[second]]):
                assert cell.startswith("refused"), (first, second, cell)
            elif stacking_warning([SPECS[first], SPECS[second]]):
                assert cell.startswith("stacks, warns"), (first, second, cell)
            else:
                assert cell == "stacks", (first, second, cell)


def test_two_caching_methods_stack_with_a_warning_naming_both():
    assert "delta-dit and bac both reuse computation" in stacking_warning([SPECS["delta-dit"], SPECS["bac"]])
    assert stacking_warning([SPECS["bac"], SPECS["vmoba"]]) is None
