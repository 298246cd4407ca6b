"""BAC's first-call calibration and its disk cache: ``accel.wrap(pipe, "bac")`` calibrates on the first call of a
step count, on that call's inputs, keeps the schedule on disk, and later calls and pipelines reuse it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from accelerator_tester import AcceleratorTesterMixin, run

import accel
from accel.eval.metrics import output_array
from accel.methods.bac import BACConfig, auto, cache, calibrate_bac
from accel.pipelines import tiny


class TestBACFirstCall(AcceleratorTesterMixin):
    families = ["dit", "sd3", "flux", "wan2.2"]
    saves = "branches"

    def make_config(self):
        return BACConfig(budget=0.4)

    def call_kwargs(self, family):
        return {"num_inference_steps": 8}


def entries() -> list:
    return sorted(cache.cache_dir().glob("*.json"))


def explicit_schedule(family: str, steps: int, preset: str = "bac"):
    inputs = tiny.example_inputs(family, num_inference_steps=steps)
    del inputs["num_inference_steps"]
    return accel.calibrate(tiny.build(family), preset, inputs, num_inference_steps=steps, progress=False)


def test_the_first_call_calibrates_on_its_own_inputs_and_returns_what_later_calls_return(caplog):
    pipe = accel.wrap(tiny.build("sd3"), "bac")
    with caplog.at_level(logging.WARNING, logger="accel.methods.bac"):
        first = run(pipe, "sd3", num_inference_steps=6)
    assert "calibrating for 6 steps on this call's inputs" in caplog.text
    assert accel.summary(pipe).extras["bac"]["schedule"] == "calibrated"
    assert len(entries()) == 1
    # the calibration used copies of the call's generator: the same seed gives the same output on the next call
    np.testing.assert_array_equal(run(pipe, "sd3", num_inference_steps=6), first)
    # and the schedule is the one accel.calibrate makes from the same inputs
    reference = accel.wrap(tiny.build("sd3"), "bac", schedule=explicit_schedule("sd3", 6), calibrate=False)
    np.testing.assert_array_equal(run(reference, "sd3", num_inference_steps=6), first)
    assert not np.array_equal(first, run(tiny.build("sd3"), "sd3", num_inference_steps=6))


def test_a_new_pipeline_reuses_the_schedule_on_disk(monkeypatch):
    first = run(accel.wrap(tiny.build("dit"), "bac"), "dit", num_inference_steps=6)

    calibrations = []
    monkeypatch.setattr(auto, "calibrate_bac", lambda *a, **k: calibrations.append(1) or calibrate_bac(*a, **k))
    again = accel.wrap(tiny.build("dit"), "bac")
    np.testing.assert_array_equal(run(again, "dit", num_inference_steps=6), first)
    assert calibrations == []
    # another step count is another schedule
    run(again, "dit", num_inference_steps=4)
    assert calibrations == [1]
    assert len(entries()) == 2


def test_a_corrupt_entry_is_recalibrated_and_replaced(caplog):
    run(accel.wrap(tiny.build("dit"), "bac"), "dit", num_inference_steps=5)
    (entry,) = entries()
    good = json.loads(entry.read_text())
    entry.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="accel.methods.bac"):
        pipe = accel.wrap(tiny.build("dit"), "bac")
        run(pipe, "dit", num_inference_steps=5)
    assert "ignoring the cached schedule" in caplog.text and "calibrating for 5 steps" in caplog.text
    assert json.loads(entry.read_text())["updates"] == good["updates"]


def test_other_weights_or_settings_get_their_own_schedule():
    run(accel.wrap(tiny.build("dit"), "bac"), "dit", num_inference_steps=5)
    changed = tiny.build("dit")
    with torch.no_grad():
        next(changed.transformer.parameters()).add_(1e-3)
    run(accel.wrap(changed, "bac"), "dit", num_inference_steps=5)
    run(accel.wrap(tiny.build("dit"), "bac-fast"), "dit", num_inference_steps=5)
    assert len(entries()) == 3


def test_calibrate_false_and_an_explicit_schedule_do_not_calibrate(monkeypatch, caplog):
    schedule = explicit_schedule("dit", 5)
    monkeypatch.setattr(auto, "calibrate_bac", lambda *a, **k: pytest.fail("calibrated"))
    with caplog.at_level(logging.WARNING, logger="accel.methods.bac"):
        pipe = accel.wrap(tiny.build("dit"), "bac", calibrate=False)
    assert "calibrate=False" in caplog.text
    run(pipe, "dit", num_inference_steps=5)
    assert accel.summary(pipe).extras["bac"]["schedule"] == "uniform"
    pipe = accel.wrap(tiny.build("dit"), "bac", schedule=schedule)
    run(pipe, "dit", num_inference_steps=5)
    assert accel.summary(pipe).extras["bac"]["schedule"] == "calibrated" and entries() == []


def test_the_calls_callback_runs_only_for_the_call_itself():
    pipe = accel.wrap(tiny.build("sd3"), "bac")
    seen = []

    def callback(p, i, t, kwargs):
        seen.append(i)
        return kwargs

    pipe(**tiny.example_inputs("sd3", num_inference_steps=4), callback_on_step_end=callback)
    assert seen == [0, 1, 2, 3]


def test_an_unwritable_cache_folder_is_reported_and_the_schedule_kept(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ACCEL_CACHE_DIR", str(blocker))  # a file: its "bac" folder cannot be made
    pipe = accel.wrap(tiny.build("dit"), "bac")
    with caplog.at_level(logging.WARNING, logger="accel.methods.bac"):
        first = run(pipe, "dit", num_inference_steps=5)
        second = run(pipe, "dit", num_inference_steps=5)
    assert "could not cache the schedule" in caplog.text and caplog.text.count("calibrating for") == 1
    np.testing.assert_array_equal(first, second)


def test_steps_of_a_call():
    pipe = tiny.build("dit")
    assert auto.steps_of_call(pipe, {"num_inference_steps": 7}) == 7
    assert auto.steps_of_call(pipe, {}) == 50  # DiTPipeline's default
    assert auto.steps_of_call(pipe, {"timesteps": [999, 500]}) is None


def test_positional_arguments_reach_the_calibration():
    def call(pipe):
        inputs = tiny.example_inputs("dit", num_inference_steps=4)
        return output_array(pipe(inputs.pop("class_labels"), **inputs))  # class_labels by position

    pipe = accel.wrap(tiny.build("dit"), "bac")
    first = call(pipe)
    assert accel.summary(pipe).extras["bac"]["schedule"] == "calibrated"
    np.testing.assert_array_equal(call(pipe), first)
    np.testing.assert_array_equal(run(accel.wrap(tiny.build("dit"), "bac", schedule=explicit_schedule("dit", 4)),
                                      "dit", num_inference_steps=4), first)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_calibrate_must_be_a_bool(value):
    with pytest.raises(ValueError, match="calibrate"):
        BACConfig(calibrate=value)
