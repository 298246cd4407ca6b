"""The README's families x methods table is the registry's; every mark in it is a family the method is tested on."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_afa
import test_bac
import test_delta_dit
import test_hierarchical_prune
import test_ilf
import test_quest
import test_sparse_attention

from accel import families
from accel.pipelines import FAMILY_NAMES, adapter_for, tiny

README = Path(__file__).resolve().parent.parent / "README.md"

# Each built-in method's tester-mixin class (or, for HierarchicalPrune, its parametrized family list).
TESTED_FAMILIES = {
    "bac": test_bac.TestBAC.families,
    "delta-dit": test_delta_dit.TestDeltaDiT.families,
    "adaspa": test_sparse_attention.TestAdaSpa.families,
    "vmoba": test_sparse_attention.TestVMoBA.families,
    "quest": test_quest.TestQuEST.families,
    "ilf": test_ilf.TestILF.families,
    "afa": test_afa.TestAFA.families,
    families.PRUNE_COLUMN: test_hierarchical_prune.DIT_FAMILIES,
}
_ADAPTER_OF_TINY: dict[str, str] = {}


def adapter_name(tiny_family: str) -> str:
    if tiny_family not in _ADAPTER_OF_TINY:
        _ADAPTER_OF_TINY[tiny_family] = adapter_for(tiny.build(tiny_family)).name
    return _ADAPTER_OF_TINY[tiny_family]


def test_the_readme_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    assert families.replace_table(text) == text, "stale: run `python -m accel.families --write README.md`"


def test_every_declared_family_has_a_tiny_builder():
    assert {adapter_name(family) for family in tiny.FAMILIES} == set(FAMILY_NAMES)


@pytest.mark.parametrize("method", list(TESTED_FAMILIES))
def test_every_mark_is_a_family_the_method_is_tested_on(method):
    marked = {row["family"] for row in families.family_rows() if row["methods"][method]}
    tested = {adapter_name(family) for family in TESTED_FAMILIES[method]}
    assert marked, f"{method} declares no family"
    assert marked <= tested, f"{method} declares {sorted(marked - tested)} but its tests never run on them"


def test_every_built_in_method_has_a_column_and_its_tests():
    columns = list(families.family_rows()[0]["methods"])
    assert sorted(columns) == sorted(TESTED_FAMILIES)
    wrap_methods = [column for column in columns if column != families.PRUNE_COLUMN]
    assert [spec.name for spec in families.builtin_accelerators()] == wrap_methods


def test_replace_table_refuses_text_without_markers():
    with pytest.raises(ValueError, match="no families table markers"):
        families.replace_table("# a README without the table\n")


def test_write_table_rewrites_only_the_marked_block(tmp_path):
    path = tmp_path / "doc.md"
    path.write_text(f"before\n{families.BEGIN}\nold rows\n{families.END}\nafter\n", encoding="utf-8")
    families.write_table(path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"before\n{families.BEGIN}\n| family |") and text.endswith(f"{families.END}\nafter\n")
    assert "old rows" not in text and "| `dit` |" in text
    assert [p.name for p in tmp_path.iterdir()] == ["doc.md"]  # no temp file left behind


def test_attention_design_names_each_kind():
    designs = {row["family"]: row["attention"] for row in families.family_rows()}
    assert designs["dit"] == "self-attention (class-conditioned)"
    assert designs["pixart-alpha"] == "cross-attention"
    assert designs["sd3"] == "joint (dual-stream)"
    assert designs["flux"] == "joint (dual-stream + single-stream)"
    assert designs["unet"] == "cross-attention (U-Net)"
    guidance = {row["family"]: row["guidance"] for row in families.family_rows()}
    assert (guidance["dit"], guidance["wan"]) == ("one batched call", "two calls")
    assert guidance["flux2"] == "none (guidance distilled into the model)"
