"""What a user can wrong-foot accel with, one test per case found by the reliability sweep: a callback that wraps
or unwraps its own pipeline, `accel-run` on models a method does not support, empty or repeated method lists,
resumed eval runs holding another run's pictures, oversized sparse blocks, bad numbers and schedule files, and a
scheduler swapped under a calibrated BAC."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

import accel
from accel.eval import harness, quick
from accel.methods.adaspa import AdaSpaConfig
from accel.methods.bac import BACConfig, BACSchedule
from accel.methods.vmoba import VMoBAConfig
from accel.pipelines import tiny


def call_with_timeout(function, seconds: float = 60.0):
    """``function()`` in a thread; fails (instead of hanging the suite) if it has not returned in ``seconds``."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a deadlock"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# ------------------------------------------------------------------------------------ 1. callbacks


@pytest.mark.parametrize("action", ["unwrap", "wrap", "calibrate"])
def test_changing_a_pipeline_from_its_own_step_callback_raises_instead_of_hanging(action):
    pipe = accel.wrap(tiny.build("sd3"), "bac")
    seen = []

    def callback(p, i, t, kwargs):
        if i == 1:
            try:
                if action == "unwrap":
                    accel.unwrap(p)
                elif action == "wrap":
                    accel.wrap(p, "delta-dit")
                else:
                    accel.calibrate(p, "bac", [{}], num_inference_steps=2, progress=False)
            except RuntimeError as error:
                seen.append(str(error))
        return kwargs

    call_with_timeout(lambda: pipe(**tiny.example_inputs("sd3", num_inference_steps=4), callback_on_step_end=callback))
    assert len(seen) == 1 and "during this pipeline's own call" in seen[0]
    assert accel.is_wrapped(pipe) and [m["method"] for m in accel.summary(pipe).methods] == ["bac"]
    accel.unwrap(pipe)  # after the call it works
    assert not accel.is_wrapped(pipe)


def test_another_thread_waits_for_the_call_rather_than_failing():
    pipe = accel.wrap(tiny.build("sd3"), "bac")
    started, results, order = threading.Event(), [], []

    def callback(p, i, t, kwargs):
        if i == 0:
            started.set()
            time.sleep(0.5)  # the other thread's unwrap is waiting by now
        if i == 2:
            order.append("call finished")
        return kwargs

    worker = threading.Thread(target=lambda: results.append(
        pipe(**tiny.example_inputs("sd3", num_inference_steps=3), callback_on_step_end=callback)))
    worker.start()
    assert started.wait(30)
    call_with_timeout(lambda: (accel.unwrap(pipe), order.append("unwrapped")))
    worker.join(30)
    assert results and not accel.is_wrapped(pipe)
    assert order == ["call finished", "unwrapped"]


# ------------------------------------------------------------------------------------ 2-3. accel-run


def test_accel_run_all_skips_the_methods_a_family_does_not_support(capsys):
    assert quick.main(["--model", "tiny:sd15", "--repeats", "1", "--steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "skipping adaspa, delta-dit, ilf, vmoba" in captured.err and "'unet' family" in captured.err
    assert "| bac" in captured.out or "\nbac " in captured.out


@pytest.mark.parametrize("model, methods, message", [
    ("tiny:sd15", "delta-dit", "does not support the 'unet' family"),
    ("tiny:dit", "adaspa+vmoba", "both replace the attention"),
    ("tiny:dit", "", "--methods is empty"),
    ("tiny:dit", ",", "--methods is empty"),
    ("tiny:dit", "bac,bac", "lists a method twice"),
])
def test_accel_run_refuses_what_it_cannot_run_before_running(model, methods, message, capsys):
    assert quick.main(["--model", model, "--methods", methods, "--repeats", "1", "--steps", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("accel-run:") and message in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize("methods", ["", ",", "bac,bac"])
def test_accel_eval_agrees_on_empty_and_repeated_method_lists(methods, tmp_path, capsys):
    assert harness.main(["--model", "tiny:dit", "--methods", methods, "--num-images", "2",
                         "--out", str(tmp_path / "out")]) == 2
    assert "--methods" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ 4. eval resume


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert harness.main(["--model", "tiny:dit", "--methods", "baseline", "--num-images", "4", "--batch-size", "2",
                         "--steps", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("replacement", ["larger", "rgb"])
def test_resume_regenerates_a_readable_picture_of_the_wrong_shape(small_run, tmp_path, replacement):
    out = tmp_path / "resumed"
    shutil.copytree(small_run, out)
    path = out / "baseline" / "000001.png"
    original = np.asarray(Image.open(path))
    if replacement == "larger":  # another run's picture: twice the size
        wrong = np.kron(original, np.ones((2, 2) + (1,) * (original.ndim - 2), dtype=original.dtype))
    else:  # another channel count: gray for colour, colour for gray
        wrong = original[..., 0] if original.ndim == 3 else np.repeat(original[..., None], 3, axis=-1)
    Image.fromarray(wrong).save(path)
    assert harness.main(["--model", "tiny:dit", "--methods", "baseline", "--num-images", "4", "--batch-size", "2",
                         "--steps", "2", "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(path)), original)


# ------------------------------------------------------------------------------------ 5. block sizes


@pytest.mark.parametrize("config", [AdaSpaConfig, VMoBAConfig])
@pytest.mark.parametrize("block_size", [2**40, 65536, 2048, 24, 8])
def test_sparse_block_sizes_are_refused_when_the_config_is_made(config, block_size):
    with pytest.raises(ValueError, match="block_size"):
        config(block_size=block_size)


def test_the_largest_block_size_is_accepted():
    assert AdaSpaConfig(block_size=1024).block_size == VMoBAConfig(block_size=1024).block_size == 1024


# ------------------------------------------------------------------------------------ 6. numbers and files


@pytest.mark.parametrize("flag, value, message", [
    ("--guidance-scale", "nan", "--guidance-scale must be a finite number"),
    ("--guidance-scale", "-3", "--guidance-scale must be a finite number"),
    ("--guidance-scale", "inf", "--guidance-scale must be a finite number"),
    ("--seed", "99999999999999999999", "--seed must be in"),
    ("--seed", "-1", "--seed must be in"),
])
def test_accel_eval_refuses_bad_numbers(flag, value, message, tmp_path, capsys):
    assert harness.main(["--model", "tiny:dit", "--methods", "baseline", "--num-images", "2", flag, value,
                         "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "run.json").exists()


@pytest.mark.parametrize("change, message", [
    ({"updates": "ab"}, "'updates' must be a mapping"),
    ({"updates": ["a", "b"]}, "'updates' must be a mapping"),
    ({"metadata": "x"}, "'metadata' must be a mapping"),
    ({"updates": None}, "'updates' must be a mapping"),
])
def test_schedule_files_with_wrong_field_types_name_the_field(change, message, tmp_path):
    data = {"format": "accel.bac.schedule/1", "num_inference_steps": 4, "updates": {"a": [0, 2]}, **change}
    with pytest.raises(ValueError, match=message):
        BACSchedule.from_dict(data)
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        BACConfig(schedule=str(tmp_path / "s.json"))
    for key in ("updates", "num_inference_steps"):
        with pytest.raises(ValueError, match=f"no '{key}' field"):
            BACSchedule.from_dict({k: v for k, v in data.items() if k != key})


# ------------------------------------------------------------------------------------ 7. scheduler swap


def test_a_scheduler_swapped_after_wrap_is_refused_on_the_next_call():
    from diffusers import DPMSolverMultistepScheduler

    pipe = tiny.build("dit")
    inputs = {key: value for key, value in tiny.example_inputs("dit").items() if key != "num_inference_steps"}
    schedule = accel.calibrate(pipe, "bac", inputs, num_inference_steps=3, progress=False)
    accel.wrap(pipe, "bac", schedule=schedule)
    pipe(**tiny.example_inputs("dit"))  # the scheduler it was calibrated with
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="swapped after accel.wrap"):
        pipe(**tiny.example_inputs("dit"))
    pipe(**tiny.example_inputs("dit", num_inference_steps=4))  # another step count: the schedule is not used
    accel.unwrap(pipe)
    pipe(**tiny.example_inputs("dit"))
