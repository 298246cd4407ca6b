"""benchmarks/pruning.py: the bars are read from the measured rows, and a run of one model keeps the other's
section of the results file."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts, not a package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from benchmarks import pruning  # noqa: E402


def _row(name, kind, fid, acc=1.0, memory=0.5, latency=0.45, psnr=25.0):
    return {"name": name, "kind": kind, "removed": None if kind == "full" else ["block 3"], "fid": fid,
            "class_accuracy": acc, "psnr_db": None if kind == "full" else psnr, "params": 10,
            "weight_bytes": 2**20, "memory_saving": 0.0 if kind == "full" else memory,
            "memory_saving_vs_fp16": -1.0 if kind == "full" else memory, "seconds_per_sample": 0.1,
            "speed_text": "1.00×", "latency_saving": 0.0 if kind == "full" else latency,
            "distill_s": None if kind == "full" else 600.0, "resident": None}


def _setting(model, ours_fid=19.0, baseline_fid=21.0, stack_memory=0.85):
    return {"model": model, "steps": 20, "guidance_scale": 1.5, "samples": 10, "blocks_removed": 6,
            "distill_steps": 10, "analysis_s": 1.0, "quest_calibration_s": 1.0,
            "rows": [_row("full", "full", 18.0), _row("hierarchical-prune", "ours", ours_fid),
                     _row("hierarchical-prune + quest-w4a8", "stack", 19.5, memory=stack_memory),
                     _row("last blocks, distilled", "baseline", baseline_fid)]}


def test_the_bars_are_read_from_the_rows():
    met = pruning.bars(_setting("digits-dit"))
    assert all(line.startswith("- met") for line in met), met
    missed = pruning.bars(_setting("digits-dit", ours_fid=20.5, baseline_fid=20.0, stack_memory=0.7))
    failing = [line for line in missed if "not met" in line]
    assert any("FID within +10%" in line for line in failing)
    assert any("better FID than 'last blocks, distilled'" in line for line in failing)
    assert any("4-bit" in line for line in failing)
    assert len(failing) == 3


def test_a_run_of_one_model_keeps_the_other_models_section(tmp_path):
    pruning.write(tmp_path, [_setting("moving-digits")], "glibc defaults")
    pruning.write(tmp_path, [_setting("digits-dit")], "glibc defaults")
    settings = json.loads((tmp_path / "pruning.json").read_text())["settings"]
    assert [s["model"] for s in settings] == ["digits-dit", "moving-digits"]
    text = (tmp_path / "pruning.md").read_text()
    assert "## digits-dit" in text and "## moving-digits" in text
    assert (tmp_path / "pruning.png").stat().st_size > 1000
