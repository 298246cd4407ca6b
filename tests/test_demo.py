"""The Gradio demo: the comparison itself, the app through gradio_client, and a real browser."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from accel.demo.app import DemoBackend, run_comparison


@pytest.fixture(scope="module")
def backend():
    return DemoBackend(["digits-dit"])


def test_comparison_runs_both_pipelines_from_the_same_seed(backend):
    from accel.eval.timing import Speedup

    result = run_comparison(backend, "digits-dit", 3, 0, 10, 1.5, ["delta-dit"], {}, rounds=2)
    assert Path(result["baseline"]).is_file() and Path(result["accelerated"]).is_file()
    times = result["timings"]
    assert len(times["baseline"]) == len(times["accelerated"]) == 2  # the warm-up call is not among them
    assert result["speedup"] == Speedup.from_times(times["baseline"], times["accelerated"]).median
    assert result["headline"].startswith(f"speedup {result['speedup']:.2f}× (") and "PSNR" in result["headline"]
    assert 10 < result["psnr_db"] < float("inf") and result["blocks_computed"] < 1.0
    assert "delta-dit" in result["summary"] and result["summary"].startswith(result["headline"].split(" · ")[0])
    same = run_comparison(backend, "digits-dit", 3, 0, 10, 1.5, ["delta-dit"], {}, rounds=1)
    assert same["psnr_db"] == result["psnr_db"]  # same seed, same pictures
    plain = backend.plain("digits-dit")
    import accel

    assert not accel.is_wrapped(plain)  # the baseline instance is never wrapped
    stacked = run_comparison(backend, "digits-dit", 3, 0, 10, 1.5, ["delta-dit", "bac-fast"],
                             {"delta-dit": {"interval": 3}}, rounds=1)
    assert "delta-dit + bac" in stacked["summary"] and stacked["branches_computed"] < result["branches_computed"]
    methods = accel.summary(next(iter(backend._wrapped.values()))).methods
    assert methods[0]["interval"] == 2  # the first configuration's pipeline kept its own settings
    assert any(m.get("interval") == 3 for pipe in backend._wrapped.values() for m in accel.summary(pipe).methods)


def test_progress_names_each_phase(backend):
    phases = []
    run_comparison(backend, "digits-dit", 3, 0, 3, 1.5, ["bac-fast"], {}, rounds=2,
                   progress=lambda fraction, message: phases.append(message))
    assert phases == ["calibrating BAC, once per model, steps and settings", "warm-up (untimed)",
                      "timing round 1/2", "timing round 2/2"]
    phases.clear()
    run_comparison(backend, "digits-dit", 3, 0, 3, 1.5, ["bac-fast"], {}, rounds=1,
                   progress=lambda fraction, message: phases.append(message))
    assert phases == ["warm-up (untimed)", "timing round 1/1"]  # calibrated once per model, steps and settings


def test_preset_values_reach_the_config_unless_a_field_was_edited():
    from accel.demo.app import default_stack, page_configs, preset_values
    from accel.registry import resolve

    assert default_stack() == ("bac", "bac-forecast")
    for preset, method in [("bac-fast", "bac"), ("bac-forecast", "bac"), ("adaspa-fast", "adaspa"),
                           ("vmoba-quality", "vmoba")]:
        (expected,) = resolve([preset])
        boxes = {method: preset_values(preset)}  # what the page shows after choosing the preset
        assert page_configs([preset], boxes)[0].to_dict() == expected.to_dict()
        assert page_configs([preset], {method: dict.fromkeys(boxes[method])})[0].to_dict() == expected.to_dict()
    assert preset_values("bac-fast")["budget"] == 0.3 and preset_values("bac")["budget"] == 0.35
    edited = {"bac": {**preset_values("bac-forecast"), "budget": 0.5, "top_k": 2.0}}
    (config,) = page_configs(["bac-forecast"], edited)
    assert (config.budget, config.top_k) == (0.5, 2) and isinstance(config.top_k, int)
    assert (config.metric, config.forecast, config.per_block, config.share_budget) == ("l2", 1, True, True)
    with pytest.raises(ValueError, match="bac top_k must be a whole number, got 2.5"):
        page_configs(["bac"], {"bac": {"top_k": 2.5}})


def test_video_models_show_one_synced_side_by_side_animation():
    backend = DemoBackend(["tiny:wan"])
    result = run_comparison(backend, "tiny:wan", "a red bicycle", 0, 4, 4.0, ["delta-dit"], {}, rounds=1)
    assert result["video"] and result["side_by_side"].endswith(".gif") and result["frames"].endswith(".png")
    from PIL import Image

    with Image.open(result["baseline"]) as baseline, Image.open(result["side_by_side"]) as animation:
        assert animation.n_frames == baseline.n_frames > 1
        assert animation.width > 2 * baseline.width  # baseline | accelerated in every frame
        animation.seek(2)
        frame = np.asarray(animation.convert("RGB"))
    band = (frame.shape[0] - baseline.height) // 2  # a label band above, the frame number below
    assert band > 10 and (frame[:band] < 128).any() and (frame[-band:] < 160).any()
    rows = slice(band, band + baseline.height)
    for path, half in ((result["baseline"], frame[rows, :baseline.width]),
                       (result["accelerated"], frame[rows, -baseline.width:])):
        with Image.open(path) as alone:
            alone.seek(2)  # frame 3 of each output is in frame 3 of the animation: they cannot drift apart
            assert np.abs(half.astype(int) - np.asarray(alone.convert("RGB")).astype(int)).mean() < 8
    with Image.open(result["frames"]) as grid:
        assert grid.width > 5 * 64 and grid.height >= 3 * 64  # one column per frame, three rows
    with pytest.raises(ValueError, match="prompt must be"):
        run_comparison(backend, "tiny:wan", " ", 0, 4, 4.0, ["bac"], {})


@pytest.mark.parametrize("args, match", [
    (("digits-vit", 3, 0, 10, 1.5, ["delta-dit"]), "Unknown model"),
    (("digits-dit", 3, 0, 0, 1.5, ["delta-dit"]), "Steps must be"),
    (("digits-dit", 3, 0, 500, 1.5, ["delta-dit"]), "Steps must be"),
    (("digits-dit", 3, 0, 2.5, 1.5, ["delta-dit"]), r"Steps must be a whole number in 1\.\.50, got 2\.5"),
    (("digits-dit", 3.5, 0, 10, 1.5, ["delta-dit"]), "Class must be a whole number"),
    (("digits-dit", 3, 0.5, 10, 1.5, ["delta-dit"]), "Seed must be a whole number"),
    (("digits-dit", 3, -1, 10, 1.5, ["delta-dit"]), "Seed must be"),
    (("digits-dit", 12, 0, 10, 1.5, ["delta-dit"]), "Class must be"),
    (("digits-dit", 3, 0, 10, 99.0, ["delta-dit"]), "Guidance must be"),
    (("digits-dit", 3, 0, 10, 1.5, []), "at least one accelerator"),
    (("digits-dit", 3, 0, 10, 1.5, ["nope"]), "Unknown accelerator"),
])
def test_bad_input_is_a_clear_error(backend, args, match):
    with pytest.raises(ValueError, match=match):
        run_comparison(backend, *args, {})


@pytest.mark.parametrize("rounds", [0, 11, 1.5])
def test_timing_rounds_are_bounded(backend, rounds):
    with pytest.raises(ValueError, match=r"Timing rounds must be a whole number in 1\.\.10"):
        run_comparison(backend, "digits-dit", 3, 0, 4, 1.5, ["delta-dit"], {}, rounds=rounds)


def test_app_through_gradio_client(capfd):
    from gradio_client import Client

    from accel.demo.app import build_demo
    from accel.demo.screenshot import free_port

    app = build_demo(["digits-dit"])
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        info = client.view_api(return_format="dict", print_info=False)
        parameters = {p["parameter_name"]: p.get("parameter_default")
                      for p in info["named_endpoints"]["/compare"]["parameters"]}
        assert parameters["chosen_methods"] == ["bac"] and parameters["bac_preset"] == "bac-forecast"
        assert parameters["bac_budget"] == 0.3 and parameters["rounds_value"] == 3  # the preset's own values
        values = {"class_value": 7, "seed_value": 1, "steps_value": 6, "rounds_value": 2,
                  "chosen_methods": ["delta-dit"]}
        status, figures, baseline, accelerated, pair, animation, frames, summary = client.predict(
            **values, api_name="/compare")
        assert status.startswith("Done: digits-dit, class 7, seed 1, 6 steps, delta-dit")
        assert os.path.isfile(baseline) and os.path.isfile(accelerated) and pair is not None
        assert animation is None and frames is None  # images: no video outputs
        speedup, low, high = map(float, re.findall(r"speedup ([\d.]+)× \(([\d.]+)–([\d.]+) min–max over 2 rounds",
                                                   figures)[0])
        assert low <= speedup <= high and "PSNR" in figures and "median per call over 2 interleaved rounds" in figures
        assert summary.startswith("speedup ") and "delta-dit" in summary
        for bad, message in [({"chosen_methods": []}, "Choose at least one accelerator"),
                             ({"steps_value": 2.5}, "Steps must be a whole number in 1..50, got 2.5"),
                             ({"bac_top_k": 1.5}, "bac top_k must be a whole number, got 1.5")]:
            status, *kept = client.predict(**bad, api_name="/compare")
            assert status == f"**Not run:** {message}." and all(k == {"__type__": "update"} for k in kept)
    finally:
        app.close()
    assert "Traceback" not in "".join(capfd.readouterr())  # user errors are rendered, never logged as crashes


needs_browser = pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("ACCEL_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (.ci/run installs it and sets ACCEL_REQUIRE_BROWSER)")


@needs_browser
def test_page_runs_the_chosen_preset_and_renders_errors(tmp_path, backend):
    """Picks bac-quality in the page: the run uses its budget (its compute share, not the default preset's); then a bad
    number box is refused in the status line and the previous outputs stay."""
    from accel.demo.screenshot import screenshot

    run = {"steps": 4, "rounds": 1, "presets": {"bac": "bac-quality"}}
    shown = screenshot(tmp_path / "demo.png", run=run, then=[{"fields": {"bac-top_k": 2.5}}],
                       chromium=shutil.which("chromium"))
    fast = run_comparison(backend, "digits-dit", 3, 0, 4, 1.5, ["bac-quality"], {}, rounds=1)
    default = run_comparison(backend, "digits-dit", 3, 0, 4, 1.5, ["bac-forecast"], {}, rounds=1)
    assert fast["blocks_computed"] != default["blocks_computed"]  # 4 steps tell the two presets apart
    assert shown["status"].startswith("Done: digits-dit, class 3, seed 0, 4 steps, bac-quality")
    assert f"blocks computed {fast['blocks_computed']:.1%}" in shown["figures"]
    assert "speedup " in shown["figures"] and "min–max over 1 round" in shown["figures"]
    assert "bac: budget=0.5, top_k=0" in shown["summary"] and "metric=l2" in shown["summary"]
    assert shown["summary"].startswith("speedup ")
    assert shown["images"] >= 2 and shown["slider_visible"] and not shown["animation_visible"]
    assert shown["class_visible"] and not shown["prompt_visible"]
    assert shown["run_bottom_px"] < 768  # Run above the fold at 1366×768
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    (refused,) = shown["then"]
    assert refused["status"] == "Not run: bac top_k must be a whole number, got 2.5."
    assert refused["images"] >= 2 and refused["figures"] == shown["figures"]  # the last run's outputs stay


@needs_browser
def test_page_shows_video_side_by_side():
    from accel.demo.screenshot import VIDEO_RUN, screenshot

    shown = screenshot(None, models=("digits-dit", "moving-digits"), run={**VIDEO_RUN, "steps": 3, "rounds": 1},
                       chromium=shutil.which("chromium"))
    assert shown["status"].startswith("Done: moving-digits, class 3, seed 0, 3 steps, delta-dit")
    assert shown["animation_visible"] and len(shown["animation"]) == 1 and shown["frames"] == 1
    assert not shown["slider_visible"] and shown["images"] == 0
