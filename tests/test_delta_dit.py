"""Δ-DiT: the tester mixin on every supported family, exactness, the schedule, and the Δ arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerator_tester import AcceleratorTesterMixin, run

import accel
from accel.methods.delta_dit import FAMILIES, DeltaDiTConfig, delta_dit_plan
from accel.pipelines import tiny

# aura-flow, chroma: their concatenated single-stream blocks are outside Δ-DiT's families (delta_dit.FAMILIES)
TINY_FAMILIES = tuple(f for f in tiny.FAMILIES if f not in ("sd15", "sdxl", "aura-flow", "chroma"))


class TestDeltaDiT(AcceleratorTesterMixin):
    families = TINY_FAMILIES
    saves = "blocks"

    def make_config(self):
        return DeltaDiTConfig(interval=2, boundary=0.5, cached_fraction=0.5)

    def test_interval_one_is_bit_identical_to_the_baseline(self, family):
        baseline = run(tiny.build(family), family, num_inference_steps=4)
        pipe = accel.wrap(tiny.build(family), DeltaDiTConfig(interval=1))
        np.testing.assert_array_equal(run(pipe, family, num_inference_steps=4), baseline)
        assert accel.summary(pipe).blocks_computed_share == 1.0

    def test_summary_counts_match_the_schedule(self, family):
        config = DeltaDiTConfig(interval=2, boundary=0.5, cached_fraction=0.5)
        pipe = accel.wrap(tiny.build(family), config)
        run(pipe, family, num_inference_steps=6)
        depth = {len(blocks) for blocks in pipe._accel_context.blocks.values()}.pop()
        summary = accel.summary(pipe)
        for record in summary.steps:
            skipped = len(delta_dit_plan(config, record.step, 6, depth))
            assert record.blocks_computed == record.forwards * (depth - skipped), record
        assert summary.blocks_computed_share < 1.0
        assert not np.array_equal(run(pipe, family, num_inference_steps=6),
                                  run(tiny.build(family), family, num_inference_steps=6))


def test_plan_follows_the_paper_schedule():
    config = DeltaDiTConfig(compute_final_step=False)  # interval 2, boundary 0.6, 75% of the blocks
    plans = [delta_dit_plan(config, step, 20, 12) for step in range(20)]
    assert all(not plans[step] for step in range(0, 20, 2))  # full steps
    assert all(plans[step] == range(3, 12) for step in range(1, 12, 2))  # before b = 12: the rear 9 blocks
    assert all(plans[step] == range(0, 9) for step in range(13, 20, 2))  # from b on: the front 9 blocks
    assert delta_dit_plan(config, 3, None, 12) == range(0)  # unknown schedule length: compute everything
    assert delta_dit_plan(DeltaDiTConfig(cached_fraction=0.0), 3, 20, 12) == range(0)


def test_the_final_step_computes_by_default():
    paper, ours = DeltaDiTConfig(compute_final_step=False), DeltaDiTConfig()
    assert delta_dit_plan(paper, 19, 20, 12) == range(0, 9)
    assert delta_dit_plan(ours, 19, 20, 12) == range(0)
    assert [delta_dit_plan(ours, step, 20, 12) for step in range(19)] == \
        [delta_dit_plan(paper, step, 20, 12) for step in range(19)]


def test_a_full_step_measures_only_when_the_next_step_reuses():
    pipe = tiny.build("dit")
    accel.wrap(pipe, DeltaDiTConfig(interval=2, boundary=1.0, cached_fraction=0.5))  # step 3 of 4 computes
    hooks = [block._diffusers_hook.get_hook("accel.delta-dit.block") for block in pipe.transformer.transformer_blocks]
    measured = []
    original = type(hooks[0])._measure_end

    def spy(hook, payload, output):
        measured.append(pipe._accel_context.recorder.current.step)
        return original(hook, payload, output)

    for hook in hooks:
        hook._measure_end = spy.__get__(hook)
    run(pipe, "dit", num_inference_steps=4)
    assert set(measured) == {0}  # step 2 is full and the final step 3 computes: nothing reads a Δ from step 2


def test_reused_range_outputs_its_input_plus_the_stored_delta():
    pipe = tiny.build("dit")
    blocks = pipe.transformer.transformer_blocks
    seen = {}

    def first_in(module, args, kwargs):
        seen.setdefault("in", []).append(args[0].clone())

    def last_out(module, args, kwargs, output):
        seen.setdefault("out", []).append(output.clone())

    blocks[0].register_forward_pre_hook(first_in, with_kwargs=True)
    blocks[-1].register_forward_hook(last_out, with_kwargs=True)
    accel.wrap(pipe, DeltaDiTConfig(interval=2, boundary=1.0, cached_fraction=1.0, compute_final_step=False))
    run(pipe, "dit", num_inference_steps=2)
    (in_0, in_1), (out_0, out_1) = seen["in"], seen["out"]
    torch.testing.assert_close(out_1, in_1 + (out_0 - in_0), rtol=0, atol=1e-6)
    assert not torch.equal(in_0, in_1)


def test_unet_is_refused_with_the_supported_families():
    with pytest.raises(ValueError, match="does not support the 'unet' family"):
        accel.wrap(tiny.build("sd15"), "delta-dit")
    assert "unet" not in FAMILIES and "flux" in FAMILIES


@pytest.mark.parametrize(
    "changes, match",
    [({"interval": 0}, "interval"), ({"boundary": 1.5}, "boundary"), ({"cached_fraction": -0.1}, "cached_fraction"),
     ({"compute_final_step": 1}, "compute_final_step")],
)
def test_bad_config_values(changes, match):
    with pytest.raises(ValueError, match=match):
        DeltaDiTConfig(**changes)


def test_config_round_trip_and_registry():
    config = DeltaDiTConfig(interval=3, boundary=0.4, cached_fraction=0.5)
    assert DeltaDiTConfig.from_dict(config.to_dict()) == config
    assert "delta-dit" in {entry["name"] for entry in accel.available()}


def test_torch_compile_still_runs():
    pipe = accel.wrap(tiny.build("dit"), "delta-dit")
    expected = run(pipe, "dit", num_inference_steps=4)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    np.testing.assert_allclose(run(pipe, "dit", num_inference_steps=4), expected, atol=1e-5)
