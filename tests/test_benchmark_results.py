"""Benchmark result files: a rerun of one model (caching.py --merge) or of one section (sparse_attention.py)
keeps what it did not measure, with the date it was measured."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts, not a package

from benchmarks import caching, sparse_attention  # noqa: E402


def _setting(model, steps, marker):
    return {"model": model, "steps": steps, "samples": 1, "batch": 1, "rows": [], "peers_not_run": {},
            "guidance_scale": 1.5, "marker": marker}


def test_merge_replaces_rerun_sections_and_keeps_the_rest(tmp_path):
    path = tmp_path / "caching.json"
    earlier = [_setting("digits-dit", 20, "old"), _setting("digits-dit", 50, "old")]
    path.write_text(json.dumps({"machine": {"date": "2026-11-01", "command": "python benchmarks/caching.py"},
                                "settings": earlier}))
    fresh = [_setting("moving-digits", 20, "new"), _setting("digits-dit", 50, "new")]
    for setting in fresh:
        setting["allocator"] = "freed memory retained"
    merged = caching.merged_settings(path, fresh)
    assert [(s["model"], s["steps"], s["marker"]) for s in merged] == [
        ("digits-dit", 20, "old"), ("digits-dit", 50, "new"), ("moving-digits", 20, "new")]
    assert merged[0]["measured"] == "2026-11-01" and merged[0]["command"] == "python benchmarks/caching.py"
    machine = {"date": "2026-11-30", "machine": "x86_64", "threads": 2, "torch": "t", "diffusers": "d",
               "command": "python benchmarks/caching.py --model moving-digits --merge"}
    text = caching.markdown(merged, machine)
    assert "Measured 2026-11-01: `python benchmarks/caching.py`." in text  # the kept section says when and how
    sections = text.split("\n## ")[1:]
    assert ["Allocator: glibc defaults" in section for section in sections] == [True, False, False]
    assert ["Allocator: freed memory retained" in section for section in sections] == [False, True, True]


def test_caching_sections_say_whether_they_were_measured_on_the_shipped_weights():
    shipped = caching.weights_digest("digits-dit")
    assert len(shipped) == 16 and shipped == caching.weights_digest("digits-dit")
    assert shipped != caching.weights_digest("moving-digits")
    current = {**_setting("digits-dit", 20, "new"), "weights": shipped}
    earlier = {**_setting("digits-dit", 50, "old"), "weights": "0123456789abcdef"}
    unrecorded = _setting("moving-digits", 20, "old")
    machine = {"date": "2026-12-05", "machine": "x86_64", "threads": 2, "torch": "t", "diffusers": "d",
               "command": "python benchmarks/caching.py"}
    sections = caching.markdown([current, earlier, unrecorded], machine).split("\n## ")[1:]
    assert f"Weights: the shipped digits-dit (transformer sha256 {shipped}…)." in sections[0]
    assert "**Measured on earlier weights** (transformer sha256 0123456789abcdef…)" in sections[1]
    assert "Weights: not recorded." in sections[2]


def test_merge_without_an_earlier_file_and_with_a_corrupt_one(tmp_path):
    fresh = [_setting("digits-dit", 20, "new")]
    assert caching.merged_settings(tmp_path / "missing.json", fresh) == fresh
    (tmp_path / "caching.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a caching benchmark result"):
        caching.merged_settings(tmp_path / "caching.json", fresh)


def test_sparse_attention_rerun_of_one_section_keeps_the_others(tmp_path):
    path = tmp_path / "sparse_attention_cpu.json"
    path.write_text(json.dumps({"machine": {"date": "2026-11-01"}, "op": [{"tokens": 4096}],
                                "synthetic": [{"method": "dense"}], "moving-digits": [{"method": "old"}],
                                "moving-digits-model": "old-checkpoint", "synthetic_before": [1]}))
    kept = sparse_attention.earlier_sections(path, ["moving-digits"])
    assert kept == {"op": [{"tokens": 4096}], "synthetic": [{"method": "dense"}], "synthetic_before": [1],
                    "section_dates": {"op": "2026-11-01", "synthetic": "2026-11-01"}}
    assert sparse_attention.earlier_sections(path, ["op"])["moving-digits-model"] == "old-checkpoint"
    assert sparse_attention.earlier_sections(tmp_path / "missing.json", ["op"]) == {}
    for corrupt in ("{not json", "[1, 2]"):
        path.write_text(corrupt)
        with pytest.raises(ValueError, match="not a sparse-attention result"):
            sparse_attention.earlier_sections(path, ["op"])
    results = {**kept, "machine": {"processor": "x86_64", "threads": 2, "torch": "t", "date": "2026-11-30"}}
    text = sparse_attention.markdown({**results, "op": [], "synthetic": [{"method": "dense", "seconds": 1.0,
                                                                         "speedup": 1.0, "attention_density": 1.0}]})
    assert "Measured 2026-11-01." in text


def _row(name, family, speedup, psnr_db, fid=10.0, ours=True):
    return {"name": name, "family": family, "ours": ours, "speedup": speedup, "psnr_db": psnr_db, "fid": fid,
            "branches_run": 0.5}


def test_best_curve_is_the_upper_envelope_of_our_rows():
    rows = [_row("a", "x", 1.5, 40.0), _row("b", "x", 2.0, 30.0), _row("c", "x", 1.8, 20.0),
            _row("d", "x", 3.0, 28.0)]
    assert caching.curve_psnr(rows, 1.2) == 40.0  # a faster row of ours is sharper
    assert caching.curve_psnr(rows, 1.75) == pytest.approx(35.0)  # c is dominated by b: not on the curve
    assert caching.curve_psnr(rows, 2.5) == pytest.approx(29.0)
    assert caching.curve_psnr(rows, 3.0) == 28.0 and caching.curve_psnr(rows, 3.01) is None
    assert caching.curve_psnr([], 1.0) is None


def test_the_curve_check_credits_a_peer_between_two_of_our_rows():
    setting = {"model": "digits-dit", "steps": 20, "rows": [
        _row("baseline", "baseline", 1.0, float("inf"), ours=False),
        _row("ours slow", "BAC (ours)", 2.0, 36.0), _row("ours fast", "BAC (ours)", 3.0, 28.0),
        _row("peer between", "TaylorSeer", 2.5, 31.0, ours=False),  # the curve reads 32 dB at 2.5x
        _row("peer under", "MagCache", 2.9, 29.0, ours=False),  # the curve reads 28.8 dB at 2.9x
    ]}
    text = "\n".join(caching.bars(setting))
    assert "as fast as each peer row with at least its PSNR: **missed** for peer between" in text
    assert "at or above each peer row's PSNR: **missed** for peer under (2.90×, 29.00 dB; our curve 28.80 dB)." in text


def test_bars_are_read_from_the_rows():
    setting = {"model": "digits-dit", "steps": 20, "rows": [
        _row("baseline", "baseline", 1.0, float("inf"), ours=False),
        _row("baseline, second instance", "overhead", 1.01, float("inf"), ours=False),
        _row("accel, nothing skipped", "overhead", 0.97, float("inf")),
        _row("Δ-DiT a", "Δ-DiT (ours)", 1.7, 35.0, fid=10.4),
        _row("Δ-DiT b", "Δ-DiT (ours)", 2.0, 35.0, fid=10.6),  # fast and sharp, but FID over +5%
        _row("BAC a", "BAC + forecast (ours)", 2.1, 34.5),
        _row("peer a", "TaylorSeer", 2.2, 34.0, ours=False),  # no row of ours is that fast
        _row("peer b", "FirstBlockCache", 1.4, 40.0, ours=False),  # under 1.5x: not compared
        _row("peer c", "MagCache", 1.9, 34.9, ours=False),  # Δ-DiT b: faster and sharper (its FID does not matter)
    ]}
    text = "\n".join(caching.bars(setting))
    assert "Δ-DiT ≥ 1.6× at ≥ 34 dB and FID ≤ 10.50: **met**; fastest such row: Δ-DiT a, 1.70×" in text
    assert "BAC ≥ 2.2× at ≥ 34 dB and FID ≤ 10.50: **missed**; fastest such row: BAC a, 2.10×" in text
    assert "**missed** for peer a (2.20×, 34.00 dB)." in text
    assert "**missed** for peer a (2.20×, 34.00 dB; our curve does not reach that speed)." in text
    assert "peer b" not in text and "peer c" not in text
    assert "Hook overhead ≤ 2% with nothing skipped: **missed** (0.97×; a second plain baseline reads 1.01×" in text


def test_bac_schedule_quality_script_prints_one_row_per_budget(capsys):
    from benchmarks import bac_schedules

    bac_schedules.main(["--steps", "4", "--budgets", "0.5", "--metrics", "l2", "sensitivity", "--projections", "1",
                        "--samples", "2"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.5 |")]
    assert len(table) == 1 and table[0].count(" dB") == 2
    assert torch.is_grad_enabled()  # the script leaves the process's autograd mode alone


@pytest.mark.parametrize("option", ["--batch", "--repeats", "--steps"])
def test_hook_overhead_rejects_a_count_below_one(option, capsys):
    import hook_overhead

    with pytest.raises(SystemExit):
        hook_overhead.main([option, "0"])
    assert "0 is not accepted; give a whole number of 1 or more" in capsys.readouterr().err
