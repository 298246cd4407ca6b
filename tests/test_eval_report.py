"""accel-eval's reports without generating anything: strict JSON, plotted values equal to the reported ones,
spreads and intervals, per-method peak memory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from accel.eval import harness, report
from accel.eval.samples import strict_json


def _refuse(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _results(fids, psnrs, speedups):
    """A results dict as compute_results makes it, for three methods, with the FIDs a user saw on moving-digits."""
    rows = []
    for method, value, psnr, (median, low, high) in zip(("baseline", "bac-forecast", "delta-dit"), fids, psnrs,
                                                       speedups):
        rows.append({
            "method": method, "samples": 100, "latency_s_per_sample": 0.1 / median,
            "latency_spread": {"median": 0.1 / median, "low": 0.09 / median, "high": 0.11 / median,
                               "spread": "IQR", "n": 10},
            "speedup": median, "speedup_spread": {"median": median, "low": low, "high": high, "spread": "IQR",
                                                  "n": 10, "within_noise": low <= 1.0 <= high},
            "fid": {"value": value, "library": "torchmetrics x", "features": "f", "n_generated": 1700,
                    "reference": "r", "ci95": {"low": value - 10, "high": value + 12, "confidence": 0.95,
                                               "resamples": 200, "seed": 0, "kind": "k"}},
            "psnr_db": psnr, "identical_to_baseline": math.isinf(psnr), "peak_memory_mb": 10.0 + len(rows),
            "memory_measure": "rss-increase",
        })
    settings = {"methods": [r["method"] for r in rows], "num_images": 100, "seed": 0, "batch_size": 10,
                "steps": None, "guidance_scale": None, "classes": None, "prompts": []}
    return {"settings": settings, "model": "moving-digits",
            "resolved": {"steps": 20, "steps_source": "the model's default", "guidance_scale": 6.0,
                         "guidance_source": "the model's default"},
            "environment": {"cpu": "cpu", "logical_cores": 2, "usable_cores": 2, "gpu": None, "torch_threads": 2,
                            "python": "3", "torch": "t", "diffusers": "d", "accel": "a", "git_commit": None},
            "versions": {}, "computed": "now", "lpips": "not computed", "rows": rows}


def test_plotted_fids_are_the_reported_fids_even_above_60(tmp_path):
    results = _results([296.5, 294.8, 320.4], [math.inf, 24.0, 31.5], [(1.0, 1.0, 1.0), (1.9, 1.7, 2.1),
                                                                        (1.3, 0.9, 1.6)])
    pictures = report.write_reports(results, tmp_path)
    points = pictures["plots"]["speedup-vs-fid.png"]
    assert [(p["method"], p["y"]) for p in points] == [("baseline", 296.5), ("bac-forecast", 294.8),
                                                       ("delta-dit", 320.4)]
    assert [(p["y_low"], p["y_high"]) for p in points] == [(286.5, 308.5), (284.8, 306.8), (310.4, 332.4)]
    assert [(p["x_low"], p["x_high"]) for p in points][1] == (1.7, 2.1)
    written = json.loads((tmp_path / "results.json").read_text(), parse_constant=_refuse)
    assert [row["fid"]["value"] for row in written["rows"]] == [p["y"] for p in points]
    text = (tmp_path / "report.md").read_text()
    for value in ("296.50 [286.50–308.50]", "294.80", "320.40"):
        assert value in text
    # PSNR: the baseline (∞) is a reference line, not a point; the others are drawn as reported, uncapped
    assert [(p["method"], p["y"]) for p in pictures["plots"]["speedup-vs-psnr.png"]] == [("bac-forecast", 24.0),
                                                                                          ("delta-dit", 31.5)]
    assert "| baseline | 1.00× (reference) |" in text and "∞ (identical)" in text
    assert "1.30× (0.90–1.60), within noise" in text and "1.90× (1.70–2.10) |" in text
    assert "steps: **20** (the model's default); guidance scale: **6.0**" in text
    assert "![speedup vs FID](speedup-vs-fid.png)" in text
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["method", "speedup"] and "fid_ci_low" in header and "speedup_within_noise" in header


def test_results_json_is_strict_and_keeps_finite_numbers():
    text = strict_json({"a": math.inf, "b": [1.5, -math.inf, math.nan], "c": {"d": 2.0}})
    assert json.loads(text, parse_constant=_refuse) == {"a": None, "b": [1.5, None, None], "c": {"d": 2.0}}


def test_pareto_front():
    # (speedup, FID): b beats a on both; c is faster but worse; d is dominated by b
    points = [(1.0, 50.0), (1.5, 40.0), (2.0, 60.0), (1.2, 45.0)]
    assert report.pareto_front(points, higher_is_better=False) == [2, 1]
    assert report.pareto_front([(1.0, 30.0), (2.0, 20.0), (1.5, 25.0)], higher_is_better=True) == [1, 2, 0]


def test_fid_from_features_is_torchmetrics_formula_and_the_bootstrap_is_seeded():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(1)
    real, generated = rng.normal(size=(300, 8)), rng.normal(0.3, 1.2, size=(200, 8))
    expected = float(_compute_fid(torch.tensor(real.mean(0)), torch.tensor(np.cov(real, rowvar=False)),
                                  torch.tensor(generated.mean(0)), torch.tensor(np.cov(generated, rowvar=False))))
    assert report.fid_from_features(real, generated) == pytest.approx(expected, rel=1e-9)
    first = report.bootstrap_interval(real, generated, 1)
    assert first == report.bootstrap_interval(real, generated, 1)  # deterministic
    assert first["resamples"] == 200 and first["low"] < expected < first["high"]
    grouped = report.bootstrap_interval(real, generated, 4)  # 50 "clips" of 4 frames, resampled whole
    assert grouped != first and grouped["low"] < grouped["high"]


def test_peak_memory_is_reset_per_method():
    def allocate(megabytes):
        def call():
            block = torch.ones(megabytes * 2**20 // 4)
            return float(block[-1])
        return call

    big = harness.measure_peak_memory(allocate(300))
    small = harness.measure_peak_memory(allocate(20))  # after the big one: a process-wide peak would say 300
    assert big["measure"] == small["measure"] == "rss-increase"
    assert big["peak_mb"] > 250 and small["peak_mb"] < 100
