"""The Gradio demo: the comparison itself, the app through gradio_client, and a real browser."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from accel.demo.app import DemoBackend, run_comparison


@pytest.fixture(scope="module")
def backend():
    return DemoBackend(["digits-dit"])


def test_comparison_runs_both_pipelines_from_the_same_seed(backend):
    result = run_comparison(backend, "digits-dit", 3, 0, 10, 1.5, ["delta-dit"], {})
    assert Path(result["baseline"]).is_file() and Path(result["accelerated"]).is_file()
    assert result["speedup"] == pytest.approx(result["baseline_seconds"] / result["accelerated_seconds"])
    assert 10 < result["psnr_db"] < float("inf") and result["blocks_computed"] < 1.0
    assert "delta-dit" in result["summary"]
    same = run_comparison(backend, "digits-dit", 3, 0, 10, 1.5, ["delta-dit"], {})
    assert same["psnr_db"] == result["psnr_db"]  # same seed, same pictures
    plain = backend.plain("digits-dit")
    import accel

    assert not accel.is_wrapped(plain)  # the baseline instance is never wrapped
    stacked = run_comparison(backend, "digits-dit", 3, 0, 10, 1.5, ["delta-dit", "bac-fast"],
                             {"delta-dit": {"interval": 3}})
    assert "delta-dit + bac" in stacked["summary"] and stacked["branches_computed"] < result["branches_computed"]
    methods = accel.summary(next(iter(backend._wrapped.values()))).methods
    assert methods[0]["interval"] == 2  # the first configuration's pipeline kept its own settings
    assert any(m.get("interval") == 3 for pipe in backend._wrapped.values() for m in accel.summary(pipe).methods)


def test_video_models_show_two_animations():
    backend = DemoBackend(["tiny:wan"])
    result = run_comparison(backend, "tiny:wan", "a red bicycle", 0, 4, 4.0, ["bac-fast"], {})
    assert result["video"] and result["baseline"].endswith(".gif") and result["accelerated"].endswith(".gif")
    from PIL import Image

    with Image.open(result["accelerated"]) as animation:
        assert animation.n_frames > 1
    with pytest.raises(ValueError, match="prompt must be"):
        run_comparison(backend, "tiny:wan", " ", 0, 4, 4.0, ["bac"], {})


@pytest.mark.parametrize("args, match", [
    (("digits-vit", 3, 0, 10, 1.5, ["delta-dit"]), "Unknown model"),
    (("digits-dit", 3, 0, 0, 1.5, ["delta-dit"]), "Steps must be"),
    (("digits-dit", 3, 0, 500, 1.5, ["delta-dit"]), "Steps must be"),
    (("digits-dit", 3, -1, 10, 1.5, ["delta-dit"]), "Seed must be"),
    (("digits-dit", 12, 0, 10, 1.5, ["delta-dit"]), "Class must be"),
    (("digits-dit", 3, 0, 10, 99.0, ["delta-dit"]), "Guidance must be"),
    (("digits-dit", 3, 0, 10, 1.5, []), "at least one accelerator"),
    (("digits-dit", 3, 0, 10, 1.5, ["nope"]), "Unknown accelerator"),
])
def test_bad_input_is_a_clear_error(backend, args, match):
    with pytest.raises(ValueError, match=match):
        run_comparison(backend, *args, {})


def test_app_through_gradio_client():
    from gradio_client import Client

    from accel.demo.app import build_demo
    from accel.demo.screenshot import free_port

    app = build_demo(["digits-dit"])
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        info = client.view_api(return_format="dict", print_info=False)
        names = [p["parameter_name"] for p in info["named_endpoints"]["/compare"]["parameters"]]
        values = {"model_name": "digits-dit", "class_value": 7, "prompt_text": "", "seed_value": 1,
                  "steps_value": 10, "guidance_value": 1.5, "chosen_methods": ["delta-dit"]}
        defaults = [p.get("parameter_default") for p in info["named_endpoints"]["/compare"]["parameters"]]
        args = [values.get(name, default) for name, default in zip(names, defaults)]
        baseline, accelerated, pair, figures, summary = client.predict(*args, api_name="/compare")
        assert os.path.isfile(baseline) and os.path.isfile(accelerated) and pair is not None
        base_s, fast_s, speedup = map(float, re.findall(r"([\d.]+) s · \*\*accelerated\*\* ([\d.]+) s · "
                                                        r"\*\*speedup ([\d.]+)×", figures)[0])
        assert speedup == pytest.approx(base_s / fast_s, rel=0.02)
        assert "PSNR" in figures and "delta-dit" in summary
        bad = list(args)
        bad[names.index("chosen_methods")] = []
        with pytest.raises(Exception, match="at least one accelerator"):
            client.predict(*bad, api_name="/compare")
    finally:
        app.close()


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("ACCEL_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (.ci/run installs it and sets ACCEL_REQUIRE_BROWSER)")
def test_page_in_headless_chromium(tmp_path):
    from accel.demo.screenshot import screenshot

    shown = screenshot(tmp_path / "demo.png", chromium=shutil.which("chromium"))
    assert shown["images"] >= 2 and "speedup" in shown["figures"]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
