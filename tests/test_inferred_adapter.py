"""The structural fallback on a denoiser defined here, not in diffusers: inferred blocks and branches, the methods
that need only those, the refusals, and the first-call check."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention

import accel
from accel.config import AccelConfig
from accel.eval.metrics import output_array
from accel.methods.adaspa import AdaSpaConfig
from accel.methods.bac import BACConfig
from accel.methods.delta_dit import DeltaDiTConfig
from accel.methods.vmoba import VMoBAConfig
from accel.pipelines.adapters import adapter_for


class ToyBlock(torch.nn.Module):
    def __init__(self, dim: int, heads: int, returns_pair: bool = False) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=dim // heads)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.time = torch.nn.Linear(dim, dim)
        self.returns_pair = returns_pair

    def forward(self, hidden_states, temb):
        hidden = hidden_states + self.time(temb)[:, None]
        hidden = hidden + self.attn1(self.norm1(hidden))
        hidden = hidden + self.ff(self.norm2(hidden))
        return (hidden, temb) if self.returns_pair else hidden


class ToyDenoiser(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, num_layers: int = 3,
                 returns_pair: bool = False) -> None:
        super().__init__()
        self.proj_in = torch.nn.Linear(channels, dim)
        self.time_embed = torch.nn.Linear(1, dim)
        self.layers = torch.nn.ModuleList([ToyBlock(dim, heads, returns_pair) for _ in range(num_layers)])
        self.proj_out = torch.nn.Linear(dim, channels)

    def forward(self, hidden_states, timestep, return_dict: bool = False):
        batch, channels, height, width = hidden_states.shape
        tokens = self.proj_in(hidden_states.flatten(2).transpose(1, 2))
        temb = self.time_embed(timestep.float().view(-1, 1).expand(batch, 1) / 1000)
        for layer in self.layers:
            tokens = layer(tokens, temb)
            tokens = tokens[0] if isinstance(tokens, tuple) else tokens
        return (self.proj_out(tokens).transpose(1, 2).reshape(batch, channels, height, width),)


class ToyMLPDenoiser(ToyDenoiser):
    """Blocks without attention: nothing for the fallback to find."""

    @register_to_config
    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, num_layers: int = 3,
                 returns_pair: bool = False) -> None:
        super().__init__(channels, dim, heads, num_layers, returns_pair)
        for layer in self.layers:
            layer.attn1 = torch.nn.Identity()


class ToyPipeline(DiffusionPipeline):
    def __init__(self, transformer, scheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 4, generator=None, output_type: str = "np"):
        latents = torch.randn((batch_size, 4, 8, 8), generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            noise = self.transformer(latents, t.expand(batch_size))[0]
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return ImagePipelineOutput(images=(latents.clamp(-1, 1) * 0.5 + 0.5).permute(0, 2, 3, 1).numpy())


def build(denoiser_class=ToyDenoiser, **config) -> ToyPipeline:
    torch.manual_seed(0)
    return ToyPipeline(denoiser_class(**config).eval(), DDIMScheduler())


def run(pipe, **kwargs) -> np.ndarray:
    return output_array(pipe(generator=torch.Generator().manual_seed(0), **kwargs))


def test_the_blocks_and_branches_are_found_and_the_inference_is_logged(caplog):
    class FreshDenoiser(ToyDenoiser):  # a class no test inferred before: its inference is logged
        pass

    with caplog.at_level(logging.WARNING):
        adapter = adapter_for(build(FreshDenoiser))
    assert adapter.inferred and adapter.name == "inferred:FreshDenoiser"
    assert "no adapter is declared for FreshDenoiser; inferred one from its module tree: blocks layers.*" \
        in caplog.text
    blocks = adapter.blocks(build().transformer)
    assert [block.name for block in blocks] == ["layers.0", "layers.1", "layers.2"]
    assert {kind: name for kind, (name, _) in blocks[0].branches.items()} == {"self_attn": "layers.0.attn1",
                                                                                "ff": "layers.0.ff"}


@pytest.mark.parametrize(("config", "figure"), [
    (DeltaDiTConfig(interval=2, boundary=0.5, cached_fraction=0.67), "blocks_computed_share"),
    (BACConfig(budget=0.5, calibrate=False), "branches_computed_share"),
    (AdaSpaConfig(sparsity=0.5, block_size=16), "attention_density"),
    (VMoBAConfig(block_size=16, dense_above=1.0), None),
])
def test_the_structural_methods_work_and_unwrap_restores(config, figure):
    pipe = build()
    plain = run(pipe)
    accel.wrap(pipe, config)
    output = run(pipe)
    assert np.isfinite(output).all()
    np.testing.assert_array_equal(run(pipe), output)
    if figure is not None:
        assert getattr(accel.summary(pipe), figure) < 1
    accel.unwrap(pipe)
    np.testing.assert_array_equal(run(pipe), plain)


def test_the_inferred_pipeline_compiles_below_the_hooks():
    eager = run(accel.wrap(build(), DeltaDiTConfig(interval=2, boundary=0.5, cached_fraction=0.67)))
    pipe = accel.wrap(build(), DeltaDiTConfig(interval=2, boundary=0.5, cached_fraction=0.67))
    pipe.transformer.compile(backend="aot_eager")
    np.testing.assert_allclose(run(pipe), eager, atol=1e-5)
    torch._dynamo.reset()


@dataclasses.dataclass
class DiTOnlyConfig(AccelConfig):
    method = "dit-only-toy"


def test_a_method_that_needs_a_declared_adapter_is_refused_by_name():
    accel.register_accelerator(DiTOnlyConfig, lambda scope, config: None, description="toy", families=("dit",))
    try:
        pipe = build()
        with pytest.raises(ValueError, match="'dit-only-toy' needs a declared adapter; accel inferred "
                                             "'inferred:ToyDenoiser' .* accept: adaspa, bac, delta-dit, vmoba"):
            accel.wrap(pipe, DiTOnlyConfig())
        assert not accel.is_wrapped(pipe)
    finally:
        accel.unregister_accelerator(DiTOnlyConfig)


def test_a_tree_without_attention_blocks_is_refused_naming_what_is_missing():
    missing = "no adapter for the denoiser class 'ToyMLPDenoiser' and could not infer one: it holds no nn.ModuleList"
    with pytest.raises(ValueError, match=missing):
        accel.wrap(build(ToyMLPDenoiser), "delta-dit")


def test_blocks_that_do_not_return_their_hidden_states_fail_the_first_call_and_every_later_one():
    pipe = build(returns_pair=True)
    plain = run(pipe)
    accel.wrap(pipe, DeltaDiTConfig(interval=2, boundary=0.5, cached_fraction=0.67))
    for _ in range(2):
        with pytest.raises(ValueError, match="layers.0 returned tuple for hidden_states of shape"):
            run(pipe)
    accel.unwrap(pipe)
    np.testing.assert_array_equal(run(pipe), plain)


def test_available_says_which_methods_take_inferred_adapters():
    adapter_for(build())
    entries = {entry["name"]: entry for entry in accel.available()}
    assert {name for name, entry in entries.items() if entry["structural_fallback"]} == {
        "adaspa", "bac", "delta-dit", "vmoba"}
    assert "inferred:ToyDenoiser" in entries["bac"]["inferred_families"]
    assert entries["quest"]["inferred_families"] == []
