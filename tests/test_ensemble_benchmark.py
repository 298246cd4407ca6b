"""benchmarks/ensemble.py: the bars are read from the measured rows (FID and its bootstrap interval, training
time), and the report renders them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts, not a package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from benchmarks import ensemble  # noqa: E402


def _row(name, kind, fid, interval=None):
    row = {"name": name, "kind": kind, "steps": 20, "fid": fid, "fid_halves": {"digits 0-4": fid, "digits 5-9": fid},
           "class_accuracy": 1.0, "seconds_per_sample": 0.1, "time_ratio": 1.0, "speed_text": "1.00×",
           "weights_mb": 21.8}
    if interval is not None:
        row["afa_minus_this"] = {"difference": 0.0, "interval_90": interval}
    return row


def _result(afa_fid=16.0, training_s=800.0, resumed=0):
    return {"model": "digits-dit", "steps": 20, "samples": 500, "guidance_scale": 1.5,
            "member_training": [{"name": "digits-dit-a", "minutes": 6.0, "steps": 900, "data": "digits 0-4",
                                 "seed": 1}],
            "aggregator": "agg", "aggregator_loaded": False, "held_out_loss": {"AFA": 0.2},
            "aggregator_training": {"parameters": 10, "hidden": 64, "steps": 2000, "batch_size": 32, "lr": 5e-4,
                                    "seconds_this_run": training_s, "resumed_from_step": resumed,
                                    "first_losses_mean": 0.2, "last_losses_mean": 0.19},
            "rows": [_row("member a", "member", 17.0, [-1.5, -0.5]),
                     _row("prediction average", "baseline", 16.2, [-0.6, 0.2]),
                     _row("AFA, untrained (plain mean after every block)", "baseline", 16.5, [-0.8, -0.1]),
                     _row("AFA", "ours", afa_fid)]}


def test_the_bars_are_read_from_the_rows():
    lines = ensemble.bars(_result())
    assert sum(line.startswith("- met") for line in lines) == 3, lines  # member, prediction average, training
    assert any("prediction average" in line and "inside the noise" in line for line in lines)
    assert any("member a" in line and "outside the noise" in line for line in lines)
    assert not any("untrained" in line for line in lines)  # the plain mean is reported, not a bar of the issue
    failing = [line for line in ensemble.bars(_result(afa_fid=16.3, training_s=1500)) if "not met" in line]
    assert len(failing) == 2 and any("20 minutes" in line for line in failing)
    assert any(line.startswith("- not measured") for line in ensemble.bars(_result(resumed=100)))


def test_the_report_renders_every_row():
    text = ensemble.markdown(_result(), {"processor": "x86_64", "threads": 2, "torch": "2", "date": "today"})
    assert all(f"| {row['name']} |" in text for row in _result()["rows"])
    assert "[-1.50, -0.50]" in text and "Bars:" in text
