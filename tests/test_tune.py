"""``accel.tune`` on the tiny DiT: the target and budget rules, the choice, save / load, wrap with the result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import accel
from accel.eval.metrics import output_array
from accel.methods.bac import BACConfig
from accel.methods.delta_dit import DeltaDiTConfig
from accel.pipelines import tiny

STEPS = 4
DELTA = DeltaDiTConfig(interval=2, boundary=0.5, cached_fraction=0.5)
BAC = BACConfig(budget=0.5, calibrate=False)


def inputs(seed: int = 0) -> list[dict]:
    calls = []
    for offset in range(2):
        call = tiny.example_inputs("dit", seed=seed + offset)
        call.pop("num_inference_steps", None)
        calls.append(call)
    return calls


def plain_output(pipe) -> np.ndarray:
    return output_array(pipe(**tiny.example_inputs("dit", num_inference_steps=STEPS)))


def quick_tune(pipe, **options):
    settings = dict(num_inference_steps=STEPS, target={"psnr": 1.0}, candidates=[[DELTA], [BAC]], compile=False,
                    rounds=1, progress=False)
    return accel.tune(pipe, inputs(), **{**settings, **options})


@pytest.mark.parametrize(("target", "message"), [
    ({"psnr": -3}, "must be a positive number"), ({"lpips": 0.1}, "target must be one of"),
    ({"fid_ratio": 1.05}, "needs fid=callable"), ({"psnr": 30, "fid_ratio": 1.1}, "target must be one of"),
])
def test_a_bad_target_is_refused(target, message):
    with pytest.raises(ValueError, match=message):
        accel.tune(tiny.build("dit"), inputs(), num_inference_steps=STEPS, target=target)


def test_a_candidate_that_cannot_run_is_refused_before_any_trial():
    with pytest.raises(ValueError, match="candidate \\['adaspa', 'vmoba'\\]: adaspa and vmoba do not stack"):
        quick_tune(tiny.build("dit"), candidates=[[DELTA], ["adaspa", "vmoba"]])


@pytest.mark.parametrize(("options", "message"), [
    ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
    ({"budget_s": 0}, "budget_s must be positive"), ({"rounds": 0}, "rounds at least 1"),
])
def test_bad_search_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        quick_tune(tiny.build("dit"), **options)


def test_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="inputs must be a non-empty list"):
        accel.tune(tiny.build("dit"), [], num_inference_steps=STEPS, target={"psnr": 1.0})


def test_a_saved_result_naming_an_unknown_method_is_refused(tmp_path):
    result = quick_tune(tiny.build("dit"), candidates=[[DELTA]])
    result.save(tmp_path / "tuned.json")
    text = (tmp_path / "tuned.json").read_text().replace('"method": "delta-dit"', '"method": "warp-drive"')
    (tmp_path / "tuned.json").write_text(text)
    with pytest.raises(ValueError, match="No registered accelerator is named 'warp-drive'"):
        accel.TuneResult.load(tmp_path / "tuned.json")


def test_a_wrapped_pipeline_is_refused():
    with pytest.raises(ValueError, match="unwrapped pipeline"):
        quick_tune(accel.wrap(tiny.build("dit"), DELTA))


def test_the_fastest_trial_that_meets_the_target_is_chosen_and_the_pipeline_is_left_as_it_came(tmp_path):
    pipe = tiny.build("dit")
    before = plain_output(pipe)
    result = quick_tune(pipe)
    assert [trial.label for trial in result.trials] == ["delta-dit", "bac"]
    assert all(trial.meets for trial in result.trials)
    assert result.chosen is max(result.trials, key=lambda trial: trial.speedup.median)
    assert result.chosen in result.pareto()
    assert not accel.is_wrapped(pipe)
    np.testing.assert_array_equal(plain_output(pipe), before)
    # save / load keeps the chosen stack (a calibrated BAC schedule included); wrap applies it
    result.save(tmp_path / "tuned.json")
    loaded = accel.TuneResult.load(tmp_path / "tuned.json")
    assert loaded.chosen.label == result.chosen.label and loaded.configs == result.configs
    expected = plain_output(accel.wrap(tiny.build("dit"), result.configs))
    np.testing.assert_array_equal(plain_output(accel.wrap(pipe, loaded)), expected)
    assert "→" in result.table()
    result.plot(tmp_path / "tuned.png")
    assert (tmp_path / "tuned.png").stat().st_size > 0


def test_an_unreachable_target_chooses_nothing_and_wrap_says_so():
    result = quick_tune(tiny.build("dit"), target={"psnr": 1000.0})
    assert result.chosen is None and len(result.trials) == 2 and not any(t.meets for t in result.trials)
    with pytest.raises(ValueError, match="No trial met the target"):
        accel.wrap(tiny.build("dit"), result)


def test_a_ladder_stops_at_its_first_miss_and_the_budget_bounds_the_search():
    result = accel.tune(tiny.build("dit"), inputs(), num_inference_steps=STEPS, target={"psnr": 1000.0},
                        compile=False, rounds=1, progress=False, budget_s=600)
    for ladder in ("bac", "delta-dit"):
        assert len([trial for trial in result.trials if trial.label.startswith(ladder)]) == 1, ladder
    nothing = accel.tune(tiny.build("dit"), inputs(), num_inference_steps=STEPS, target={"psnr": 1.0},
                         compile=False, rounds=1, progress=False, budget_s=1e-3)
    assert nothing.trials == [] and nothing.chosen is None


def test_compiled_variants_are_tried_and_the_model_is_handed_back_uncompiled():
    pipe = tiny.build("dit")
    result = quick_tune(pipe, compile=True, compile_kwargs={"backend": "aot_eager"}, held_out=inputs(seed=50))
    compiled = [trial for trial in result.trials if trial.compiled]
    assert [trial.label for trial in compiled][0] == "no method, compiled"
    assert len(compiled) == 3
    assert pipe.transformer._compiled_call_impl is None and not accel.is_wrapped(pipe)
    assert result.held_out is not None and result.held_out.compiled == result.chosen.compiled
    torch._dynamo.reset()
