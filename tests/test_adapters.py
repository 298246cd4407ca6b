"""Every family adapter resolves blocks, branches, modulation layers and denoisers on its tiny model."""

from __future__ import annotations

import pytest
import torch

from accel.pipelines import FAMILY_NAMES, adapter_for, get_adapter, tiny
from accel.pipelines.adapters import ATTENTION_BRANCHES, TokenLayout, adapter_for_model

TINY_TO_ADAPTER = {"wan2.2": "wan", "sd15": "unet", "sdxl": "unet"}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_adapter_resolves_structure(family):
    pipe = tiny.build(family)
    adapter = adapter_for(pipe)
    assert adapter.name == TINY_TO_ADAPTER.get(family, family)
    denoisers = adapter.denoisers(pipe)
    assert list(denoisers) == (["transformer", "transformer_2"] if family == "wan2.2" else [adapter.denoiser_attrs[0]])
    for model in denoisers.values():
        blocks = adapter.blocks(model)
        assert len(blocks) >= 2
        assert [block.index for block in blocks] == list(range(len(blocks)))
        for block in blocks:
            assert block.attentions, block.name
            assert "ff" in block.branches, block.name
            for kind, (name, module) in block.branches.items():
                assert dict(model.named_modules())[name] is module
                if kind in ATTENTION_BRANCHES:
                    assert hasattr(module, "processor"), name
        assert adapter.modulation_layers(model), "no time-embedding / modulation layer found"


def test_dual_stream_and_branch_kinds():
    flux = adapter_for(tiny.build("flux")).blocks(tiny.build("flux").transformer)
    assert flux[0].dual_stream and set(flux[0].branches) == {"joint_attn", "ff", "ff_context"}
    assert not flux[-1].dual_stream and set(flux[-1].branches) == {"joint_attn", "ff"}
    pixart = tiny.build("pixart-alpha")
    assert set(adapter_for(pixart).blocks(pixart.transformer)[0].branches) == {"self_attn", "cross_attn", "ff"}


def test_pixart_alpha_and_sigma_share_a_class_but_not_a_family():
    assert adapter_for(tiny.build("pixart-alpha")).name == "pixart-alpha"
    assert adapter_for(tiny.build("pixart-sigma")).name == "pixart-sigma"


def test_unknown_classes_get_clear_errors():
    with pytest.raises(ValueError, match="no adapter for the denoiser class 'Linear'.*DiTTransformer2DModel"):
        adapter_for_model(torch.nn.Linear(2, 2))

    class NoDenoiser:
        pass

    with pytest.raises(ValueError, match="no `transformer` or `unet`"):
        adapter_for(NoDenoiser())
    with pytest.raises(ValueError, match="known families: dit"):
        get_adapter("sdxxl")
    assert set(FAMILY_NAMES) >= {"dit", "flux", "wan", "unet"}


def test_token_layout_slices():
    first = TokenLayout(2, 3, 4, text_tokens=5, text_position="first")
    last = TokenLayout(2, 3, 4, text_tokens=5, text_position="last")
    cross = TokenLayout(2, 3, 4, text_tokens=5)
    assert first.image_tokens == 24 and first.joint_tokens == 29 and cross.joint_tokens == 24
    assert first.image_slice() == slice(5, 29) and last.image_slice() == slice(0, 24)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_declared_block_streams_match_what_blocks_take_and_return(family):
    pipe = tiny.build(family)
    adapter = adapter_for(pipe)
    seen = []
    handles = []
    for model in adapter.denoisers(pipe).values():
        for block in adapter.blocks(model):
            def record(module, args, kwargs, output, block=block):
                seen.append((block, args, kwargs, output))

            handles.append(block.module.register_forward_hook(record, with_kwargs=True))
    pipe(**tiny.example_inputs(family, num_inference_steps=1))
    for handle in handles:
        handle.remove()
    assert seen
    for block, args, kwargs, output in seen:
        hidden_in, context_in = block.streams_in(args, kwargs)
        hidden_out, context_out = block.streams_out(output)
        assert hidden_out.shape == hidden_in.shape, block.name
        if block.returns == "hidden":
            assert isinstance(output, torch.Tensor) and context_in is None and context_out is None
        else:
            assert context_in is not None and context_in.shape[0] == hidden_in.shape[0], block.name
            assert context_out is None or context_out.shape == context_in.shape, block.name
            rebuilt = block.make_output(hidden_out, context_out)
            assert type(rebuilt) is type(output) and all(a is b for a, b in zip(rebuilt, output)), block.name


CONCATENATED_FAMILIES = tuple(family for family in tiny.FAMILIES if family in FAMILY_NAMES
                              and any(group.concatenated for group in get_adapter(family).block_groups))


@pytest.mark.parametrize("family", CONCATENATED_FAMILIES)
def test_concatenated_blocks_split_into_the_previous_blocks_streams(family):
    # The first block of a `concatenated` group takes cat(text, image) of the last dual-stream block's output.
    pipe = tiny.build(family)
    adapter = adapter_for(pipe)
    model = pipe.transformer
    blocks = adapter.blocks(model)
    first = next(block for block in blocks if block.concatenated)
    before = blocks[first.index - 1]
    seen = {}
    handles = [
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.setdefault("call", (args, kwargs)),
                                        with_kwargs=True),
        before.module.register_forward_hook(lambda m, args, kwargs, out: seen.setdefault("before", out),
                                            with_kwargs=True),
        first.module.register_forward_pre_hook(lambda m, args, kwargs: seen.setdefault("first", (args, kwargs)),
                                               with_kwargs=True),
    ]
    pipe(**tiny.example_inputs(family, num_inference_steps=1))
    for handle in handles:
        handle.remove()
    layout = adapter.token_layout(model, *seen["call"])
    image, text = first.split_concatenated(first.streams_in(*seen["first"])[0], layout)
    image_before, text_before = before.streams_out(seen["before"])
    assert torch.equal(image, image_before) and torch.equal(text, text_before)
    with pytest.raises(ValueError, match="concatenated"):
        before.split_concatenated(image_before, layout)


def _record_blocks_and_branches(pipe, adapter, call):
    """Run ``call()``; return (block, args, kwargs, output, {branch kind: output}) for every block forward."""
    seen, handles = [], []
    for model in adapter.denoisers(pipe).values():
        for block in adapter.blocks(model):
            def start(module, args, kwargs, block=block):
                seen.append([block, args, kwargs, None, {}])

            def finish(module, args, kwargs, output):
                seen[-1][3] = output

            handles.append(block.module.register_forward_pre_hook(start, with_kwargs=True))
            handles.append(block.module.register_forward_hook(finish, with_kwargs=True))
            for kind, (_, branch) in block.branches.items():
                def branch_output(module, args, output, kind=kind):
                    seen[-1][4][kind] = output

                handles.append(branch.register_forward_hook(branch_output))
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return seen


RULED_FAMILIES = ("dit", "pixart-alpha", "pixart-sigma", "wan", "wan2.2", "sd15", "sdxl", "skyreels-v2", "ltx-video",
                  "allegro")


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_residual_rules_rebuild_block_outputs_bit_for_bit(family):
    """A block's output is its input plus its branch outputs under the step's gates, by the same arithmetic."""
    pipe = tiny.build(family)
    adapter = adapter_for(pipe)
    ruled = [block for model in adapter.denoisers(pipe).values() for block in adapter.blocks(model)
             if block.residual_rule is not None]
    assert bool(ruled) == (family in RULED_FAMILIES)
    if not ruled:
        return
    inputs = tiny.example_inputs(family, num_inference_steps=2)
    seen = _record_blocks_and_branches(pipe, adapter, lambda: pipe(**inputs))
    assert seen
    for block, args, kwargs, output, branches in seen:
        assert set(branches) == set(block.branches), block.name
        assert block.residual_rule.covers(block.module, args, kwargs), block.name
        torch.testing.assert_close(block.residual_rule.combine(block.module, args, kwargs, branches), output,
                                   rtol=0, atol=0, msg=block.name)


def test_wan_rule_takes_per_token_modulation():
    """Wan 2.2 TI2V modulates per token: temb is [batch, tokens, 6, dim]."""
    pipe = tiny.build("wan")
    adapter = adapter_for(pipe)
    inputs = tiny.example_inputs("wan", num_inference_steps=1)
    seen = _record_blocks_and_branches(pipe, adapter, lambda: pipe(**inputs))
    block, args, kwargs = seen[0][:3]
    hidden, context, temb, rotary = args
    per_token = temb[:, None].expand(-1, hidden.shape[1], -1, -1) + 0.1 * torch.randn(
        hidden.shape[0], hidden.shape[1], *temb.shape[1:], generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        [(block, args, kwargs, output, branches)] = _record_blocks_and_branches(
            pipe, adapter, lambda: block.module(hidden, context, per_token, rotary)
        )
    torch.testing.assert_close(block.residual_rule.combine(block.module, args, kwargs, branches), output,
                               rtol=0, atol=0)
