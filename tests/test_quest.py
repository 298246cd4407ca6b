"""QuEST: the tester mixin on every family, the quantizers, packing, the two execution paths, the artifact on disk,
release_originals, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerator_tester import AcceleratorTesterMixin, run

import accel
from accel.methods.quest import QuESTArtifact, QuESTConfig
from accel.methods.quest.method import PATH_DEQUANTIZE, PATH_INT8, step_group
from accel.methods.quest.quantizers import (
    CLIP_NORM,
    ActivationQuantizer,
    fake_quantize,
    pack_int4,
    unpack_int4,
    weight_ranges,
)
from accel.pipelines import tiny

QUICK = {"stage_a_iterations": 2, "stage_b_epochs": 1, "stage_b_iterations": 2}  # plumbing, not quality
_ARTIFACTS: dict[tuple, QuESTArtifact] = {}


def calibrated(family: str, weight_bits: int = 4, activation_bits: int = 8, steps: int = 3, **settings):
    """A tiny ``family`` pipeline and an artifact calibrated on it (cached: tiny builds are deterministic)."""
    key = (family, weight_bits, activation_bits, steps, tuple(sorted(settings.items())))
    if key not in _ARTIFACTS:
        pipe = tiny.build(family)
        inputs = tiny.example_inputs(family, num_inference_steps=steps)
        del inputs["num_inference_steps"]
        config = QuESTConfig(weight_bits=weight_bits, activation_bits=activation_bits, **{**QUICK, **settings})
        _ARTIFACTS[key] = accel.calibrate(pipe, config, [inputs], num_inference_steps=steps, progress=False)
    return tiny.build(family), _ARTIFACTS[key]


class TestQuEST(AcceleratorTesterMixin):
    families = tiny.FAMILIES
    saves = None  # quantization makes every computation cheaper; it skips none

    def make_config(self):
        return QuESTConfig()

    def config_for(self, family):
        return QuESTConfig(artifact=calibrated(family)[1])

    def test_the_output_is_quantized_not_float(self, family):
        plain = run(tiny.build(family), family)
        pipe = self.wrapped(family)
        quantized = run(pipe, family)
        assert not np.array_equal(plain, quantized)
        assert np.isfinite(quantized).all()
        paths = accel.summary(pipe).extras["quest"]["paths_last_call"]
        assert sum(paths.values()) > 0


def test_int4_packing_round_trips_two_codes_per_byte():
    codes = torch.randint(0, 16, (7, 5), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.numel() == 18  # ceil(35 / 2)
    assert torch.equal(unpack_int4(packed, (7, 5)), codes)


def test_clipping_search_never_loses_to_min_max_per_channel():
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))  # Gaussian tails: a little clipping pays
    for bits in (4, 8):
        errors = []
        for search in (False, True):
            delta, zero = weight_ranges(weight, bits, search)
            errors.append((fake_quantize(weight, delta, zero, bits) - weight).abs().pow(CLIP_NORM).sum(dim=1))
        assert (errors[1] <= errors[0] + 1e-6).all()
        if bits == 4:
            assert errors[1].sum() < 0.97 * errors[0].sum()


def test_activation_quantizer_groups_are_independent_parameters():
    quantizer = ActivationQuantizer(groups=3, bits=8)
    samples = torch.randn(1000, 8)
    quantizer.initialize(1, samples * 10, (1.0,))
    quantizer.initialize(0, samples, (0.999, 1.0))
    assert quantizer.delta[1] > 5 * quantizer.delta[0]
    assert float(quantizer.delta[2]) == 1.0  # untouched
    output = quantizer(samples, 1)
    output.sum().backward()
    assert quantizer.deltas[1].grad is not None and quantizer.deltas[0].grad is None


def test_step_groups_split_any_step_count_evenly():
    assert [step_group(s, 20, 4) for s in range(20)] == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert [step_group(s, 3, 4) for s in range(3)] == [0, 1, 2]
    assert step_group(0, None, 4) == 0


def test_integer_matmul_matches_the_dequantized_path():
    _, artifact = calibrated("dit", weight_bits=8, activation_bits=8)
    outputs = {}
    for execution in ("auto", "dequantize"):
        pipe = accel.wrap(tiny.build("dit"), QuESTConfig(weight_bits=8, activation_bits=8, artifact=artifact,
                                                         execution=execution))
        outputs[execution] = run(pipe, "dit")
        paths = accel.summary(pipe).extras["quest"]["paths_last_call"]
        if execution == "auto":
            assert paths[PATH_INT8] > paths.get(PATH_DEQUANTIZE, 0)
        else:
            assert set(paths) == {PATH_DEQUANTIZE}
    np.testing.assert_allclose(outputs["auto"], outputs["dequantize"], atol=2e-3)


def test_edge_layers_stay_at_8_bits_and_4_bit_weights_are_packed():
    _, artifact = calibrated("dit", weight_bits=4, activation_bits=4)
    edges = artifact.metadata["calibration"]["edge_layers"]
    assert edges == ["transformer.pos_embed.proj", "transformer.proj_out_2"]
    for name, layer in artifact.layers.items():
        numel = int(np.prod(layer.shape))
        if name in edges:
            assert (layer.weight_bits, layer.activation_bits) == (8, 8) and layer.codes.numel() == numel
        elif layer.kind == "embedding":  # a label table: weights only
            assert (layer.weight_bits, layer.activation_bits) == (4, 0) and layer.codes.numel() == (numel + 1) // 2
        else:
            assert (layer.weight_bits, layer.activation_bits) == (4, 4)
            assert layer.codes.numel() == (numel + 1) // 2
            assert layer.activation_delta.shape[1] == layer.shape[1]  # per input channel at 4 bits


def test_artifact_saved_and_loaded_gives_the_same_output(tmp_path):
    pipe, artifact = calibrated("pixart-alpha")
    expected = run(accel.wrap(pipe, QuESTConfig(artifact=artifact)), "pixart-alpha")
    artifact.save(tmp_path / "quest")
    assert sorted(p.name for p in (tmp_path / "quest").iterdir()) == ["quest.json", "quest.safetensors"]
    again = accel.wrap(tiny.build("pixart-alpha"), "quest-w4a8", artifact=tmp_path / "quest")
    np.testing.assert_array_equal(run(again, "pixart-alpha"), expected)
    assert accel.summary(again).extras["quest"]["bits"] == "W4A8"


def test_calibration_leaves_the_model_as_it_was():
    pipe = tiny.build("dit")
    before = run(pipe, "dit")
    inputs = tiny.example_inputs("dit")
    del inputs["num_inference_steps"]
    accel.calibrate(pipe, QuESTConfig(**QUICK), [inputs], num_inference_steps=3, progress=False)
    assert not accel.is_wrapped(pipe)
    for module in pipe.transformer.modules():
        assert getattr(module, "_diffusers_hook", None) is None and "forward" not in module.__dict__
    assert all(p.requires_grad for p in pipe.transformer.parameters())
    np.testing.assert_array_equal(run(pipe, "dit"), before)


def test_release_originals_frees_the_float_weights_and_unwrap_says_how_to_reload():
    pipe, artifact = calibrated("dit")
    expected = run(accel.wrap(tiny.build("dit"), QuESTConfig(artifact=artifact)), "dit")
    modules = dict(pipe.transformer.named_modules())
    quantized = [modules[name.removeprefix("transformer.")] for name in artifact.layers]
    float_bytes = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    quantized_bytes = sum(m.weight.numel() * m.weight.element_size() for m in quantized)
    accel.wrap(pipe, QuESTConfig(artifact=artifact, release_originals=True))
    held = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    assert all(m.weight.numel() == 0 for m in quantized)
    assert held <= float_bytes - quantized_bytes
    np.testing.assert_array_equal(run(pipe, "dit"), expected)
    with pytest.raises(ValueError, match="reload"):
        accel.unwrap(pipe)
    assert accel.is_wrapped(pipe)
    np.testing.assert_array_equal(run(pipe, "dit"), expected)


def test_a_failing_stacked_method_leaves_the_float_weights_in_place():
    pipe, artifact = calibrated("dit")
    weights = {name: p.clone() for name, p in pipe.transformer.named_parameters()}
    with pytest.raises(ValueError):
        accel.wrap(pipe, [QuESTConfig(artifact=artifact, release_originals=True), "bac", "bac"])
    assert not accel.is_wrapped(pipe)
    for name, p in pipe.transformer.named_parameters():
        assert torch.equal(p, weights[name]), name


def test_stacks_with_caching_and_quantized_attention():
    pipe, artifact = calibrated("dit")
    quantized = run(accel.wrap(tiny.build("dit"), QuESTConfig(artifact=artifact)), "dit")
    accel.wrap(pipe, [QuESTConfig(artifact=artifact, quantize_attention=True), accel.BACConfig(budget=0.5,
                                                                                              calibrate=False)])
    output = run(pipe, "dit")
    assert np.isfinite(output).all() and not np.array_equal(output, quantized)
    assert accel.summary(pipe).branches_computed_share < 1.0


def test_wrap_needs_an_artifact_for_this_model_and_these_bits():
    with pytest.raises(ValueError, match="accel.calibrate"):
        accel.wrap(tiny.build("dit"), "quest-w4a8")
    _, artifact = calibrated("dit")
    other = tiny.build("dit", seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match="other weights"):
        accel.wrap(other, QuESTConfig(artifact=artifact))
    assert not accel.is_wrapped(other)
    with pytest.raises(ValueError, match="another model"):
        accel.wrap(tiny.build("pixart-alpha"), QuESTConfig(artifact=artifact))
    with pytest.raises(ValueError, match="W4A8"):
        QuESTConfig(weight_bits=8, activation_bits=8, artifact=artifact)


@pytest.mark.parametrize("field", ["weight_bits", "activation_bits", "edge_bits"])
@pytest.mark.parametrize("value", [3, 16, True, "4"])
def test_bits_other_than_4_or_8_are_refused(field, value):
    with pytest.raises(ValueError, match="4 or 8"):
        QuESTConfig(**{field: value})


def test_a_folder_that_is_no_artifact_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a QuEST artifact"):
        QuESTConfig(artifact=tmp_path)
    (tmp_path / "quest.json").write_text('{"format": "something else"}')
    (tmp_path / "quest.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="accel.quest/1"):
        QuESTConfig(artifact=str(tmp_path))


class _Dense(torch.nn.Module):
    """A linear layer that is not an nn.Linear: nothing QuEST knows how to quantize."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_a_model_with_no_linear_layer_is_refused():
    pipe = tiny.build("dit")
    for module in list(pipe.transformer.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, child_name, _Dense(child))
            elif isinstance(child, torch.nn.Conv2d):
                child.weight = torch.nn.Parameter(torch.empty(0))
    inputs = tiny.example_inputs("dit")
    del inputs["num_inference_steps"]
    with pytest.raises(ValueError, match="no Linear or Conv2d layer to quantize"):
        accel.calibrate(pipe, "quest-w8a8", [inputs], num_inference_steps=3, progress=False)


def test_calibration_inputs_are_checked():
    with pytest.raises(ValueError, match="call arguments"):
        accel.calibrate(tiny.build("dit"), "quest-w8a8", [], num_inference_steps=3, progress=False)


@pytest.mark.parametrize("field, value", [("execution", "int4"), ("activation_range", "mse"), ("step_groups", 0),
                                          ("release_originals", "yes"), ("artifact", 3)])
def test_other_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        QuESTConfig(**{field: value})
