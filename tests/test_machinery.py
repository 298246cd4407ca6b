"""The hook machinery, exercised through the two toy accelerators of ``toy_accelerators``."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from accelerator_tester import AcceleratorTesterMixin, run
from diffusers.hooks import ModelHook
from toy_accelerators import ProbeConfig, ReuseBlocksConfig

import accel
from accel.pipelines import tiny

ALL = tiny.FAMILIES


class TestReuseBlocksPassesTheMixin(AcceleratorTesterMixin):
    families = ALL
    saves = "blocks"

    def make_config(self):
        return ReuseBlocksConfig(period=2, fraction=0.5)

    def test_it_really_changes_the_output(self, family):
        # Otherwise the state-leak checks above would prove nothing.
        baseline = run(tiny.build(family), family)
        assert not np.array_equal(run(self.wrapped(family), family), baseline)


class TestProbePassesTheMixin(AcceleratorTesterMixin):
    families = ALL
    saves = None  # the probe replaces attention with the same computation: the mixin's machinery check

    def make_config(self):
        return ProbeConfig()

    def test_exact_attention_replacement_is_bit_identical(self, family):
        baseline = run(tiny.build(family), family)
        pipe = self.wrapped(family)
        np.testing.assert_array_equal(run(pipe, family), baseline)
        state = pipe._accel_context.scopes[0].probe_state
        assert state.history and accel.summary(pipe).attention_density == 1.0


def _last_probe_call(pipe, what="forwards"):
    return pipe._accel_context.scopes[0].probe_state.history[-1][what]


@pytest.mark.parametrize("family", ALL)
def test_steps_and_branches_are_tracked(family):
    pipe = accel.wrap(tiny.build(family), ProbeConfig(intercept_attention=False))
    run(pipe, family, num_inference_steps=4)
    seen = _last_probe_call(pipe)
    adapter = pipe._accel_context.adapter
    steps = sorted({step for step, *_ in seen})
    assert steps == [0, 1, 2, 3]
    assert {num_steps for _, num_steps, *_ in seen} == {4}
    branches = [branch for _, _, branch, _ in seen]
    if adapter.cfg == "separate":
        assert branches == ["cond", "uncond"] * 4
    else:
        assert set(branches) <= {"call0", "cond_uncond"} and len(branches) == 4
    run(pipe, family, num_inference_steps=2, guidance=False)
    branches = [branch for _, _, branch, _ in _last_probe_call(pipe)]
    assert len(branches) == 2 and "uncond" not in branches


def test_wan22_switches_experts_and_keeps_counting_steps():
    pipe = accel.wrap(tiny.build("wan2.2"), ProbeConfig(intercept_attention=False))
    run(pipe, "wan2.2", num_inference_steps=4)
    seen = _last_probe_call(pipe)
    assert {denoiser for *_, denoiser in seen} == {"transformer", "transformer_2"}
    assert [step for step, *_ in seen] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    "family, expected",
    [
        ("dit", (1, 4, 4, 0, None)),
        ("pixart-alpha", (1, 4, 4, 32, None)),
        ("sd3", (1, 8, 8, 77 + 32, "last")),
        ("flux", (1, 4, 4, 32, "first")),
        ("wan", (2, 1, 1, 32, None)),
        ("skyreels-v2", (2, 1, 1, 32, None)),
        ("ltx-video", (3, 2, 2, 32, None)),
        ("allegro", (3, 4, 4, 32, None)),
        ("cogvideox", (3, 2, 2, 32, "first")),
        ("hunyuan-video", (2, 2, 2, 8, "last")),
        ("sd15", (1, 8, 8, 77, None)),
        ("sdxl", (1, 8, 8, 77, None)),
        ("sana", (1, 8, 8, 8, None)),
        ("flux2", (1, 4, 4, 8, "first")),
        ("lumina2", (1, 4, 4, 8, "first")),
        ("aura-flow", (1, 4, 4, 8 + 32, "first")),  # 8 register tokens before the text
        ("chroma", (1, 4, 4, 32, "first")),
        ("qwen-image", (1, 2, 2, 8, "first")),
        ("bria", (1, 4, 4, 32, "first")),
        ("ovis-image", (1, 4, 4, 8, "first")),
        ("cogview3plus", (1, 4, 4, 32, "first")),
        ("easyanimate", (3, 2, 2, 8, "first")),
    ],
)
def test_token_layout(family, expected):
    pipe = accel.wrap(tiny.build(family), ProbeConfig(intercept_attention=False))
    run(pipe, family)
    layout = _last_probe_call(pipe, "layouts")[0]
    assert (layout.frames, layout.height, layout.width, layout.text_tokens, layout.text_position) == expected
    assert pipe._accel_context.current is None  # outside a call there is no current step


@pytest.mark.parametrize("family", ALL)
def test_every_block_attention_is_intercepted_and_counted(family):
    pipe = accel.wrap(tiny.build(family), ProbeConfig())
    run(pipe, family)
    context = pipe._accel_context
    summary = accel.summary(pipe)
    intercepted = _last_probe_call(pipe, "attention_calls")
    executed = sum(r.attention_calls for r in summary.steps)
    assert executed == len(intercepted) == sum(r.attention_reported for r in summary.steps) > 0
    for record in summary.steps:  # every forward ran every attention branch of its denoiser's blocks
        per_forward = {attr: sum(len(b.attentions) for b in blocks) for attr, blocks in context.blocks.items()}
        assert record.attention_calls in {record.forwards * n for n in per_forward.values()}
    assert {kind for *_, kind, _ in intercepted} <= {"self_attn", "cross_attn", "joint_attn"}


def test_processor_and_signature_are_untouched():
    pipe = tiny.build("flux")
    attention = pipe.transformer.transformer_blocks[0].attn
    processor, signature = attention.processor, inspect.signature(attention.forward)
    accel.wrap(pipe, ProbeConfig())
    assert attention.processor is processor
    assert inspect.signature(attention.forward) == signature


@pytest.mark.parametrize("family", ["dit", "flux", "wan", "sd15"])
def test_summary_counts_match_the_schedule(family):
    period = 2
    pipe = accel.wrap(tiny.build(family), ReuseBlocksConfig(period=period, fraction=0.5))
    run(pipe, family, num_inference_steps=5)
    blocks = len(next(iter(pipe._accel_context.blocks.values())))
    reused_per_forward = round(blocks * 0.5)
    summary = accel.summary(pipe)
    assert [r.step for r in summary.steps if r.branch in ("call0", "cond")] == [0, 1, 2, 3, 4]
    for record in summary.steps:
        reused = reused_per_forward if record.step % period else 0
        assert record.blocks_total == record.forwards * blocks
        assert record.blocks_computed == record.forwards * (blocks - reused), record
    expected_share = 1 - (2 * reused_per_forward) / (5 * blocks)
    assert summary.blocks_computed_share == pytest.approx(expected_share)
    text = str(summary)
    assert "test-reuse" in text and "blocks computed" in text
    assert summary.to_dict()["methods"] == [{"method": "test-reuse", "period": 2, "fraction": 0.5}]


def test_empty_method_list_measures_a_plain_run():
    baseline = run(tiny.build("dit"), "dit")
    pipe = accel.wrap(tiny.build("dit"), [])
    np.testing.assert_array_equal(run(pipe, "dit"), baseline)
    summary = accel.summary(pipe)
    assert summary.blocks_computed_share == 1.0 and summary.branches_computed_share == 1.0
    assert len(summary.steps) == 3


def test_stacking_and_wrapping_twice():
    pipe = accel.wrap(tiny.build("dit"), ["test-reuse", ProbeConfig()])
    stacked = run(pipe, "dit")
    second = accel.wrap(accel.wrap(tiny.build("dit"), "test-reuse"), ProbeConfig())
    np.testing.assert_array_equal(run(second, "dit"), stacked)
    with pytest.raises(ValueError, match="already applied"):
        accel.wrap(second, "test-reuse")
    assert [m["method"] for m in accel.summary(second).methods] == ["test-reuse", "test-probe"]


def _assert_pristine(pipe, family, baseline):
    assert not accel.is_wrapped(pipe)
    assert type(pipe).__dict__.get("_accel_base_class") is None
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for name, child in module.named_modules():
                assert "forward" not in child.__dict__, name
                registry = getattr(child, "_diffusers_hook", None)
                assert registry is None or not any(h.startswith("accel") for h in registry.hooks), name
    np.testing.assert_array_equal(run(pipe, family), baseline)


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_unwrap_leaves_no_residue(family):
    pipe = tiny.build(family)
    baseline = run(pipe, family)
    accel.wrap(pipe, ["test-reuse", ProbeConfig()])
    run(pipe, family)
    accel.unwrap(pipe)
    _assert_pristine(pipe, family, baseline)
    assert accel.unwrap(pipe) is pipe  # unwrapping twice is harmless


def test_failed_apply_leaves_the_pipeline_untouched():
    from accel import AccelConfig, register_accelerator, unregister_accelerator

    class BrokenConfig(AccelConfig):
        method = "test-broken"

    def apply_broken(scope, config):
        for block in scope.blocks["transformer"]:
            scope.register_hook(block.module, ModelHook())
        raise RuntimeError("boom")

    register_accelerator(BrokenConfig, apply_broken, description="fails half-way")
    try:
        pipe = tiny.build("dit")
        baseline = run(pipe, "dit")
        with pytest.raises(RuntimeError, match="boom"):
            accel.wrap(pipe, ["test-reuse", "test-broken"])
        _assert_pristine(pipe, "dit", baseline)
        accel.wrap(pipe, "test-reuse")  # stacked on an existing wrap, a failure keeps what was there
        wrapped_output = run(pipe, "dit")
        with pytest.raises(RuntimeError, match="boom"):
            accel.wrap(pipe, "test-broken")
        np.testing.assert_array_equal(run(pipe, "dit"), wrapped_output)
        assert [m["method"] for m in accel.summary(pipe).methods] == ["test-reuse"]
    finally:
        unregister_accelerator(BrokenConfig)


def test_non_native_attention_backend_is_refused_cleanly():
    pipe = tiny.build("flux")
    baseline = run(pipe, "flux")
    pipe.transformer.transformer_blocks[0].attn.processor._attention_backend = "flash"
    with pytest.raises(ValueError, match="native backend"):
        accel.wrap(pipe, ProbeConfig())
    pipe.transformer.transformer_blocks[0].attn.processor._attention_backend = None
    _assert_pristine(pipe, "flux", baseline)


def test_two_methods_cannot_replace_the_same_attention():
    from accel import AccelConfig, register_accelerator, unregister_accelerator

    class SecondProbe(AccelConfig):
        method = "test-probe-2"

    from toy_accelerators import apply_probe

    register_accelerator(SecondProbe, lambda scope, config: apply_probe(scope, ProbeConfig()), description="x")
    try:
        with pytest.raises(ValueError, match="both replace the attention"):
            accel.wrap(tiny.build("dit"), [ProbeConfig(), SecondProbe()])
    finally:
        unregister_accelerator(SecondProbe)


def test_shared_transformer_cannot_be_wrapped_twice():
    pipe = tiny.build("dit")
    twin = type(pipe)(**pipe.components)
    accel.wrap(pipe, "test-reuse")
    with pytest.raises(ValueError, match="already wrapped by accel through another pipeline"):
        accel.wrap(twin, "test-reuse")
    assert not accel.is_wrapped(twin)


def test_plain_pipeline_sharing_the_transformer_is_unaffected():
    pipe = tiny.build("dit")
    baseline = run(pipe, "dit")
    twin = type(pipe)(**pipe.components)
    accel.wrap(pipe, "test-reuse")
    assert not np.array_equal(run(pipe, "dit"), baseline)
    np.testing.assert_array_equal(run(twin, "dit"), baseline)  # hooks are inert outside the wrapped call


def test_transformer_called_directly_is_unaffected():
    pipe = tiny.build("dit")
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.tensor([1, 2]))
    expected = pipe.transformer(*inputs).sample
    accel.wrap(pipe, "test-reuse")
    torch.testing.assert_close(pipe.transformer(*inputs).sample, expected, rtol=0, atol=0)


def test_torch_compile_of_the_transformer_still_runs():
    pipe = accel.wrap(tiny.build("dit"), "test-reuse")
    expected = run(pipe, "dit")
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    np.testing.assert_allclose(run(pipe, "dit"), expected, atol=1e-5)


def test_errors_are_value_errors():
    pipe = tiny.build("dit")
    with pytest.raises(ValueError, match="Did you mean 'test-reuse'"):
        accel.wrap(pipe, "test-reuze")
    with pytest.raises(ValueError, match="match no field"):
        accel.wrap(pipe, "test-reuse", periodd=3)
    with pytest.raises(ValueError, match="period"):
        accel.wrap(pipe, "test-reuse", period=0)
    with pytest.raises(ValueError, match="appears twice"):
        accel.wrap(pipe, ["test-reuse", "test-reuse-3"])
    with pytest.raises(ValueError, match="diffusers pipelines"):
        accel.wrap(pipe.transformer, "test-reuse")
    with pytest.raises(ValueError, match="not wrapped"):
        accel.summary(pipe)
    with pytest.raises(ValueError, match="preset name"):
        accel.wrap(pipe, 3)
    assert not accel.is_wrapped(pipe)


def test_unsupported_family_is_refused_with_the_supported_ones():
    from accel import register_accelerator, unregister_accelerator

    class DiTOnly(ReuseBlocksConfig):
        method = "test-dit-only"

    register_accelerator(DiTOnly, lambda scope, config: None, description="x", families=("dit", "pixart-alpha"))
    try:
        with pytest.raises(ValueError, match="does not support the 'flux' family.*supported: dit, pixart-alpha"):
            accel.wrap(tiny.build("flux"), "test-dit-only")
        accel.wrap(tiny.build("dit"), "test-dit-only")
    finally:
        unregister_accelerator(DiTOnly)


def test_overrides_and_presets():
    pipe = accel.wrap(tiny.build("dit"), "test-reuse-3", fraction=1.0)
    (config,) = [scope.config for scope in pipe._accel_context.scopes]
    assert (config.period, config.fraction) == (3, 1.0)


def test_available_lists_registered_methods():
    names = {entry["name"]: entry for entry in accel.available()}
    assert names["test-reuse"]["presets"] == ["test-reuse", "test-reuse-3"]
    assert "flux" in names["test-reuse"]["families"] and names["test-reuse"]["description"]


def test_state_is_reset_after_a_call_that_raises():
    pipe = accel.wrap(tiny.build("flux"), ReuseBlocksConfig(period=2, fraction=1.0))

    def fail_at_step_two(pipeline, step, timestep, callback_kwargs):
        if step == 2:
            raise KeyboardInterrupt("user pressed stop")
        return callback_kwargs

    with pytest.raises(KeyboardInterrupt):
        pipe(**tiny.example_inputs("flux", num_inference_steps=4), callback_on_step_end=fail_at_step_two)
    assert "step" not in pipe.scheduler.__dict__  # the step counter is detached again
    assert pipe._accel_context.current is None and not pipe._accel_context.scopes[0].states[0].outputs
    fresh = run(accel.wrap(tiny.build("flux"), ReuseBlocksConfig(period=2, fraction=1.0)), "flux")
    np.testing.assert_array_equal(run(pipe, "flux"), fresh)


def test_a_wrapped_pipeline_serialises_calls_from_two_threads():
    import threading

    pipe = accel.wrap(tiny.build("dit"), "test-reuse")
    expected = run(accel.wrap(tiny.build("dit"), "test-reuse"), "dit")
    outputs, errors = [], []

    def work():
        try:
            for _ in range(3):
                outputs.append(run(pipe, "dit"))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(outputs) == 6
    for output in outputs:
        np.testing.assert_array_equal(output, expected)
