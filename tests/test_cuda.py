"""On a CUDA device (skipped without one): the caching and sparse-attention accelerators on GPU tensors.

The CPU suite proves the methods. This file checks what only a GPU run shows: that nothing the hooks make lands on
the wrong device, that unwrap and BAC's block skip stay bit-identical with CUDA kernels, that the Triton
block-sparse kernel inside AdaSpa and VMoBA gives what the exact PyTorch path gives on the CPU, and that a
calibrated BAC keeps its quality on the shipped ``digits-dit``. Run it where a GPU is:
``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import accel
from accel.eval.metrics import output_array, psnr
from accel.methods.adaspa import AdaSpaConfig
from accel.methods.bac import BACConfig
from accel.methods.delta_dit import DeltaDiTConfig
from accel.methods.vmoba import VMoBAConfig
from accel.pipelines import reference, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CACHING_FAMILIES = ("dit", "pixart-alpha", "sd3", "flux", "wan", "cogvideox", "hunyuan-video")
RULED_FAMILIES = ("dit", "pixart-alpha", "wan")  # families whose blocks BAC can skip whole
SPARSE_FAMILIES = ("wan", "cogvideox", "flux")
STEPS = 6


def on_cuda(family: str):
    return tiny.build(family).to("cuda")


def inputs(family: str, device: str = "cuda", **kwargs) -> dict:
    """``tiny.example_inputs`` with its tensors (HunyuanVideo's prompt embeddings) on ``device``."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in tiny.example_inputs(family, **kwargs).items()}


def run(pipe, family: str, device: str = "cuda", **kwargs) -> np.ndarray:
    output = pipe(**inputs(family, device, **kwargs))
    return output_array(output)


def calibration_inputs(family: str) -> list[dict]:
    kwargs = inputs(family, num_inference_steps=STEPS)
    del kwargs["num_inference_steps"]
    return [kwargs]


def caching_config(pipe, family: str, method: str):
    if method == "delta-dit":
        return DeltaDiTConfig(interval=2, boundary=0.5, cached_fraction=0.5)
    options = {"bac": {}, "bac-forecast-l2": dict(forecast=1, metric="l2", per_block=True, top_k=0)}[method]
    config = BACConfig(budget=0.5, **options)
    schedule = accel.calibrate(pipe, config, calibration_inputs(family), num_inference_steps=STEPS, progress=False)
    return config.replace(schedule=schedule)


@pytest.mark.parametrize("method", ["delta-dit", "bac", "bac-forecast-l2"])
@pytest.mark.parametrize("family", CACHING_FAMILIES)
def test_caching_runs_on_cuda_and_unwraps_bit_identical(family, method):
    pipe = on_cuda(family)
    baseline = run(pipe, family, num_inference_steps=STEPS)
    np.testing.assert_array_equal(run(pipe, family, num_inference_steps=STEPS), baseline)  # deterministic here
    accel.wrap(pipe, caching_config(pipe, family, method))
    output = run(pipe, family, num_inference_steps=STEPS)
    assert np.isfinite(output).all() and not np.array_equal(output, baseline)
    assert accel.summary(pipe).branches_computed_share < 1.0
    accel.unwrap(pipe)
    np.testing.assert_array_equal(run(pipe, family, num_inference_steps=STEPS), baseline)


@pytest.mark.parametrize("family", RULED_FAMILIES)
def test_block_skip_is_bit_identical_on_cuda(family):
    pipe = on_cuda(family)
    config = caching_config(pipe, family, "bac-forecast-l2")
    outputs = {}
    for skip in (True, False):
        wrapped = accel.wrap(on_cuda(family), config.replace(skip_reused_blocks=skip))
        outputs[skip] = run(wrapped, family, num_inference_steps=STEPS)
    np.testing.assert_array_equal(outputs[True], outputs[False])


@pytest.mark.parametrize("config", [AdaSpaConfig(sparsity=0.5, block_size=16),
                                    VMoBAConfig(block_size=16, dense_above=1.0)],  # tiny: default would run dense
                         ids=["adaspa", "vmoba"])
@pytest.mark.parametrize("family", SPARSE_FAMILIES)
def test_sparse_attention_triton_kernel_matches_the_pytorch_path_on_cuda(family, config, monkeypatch):
    """Every call the method makes to the Triton kernel, checked against the exact PyTorch path on the same tensors
    and block lists (end to end, a flipped block choice after a last-bit difference would say nothing)."""
    import accel.kernels.triton_backend
    from accel.kernels.block_sparse import block_sparse_attention_torch

    triton_kernel = accel.kernels.triton_backend.block_sparse_attention_triton
    errors = []

    def checked(q, k, v, index, count, block_size, scale):
        out, lse = triton_kernel(q, k, v, index, count, block_size, scale)
        expected, expected_lse = block_sparse_attention_torch(q, k, v, index, count, block_size, scale)
        finite = torch.isfinite(expected_lse)
        assert torch.equal(finite, torch.isfinite(lse))
        lse_error = (lse[finite] - expected_lse[finite]).abs().max() if finite.any() else torch.tensor(0.0)
        errors.append(max(float((out.float() - expected.float()).abs().max()), float(lse_error)))
        return out, lse

    monkeypatch.setattr(accel.kernels.triton_backend, "block_sparse_attention_triton", checked)
    pipe = accel.wrap(on_cuda(family), config)
    assert np.isfinite(run(pipe, family, num_inference_steps=10)).all()
    assert errors, "the method never called the block-sparse kernel"
    assert max(errors) < 1e-4


def test_compiled_transformer_runs_with_bac_on_cuda():
    pipe = on_cuda("dit")
    config = caching_config(pipe, "dit", "bac-forecast-l2")
    eager = run(accel.wrap(on_cuda("dit"), config), "dit", num_inference_steps=STEPS)
    accel.wrap(pipe, config)
    pipe.transformer = torch.compile(pipe.transformer)
    np.testing.assert_allclose(run(pipe, "dit", num_inference_steps=STEPS), eager, atol=1e-4)


def test_calibrated_bac_keeps_its_quality_on_digits_dit_on_cuda():
    labels = [i % 10 for i in range(40)]
    cpu_pipe, pipe = reference.load("digits-dit"), reference.load("digits-dit").to("cuda")
    kwargs = lambda p, seed: reference.call_kwargs("digits-dit", p, labels, seed=seed)  # noqa: E731
    cpu_baseline = cpu_pipe(**kwargs(cpu_pipe, 7)).images
    baseline = pipe(**kwargs(pipe, 7)).images
    assert psnr(cpu_baseline, baseline) > 45  # the same model on either device
    calibration = [{k: v for k, v in kwargs(pipe, 90_000).items() if k != "num_inference_steps"}]
    accel.wrap_calibrated(pipe, "bac-forecast", calibration, num_inference_steps=20)
    output = pipe(**kwargs(pipe, 7)).images
    assert psnr(baseline, output) > 30  # 35.06 dB on the CPU at 200 samples
    assert accel.summary(pipe).blocks_computed_share <= 0.31
