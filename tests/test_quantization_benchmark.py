"""The quantization benchmark's pieces: the peers run on the shipped digits-dit, the weight bytes count what each
row really holds, and the bars are read from the rows."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts, not a package

import accel  # noqa: E402
from accel.eval.metrics import output_array, psnr  # noqa: E402
from accel.methods.quest import QuESTConfig  # noqa: E402
from accel.pipelines import reference, tiny  # noqa: E402
from benchmarks import quantization  # noqa: E402


def _call(pipe):
    return output_array(pipe(**reference.call_kwargs("digits-dit", pipe, [3, 7], seed=0, num_inference_steps=4)))


@pytest.mark.parametrize("name", ["torchao int8 dynamic (W8A8)", "quanto qint4 weights", "bitsandbytes nf4 weights"])
def test_a_peer_quantizes_the_transformer_and_stays_close_to_float(name):
    plain = reference.load("digits-dit")
    expected = _call(plain)
    float_bytes = quantization.transformer_bytes(plain.transformer)
    (row,) = [row for row in quantization.rows_for("digits-dit") if row.name == name]
    pipe = reference.load("digits-dit")
    row.apply(pipe, "digits-dit")
    assert quantization.transformer_bytes(pipe.transformer) < 0.5 * float_bytes  # float32 -> 8 or 4 bits
    assert psnr(expected, _call(pipe)) > 25


def test_weight_bytes_count_what_quest_holds_after_releasing_the_floats():
    pipe = tiny.build("dit")
    inputs = tiny.example_inputs("dit")
    del inputs["num_inference_steps"]
    config = QuESTConfig(stage_a_iterations=0, stage_b_epochs=0)
    artifact = accel.calibrate(pipe, config, [inputs], num_inference_steps=3, progress=False)
    fp16 = quantization.fp16_bytes(pipe.transformer)
    assert quantization.transformer_bytes(pipe.transformer) == pytest.approx(2 * fp16, rel=0.01)  # float32
    accel.wrap(pipe, config.replace(artifact=artifact, release_originals=True))
    held = quantization.transformer_bytes(pipe.transformer)
    assert held >= artifact.weight_bytes  # the codes and scales are counted...
    assert held < fp16 / 2  # ...and the released float32 weights (2x fp16) are not


def test_the_bars_are_read_from_the_rows():
    def row(name, kind, fid, accuracy, psnr_db, ratio=0.5, seconds=60.0):
        return {"name": name, "kind": kind, "fid": fid, "class_accuracy": accuracy, "psnr_db": psnr_db,
                "weight_bytes_over_fp16": ratio, "calibration_s": seconds}

    rows = [row("float", "float", 10.0, 0.99, np.inf), row("quest-w8a8", "ours", 10.1, 0.985, 40),
            row("quest-w4a8", "ours", 11.5, 0.98, 35, ratio=0.27), row("quest-w4a4", "ours", 12.0, 0.97, 30),
            row("rtn-w4a4", "rtn", 13.0, 0.9, 28), row("quanto qint4 weights", "peer", 11.0, 0.99, 36)]
    lines = quantization.bars({"model": "digits-dit", "rows": rows})
    assert lines[0].startswith("- met: W8A8 FID")
    assert lines[2].startswith("- **not met**: W4A8 FID")  # 11.5 > 1.1 * 10
    assert "met: W4A4 better FID and PSNR than rtn-w4a4" in lines[3]
    assert lines[4].startswith("- **not met**: W4A4 better FID and PSNR than quanto qint4 weights")
    assert lines[5].startswith("- met: 4-bit weight bytes")
