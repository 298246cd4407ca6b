"""benchmarks/feedback.py: the bars are read from the measured rows, the report renders a trained module's card,
and a run of one model keeps the other's section of the results file."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts, not a package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from benchmarks import feedback  # noqa: E402


def _row(name, kind, fid, speedup, acc=1.0, psnr=37.0):
    return {"name": name, "kind": kind, "steps": 10 if kind in ("plain", "ours") else 20, "fid": fid,
            "class_accuracy": acc, "psnr_db": None if kind == "baseline" else psnr, "seconds_per_sample": 0.1,
            "speedup": speedup, "speed_text": f"{speedup:.2f}×", "train_s": 400.0 if kind == "ours" else None}


def _setting(model, ours_fid=18.5, speedup=1.72, ours_acc=1.0):
    return {"model": model, "steps": 20, "guidance_scale": 1.5, "samples": 10, "region": [6, 6], "scale": "block",
            "module_loaded_from": None, "compute_share": 0.583,
            "training": {"steps": 10, "pairs": 64, "pipeline_calls": 2, "seconds": 400.0, "recording_s": 5.0},
            "rows": [_row("baseline, 20 steps", "baseline", 18.0, 1.0), _row("plain, 10 steps", "plain", 20.0, 1.97),
                     _row("ILF, 10 steps", "ours", ours_fid, speedup, acc=ours_acc),
                     _row("Δ-DiT, ILF's latency", "caching", 19.0, 1.7)]}


def test_the_bars_are_read_from_the_rows():
    assert all(line.startswith("- met") for line in feedback.bars(_setting("digits-dit")))
    failing = [line for line in feedback.bars(_setting("digits-dit", ours_fid=19.5, speedup=1.6)) if "not met" in line]
    assert any("1.7×" in line for line in failing) and any("+5%" in line for line in failing)
    assert any("Δ-DiT" in line for line in failing) and len(failing) == 3
    video = feedback.bars(_setting("moving-digits", ours_acc=0.9))
    assert any("not met" in line and "within 2 points" in line for line in video)


def test_a_run_of_one_model_keeps_the_others_section(tmp_path):
    feedback.write(tmp_path, [_setting("moving-digits")], "system")
    feedback.write(tmp_path, [_setting("digits-dit")], "system")
    models = [s["model"] for s in json.loads((tmp_path / "feedback.json").read_text())["settings"]]
    assert models == ["digits-dit", "moving-digits"]
    text = (tmp_path / "feedback.md").read_text()
    assert "loop region blocks 6–6" in text and "trained in this run" in text
