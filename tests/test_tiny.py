"""The offline tiny pipelines, tokenizers and the main job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerator_tester import run

from accel.eval import quick
from accel.pipelines import tiny
from accel.pipelines.tokenizers import clip_tokenizer, t5_tokenizer
from accel.registry import parse_method_list


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tiny_pipeline_runs_in_eval_mode_and_is_seeded(family):
    pipe = tiny.build(family)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training
    first = run(pipe, family)
    assert np.isfinite(first).all() and first.min() >= 0 and first.max() <= 1
    np.testing.assert_array_equal(run(tiny.build(family), family), first)  # same build seed, same weights
    assert not np.array_equal(run(pipe, family, seed=1), first)


def test_unknown_family():
    with pytest.raises(ValueError, match="Unknown tiny family 'sdxxl'; choose one of dit"):
        tiny.build("sdxxl")
    with pytest.raises(ValueError, match="Unknown tiny family"):
        tiny.example_inputs("sdxxl")


def test_offline_tokenizers():
    clip = clip_tokenizer()
    ids = clip("a photo of a cat").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(clip) == 49408
    assert clip.decode(ids, skip_special_tokens=True).strip() == "a photo of a cat"
    t5 = t5_tokenizer()
    encoded = t5("a cat", padding="max_length", max_length=8).input_ids
    assert encoded[5] == t5.eos_token_id and encoded[-1] == t5.pad_token_id == 0
    assert t5.decode(encoded, skip_special_tokens=True) == "a cat"


def test_main_job_prints_the_table(capsys):
    assert quick.main(["--model", "tiny:dit", "--repeats", "2", "--steps", "2"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "baseline" in out and "random weights" in out and "latency ms" in out
    assert "min–max" in out and "Next: accel-eval" in out  # the spread, and where to go next
    for phase in ("loading tiny:dit", "building bac (calibrating bac", "building quest (calibrating quest",
                  "round 1/3 done (warm-up)", "round 3/3"):
        assert phase in captured.err  # progress on stderr, the table alone on stdout


def test_main_job_compares_a_method():
    model = quick.model_handle("tiny:dit")
    rows = quick.compare(model, parse_method_list("test-reuse,test-probe"), repeats=1, steps=4)
    by_method = {row["method"]: row for row in rows}
    assert by_method["baseline"]["psnr_db"] == float("inf") and by_method["test-probe"]["psnr_db"] == float("inf")
    assert by_method["test-reuse"]["psnr_db"] < 100 and by_method["test-reuse"]["blocks_computed"] == 0.75


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "tiny:nope"], "Unknown tiny family"),
        (["--model", "sd-turbo"], "Unknown model"),
        (["--methods", "bca"], "Unknown accelerator 'bca'"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_main_job_rejects_bad_input(argv, message, capsys):
    assert quick.main(argv) == 2
    assert message in capsys.readouterr().err
