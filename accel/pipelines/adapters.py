"""Model-family adapters: everything accel knows about the layout of a diffusers denoiser.

One declarative ``FamilyAdapter`` per family says where the transformer blocks are, which sub-modules of a block
are its *branches* (self/joint attention, cross-attention, feed-forward, context feed-forward), which layers carry
the time embedding / AdaLN modulation, how classifier-free guidance reaches the denoiser, and how the input shape
maps to a token layout (frames x height x width after patching, plus where text tokens sit in joint attention).
Accelerators read these facts through the adapter and never name a model's modules themselves.

Adding a family is one ``FamilyAdapter(...)`` entry here plus a tiny builder in ``accel.pipelines.tiny``. A denoiser
no entry declares gets an adapter inferred from its module tree (``infer_adapter``, the structural fallback at the
end of this file), which the methods registered with ``structural=True`` accept.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

# "linear_attn" is attention without a softmax (Sana's ReLU linear attention): it makes no
# F.scaled_dot_product_attention call, so it is a branch like any other (cached, counted as a branch) but not one of
# the attention branches that accel intercepts and counts as attention.
BranchKind = Literal["self_attn", "cross_attn", "joint_attn", "linear_attn", "ff", "ff_context"]
ATTENTION_BRANCHES: frozenset[str] = frozenset({"self_attn", "cross_attn", "joint_attn"})


@dataclass(frozen=True)
class TokenLayout:
    """The token sequence one transformer forward works on, after patching.

    Image tokens are ordered frame-major (frame, row, column). ``text_tokens`` is the length of the text sequence
    the model attends to. In joint attention the text tokens are concatenated with the image tokens and
    ``text_position`` says on which side; ``None`` means the text is reached through cross-attention only.
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: Literal["first", "last"] | None = None

    @property
    def image_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def joint_tokens(self) -> int:
        return self.image_tokens + (self.text_tokens if self.text_position else 0)

    def image_slice(self) -> slice:
        """Where the image tokens sit in the joint-attention sequence."""
        start = self.text_tokens if self.text_position == "first" else 0
        return slice(start, start + self.image_tokens)


BlockReturns = Literal["hidden", "context_hidden", "hidden_context"]


@dataclass(frozen=True)
class ResidualRule:
    """How a block's output follows from its branches' outputs, for a block none of whose branches runs.

    A block adds each branch's output, times that branch's gate for the current step, to its residual stream. When a
    cache reuses every branch of a block, that sum is all the block has left to compute: its norms and the input
    modulation only feed the branches. ``combine(block, args, kwargs, outputs)`` returns the block's output from
    ``outputs`` (branch kind -> output, every branch of the block) with the operations of the block's own forward, in
    its order, so the result is bit-identical to running the block with those branch outputs. ``owned`` names the
    branches whose output tensors were made for this call alone (a forecast, say): the rule may compute in them in
    place, which spares a pass over memory; the others (a cache's held tensors) it leaves untouched. ``covers(block,
    args, kwargs)`` says whether this call is one the rule reproduces; when it is not, the block runs.

    Each branch's input has the shape of the block's ``hidden_states`` in the blocks a rule is written for.
    """

    covers: Callable[[torch.nn.Module, tuple, dict], bool]
    combine: Callable[[torch.nn.Module, tuple, dict, dict[str, torch.Tensor], frozenset[str]], torch.Tensor]


@dataclass(frozen=True)
class BlockGroup:
    """A run of transformer blocks matched by ``pattern`` (``*`` matches one dotted name segment).

    ``branches`` maps a branch kind to the attribute that holds it inside one block. ``returns`` says what a block
    returns: the image stream alone, or a (text/context stream, image stream) pair in either order. Blocks that
    return a pair take ``hidden_states`` and ``encoder_hidden_states`` as their first two arguments.

    ``concatenated`` marks blocks whose one ``hidden_states`` is the text and image streams concatenated (text on
    that side, as the token layout's ``text_position``), as the single-stream blocks of AuraFlow and Chroma take and
    return it after dual-stream blocks that keep the two apart. Such a block's streams are not the previous group's:
    its input is ``cat(text, image)`` of their output, and only the forward's token layout (``split_concatenated``)
    tells the two apart; a method that carries streams across the group boundary must split there.
    """

    pattern: str
    branches: dict[str, str]
    dual_stream: bool = False  # the block updates image and text streams with separate weights (MMDiT double)
    returns: BlockReturns = "hidden"
    residual_rule: ResidualRule | None = None  # None: every forward of the block runs the block
    concatenated: Literal["first", "last"] | None = None  # hidden_states is cat(text, image) (see above)
    # Branch kinds that are no branch of the group's last block: the model discards what they feed there (the
    # context stream after the last block), so removing or caching them changes nothing.
    discarded_in_last: tuple[str, ...] = ()
    count_key: str = "num_layers"  # the config key that counts this group's blocks (pruning rewrites it)


@dataclass(frozen=True)
class BlockInfo:
    """One resolved block of a concrete model."""

    name: str
    module: torch.nn.Module
    group: str
    index: int  # position in the whole ordered block sequence
    branches: dict[str, tuple[str, torch.nn.Module]]  # kind -> (qualified name, module)
    dual_stream: bool
    returns: BlockReturns = "hidden"
    residual_rule: ResidualRule | None = None
    concatenated: Literal["first", "last"] | None = None  # see BlockGroup

    def split_concatenated(self, stream: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens, text tokens) of a ``concatenated`` block's ``hidden_states`` or output, by the forward's
        token layout."""
        if self.concatenated is None or stream.shape[1] != layout.joint_tokens:
            raise ValueError(f"{self.name} does not take the concatenated text + image stream of this layout.")
        image = layout.image_slice()
        text = slice(0, image.start) if self.concatenated == "first" else slice(image.stop, stream.shape[1])
        return stream[:, image], stream[:, text]

    def streams_in(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image stream, context stream or None) of this block's call arguments."""
        hidden = _arg(args, kwargs, "hidden_states", 0)
        if self.returns == "hidden":
            return hidden, None
        return hidden, _arg(args, kwargs, "encoder_hidden_states", 1)

    def streams_out(self, output) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image stream, context stream or None) of this block's output."""
        if self.returns == "hidden":
            return output, None
        first, second = output
        return (second, first) if self.returns == "context_hidden" else (first, second)

    def with_streams_in(self, args: tuple, kwargs: dict, hidden: torch.Tensor,
                        context: torch.Tensor | None) -> tuple[tuple, dict]:
        """This block's call arguments with its input streams replaced (the context stream only for a block that
        returns it, and only when ``context`` is given): the inverse of ``streams_in``."""
        args, kwargs = list(args), dict(kwargs)
        replaced = [("hidden_states", 0, hidden)]
        if self.returns != "hidden" and context is not None:
            replaced.append(("encoder_hidden_states", 1, context))
        for name, position, value in replaced:
            if name in kwargs or len(args) <= position:
                kwargs[name] = value
            else:
                args[position] = value
        return tuple(args), kwargs

    def make_output(self, hidden: torch.Tensor, context: torch.Tensor | None):
        """A block output with the given streams, in this block's return layout."""
        if self.returns == "hidden":
            return hidden
        return (context, hidden) if self.returns == "context_hidden" else (hidden, context)

    @property
    def attentions(self) -> dict[str, tuple[str, torch.nn.Module]]:
        return {kind: value for kind, value in self.branches.items() if kind in ATTENTION_BRANCHES}


def _arg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _patch_size(value: Any) -> tuple[int, int, int]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)  # type: ignore[return-value]
    return 1, int(value), int(value)


def _image_layout(model, args, kwargs, text_position=None) -> TokenLayout:
    hidden_states = _arg(args, kwargs, "hidden_states", 0)
    patch = int(getattr(model.config, "patch_size", None) or 1)
    text = _arg(args, kwargs, "encoder_hidden_states", 1)
    height, width = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
    text_tokens = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else 0
    return TokenLayout(1, height, width, text_tokens, text_position if text_tokens else None)


def _flux_layout(model, args, kwargs) -> TokenLayout:
    # Flux packs latents into [B, S, C]; the image ids hold each token's (frame, row, column).
    img_ids = kwargs["img_ids"]
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    height, width = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1
    text = _arg(args, kwargs, "encoder_hidden_states", 1)
    return TokenLayout(1, height, width, int(text.shape[1]), "first")


def _video_layout(channels_first: bool, text_position=None):
    def layout(model, args, kwargs) -> TokenLayout:
        hidden_states = _arg(args, kwargs, "hidden_states", 0)
        if channels_first:  # [B, C, F, H, W]
            frames, height, width = hidden_states.shape[2:]
        else:  # CogVideoX: [B, F, C, H, W]
            frames, height, width = hidden_states.shape[1], *hidden_states.shape[3:]
        config = model.config
        if hasattr(config, "patch_size_t"):
            p_t, p_h, p_w = int(config.patch_size_t or 1), int(config.patch_size), int(config.patch_size)
        else:
            p_t, p_h, p_w = _patch_size(config.patch_size)
        text = _arg(args, kwargs, "encoder_hidden_states", 1)
        text_tokens = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else 0
        position = text_position if text_tokens else None
        return TokenLayout(frames // p_t, height // p_h, width // p_w, text_tokens, position)

    return layout


def _ltx_layout(model, args, kwargs) -> TokenLayout:
    # LTX packs latents into [B, S, C] (frame-major) and passes the latent grid as num_frames / height / width.
    hidden_states = _arg(args, kwargs, "hidden_states", 0)
    text = _arg(args, kwargs, "encoder_hidden_states", 1)
    text_tokens = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else 0
    grid = [kwargs.get(name) for name in ("num_frames", "height", "width")]
    if any(value is None for value in grid):  # called with video_coords only: one row of tokens
        return TokenLayout(1, 1, int(hidden_states.shape[1]), text_tokens)
    p_t, p = int(model.config.patch_size_t or 1), int(model.config.patch_size or 1)
    return TokenLayout(int(grid[0]) // p_t, int(grid[1]) // p, int(grid[2]) // p, text_tokens)


def _allegro_layout(model, args, kwargs) -> TokenLayout:
    # AllegroPipeline passes the text as [B, 1, S, D] (the transformer flattens it to [B, S, D] for the blocks).
    layout = _video_layout(channels_first=True)(model, args, kwargs)
    text = _arg(args, kwargs, "encoder_hidden_states", 1)
    if isinstance(text, torch.Tensor) and text.ndim == 4:
        return TokenLayout(layout.frames, layout.height, layout.width, int(text.shape[-2]))
    return layout


def _lumina2_layout(model, args, kwargs) -> TokenLayout:
    # The joint blocks see [text, image] with each sample's text cut to its unpadded length (the mask's sum); where
    # the samples' lengths differ the model pads the joint sequence and passes an attention mask.
    layout = _image_layout(model, args, kwargs, text_position="first")
    mask = _arg(args, kwargs, "encoder_attention_mask", 3)
    if isinstance(mask, torch.Tensor) and layout.text_tokens:
        layout = TokenLayout(1, layout.height, layout.width, int(mask.sum(dim=1).max()), "first")
    return layout


def _aura_flow_layout(model, args, kwargs) -> TokenLayout:
    # AuraFlow prepends its learned register tokens to the projected text: joint attention sees [registers, text,
    # image], so the registers count as text tokens.
    layout = _image_layout(model, args, kwargs, text_position="first")
    registers = int(model.register_tokens.shape[1])
    return TokenLayout(1, layout.height, layout.width, layout.text_tokens + registers, "first")


def _qwen_image_layout(model, args, kwargs) -> TokenLayout:
    # QwenImage packs latents into [B, S, C]; img_shapes holds each sample's (frames, rows, columns) of tokens.
    frames, height, width = kwargs["img_shapes"][0][0]
    text = _arg(args, kwargs, "encoder_hidden_states", 1)
    return TokenLayout(int(frames), int(height), int(width), int(text.shape[1]), "first")


def _unet_layout(model, args, kwargs) -> TokenLayout:
    sample = _arg(args, kwargs, "sample", 0)
    text = _arg(args, kwargs, "encoder_hidden_states", 2)
    return TokenLayout(1, sample.shape[-2], sample.shape[-1], int(text.shape[1]) if text is not None else 0, None)


@dataclass(frozen=True)
class FamilyAdapter:
    """What accel needs to know about one model family. See the module docstring."""

    name: str
    denoiser_classes: tuple[str, ...]
    pipeline_classes: tuple[str, ...]
    block_groups: tuple[BlockGroup, ...]
    modulation: tuple[str, ...]  # fnmatch patterns over the denoiser's module names
    token_layout: Callable[[torch.nn.Module, tuple, dict], TokenLayout]
    cfg: Literal["batched", "separate"]
    cfg_batch_order: tuple[str, str] | None = None  # batched CFG: which half of the batch is which
    # Separate CFG in a pipeline that names no cache_context: the branch of each denoiser call of a step, in order.
    cfg_call_order: tuple[str, ...] = ("cond", "uncond")
    # The pipeline's cache_context names that are not accel's branch names (a diffusers guider's "pred_cond").
    context_branches: tuple[tuple[str, str], ...] = ()
    video: bool = False
    conditioning: Literal["prompt", "class"] = "prompt"  # what the pipeline is called with
    denoiser_attrs: tuple[str, ...] = ("transformer", "transformer_2")
    # Whether the blocks form one residual chain (each block's output is the next one's input). The U-Net's
    # transformer blocks do not: resnets and resampling sit between them.
    sequential_blocks: bool = True
    notes: str = ""
    # The pipeline masks every attention call (Chroma: its text mask, as a float tensor SDPA adds to the scores), so
    # calls that must stay exact where masked stay dense.
    attention_always_masked: bool = False
    inferred: bool = False  # made by infer_adapter from the module tree, not declared (see the structural fallback)

    def blocks(self, model: torch.nn.Module) -> list[BlockInfo]:
        """The model's blocks in execution order, each with its branches."""
        modules = dict(model.named_modules())
        blocks: list[BlockInfo] = []
        for group in self.block_groups:
            names = _match(group.pattern, modules)
            for position, name in enumerate(names):
                branches = {}
                for kind, attr in group.branches.items():
                    if position == len(names) - 1 and kind in group.discarded_in_last:
                        continue
                    branch = modules.get(f"{name}.{attr}")
                    if branch is not None:
                        branches[kind] = (f"{name}.{attr}", branch)
                info = BlockInfo(
                    name, modules[name], group.pattern, len(blocks), branches, group.dual_stream, group.returns,
                    group.residual_rule, group.concatenated,
                )
                blocks.append(info)
        return blocks

    def modulation_layers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Time-embedding and AdaLN-modulation layers (module or parameter holders), in module order."""
        return [
            (name, module)
            for name, module in model.named_modules()
            if name and any(fnmatch.fnmatchcase(name, pattern) for pattern in self.modulation)
        ]

    def denoisers(self, pipe) -> dict[str, torch.nn.Module]:
        """The pipeline's denoiser modules of this family, by attribute name."""
        found = {}
        for attr in self.denoiser_attrs:
            module = getattr(pipe, attr, None)
            if isinstance(module, torch.nn.Module) and type(module).__name__ in self.denoiser_classes:
                found[attr] = module
        return found


def ready_for_inference(pipe):
    """Every torch module of ``pipe`` in eval mode (diffusers builds models from configs in train mode) and the
    progress bar off; returns ``pipe``."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _match(pattern: str, modules: dict[str, torch.nn.Module]) -> list[str]:
    """Module names matching ``pattern`` segment by segment, in module (execution) order."""
    parts = pattern.split(".")
    return [
        name
        for name in modules
        if len(name.split(".")) == len(parts)
        and all(p == "*" or p == s for p, s in zip(parts, name.split(".")))
    ]


# ----------------------------------------------------------------------------------------- residual rules
# Each mirrors the output arithmetic of one diffusers block class (diffusers 0.42); tests/test_bac.py checks them
# bit for bit against the blocks themselves on every family that uses them.

_GATED_NORMS = ("ada_norm_zero", "ada_norm_single")
_UNGATED_NORMS = ("layer_norm", "layer_norm_i2vgen")


def _basic_block_covers(block, args, kwargs) -> bool:
    """BasicTransformerBlock (DiT, PixArt, the U-Net's attentions) with AdaLN-Zero, AdaLN-single or plain norms."""
    hidden = _arg(args, kwargs, "hidden_states", 0)
    cross_attention_kwargs = _arg(args, kwargs, "cross_attention_kwargs", 5) or {}
    if block.norm_type == "ada_norm_zero" and block.norm1.emb is None:
        return False
    return (
        block.norm_type in _GATED_NORMS + _UNGATED_NORMS
        and hidden.ndim == 3
        and cross_attention_kwargs.get("gligen") is None
    )


def _basic_block_combine(block, args, kwargs, outputs: dict[str, torch.Tensor],
                         owned: frozenset[str] = frozenset()) -> torch.Tensor:
    hidden = _arg(args, kwargs, "hidden_states", 0)
    timestep = _arg(args, kwargs, "timestep", 4)
    gate_msa = gate_mlp = None
    if block.norm_type == "ada_norm_zero":  # AdaLayerNormZero.forward, less its norm and modulation
        norm = block.norm1
        emb = norm.emb(timestep, _arg(args, kwargs, "class_labels", 6), hidden_dtype=hidden.dtype)
        chunks = norm.linear(norm.silu(emb)).chunk(6, dim=1)
        gate_msa, gate_mlp = chunks[2].unsqueeze(1), chunks[5].unsqueeze(1)
    elif block.norm_type == "ada_norm_single":
        chunks = (block.scale_shift_table[None] + timestep.reshape(hidden.shape[0], 6, -1)).chunk(6, dim=1)
        gate_msa, gate_mlp = chunks[2], chunks[5]
    # Products and sums land in place in tensors made here or owned, never in a cached branch output; a * b is b * a
    # and a + b is b + a bit for bit, so the result is the block's own. In place, a skipped block whose branches are
    # forecast allocates no tensor beyond the forecasts, and a plainly reused one two instead of four.
    attn_output = _gated(outputs["self_attn"], gate_msa, "self_attn" in owned)
    hidden = _add(attn_output, hidden, fresh=gate_msa is not None or "self_attn" in owned)
    if "cross_attn" in outputs:
        hidden = _add(hidden, outputs["cross_attn"], fresh=True)
    ff_output = _gated(outputs["ff"], gate_mlp, "ff" in owned)
    return _add(ff_output, hidden, fresh=gate_mlp is not None or "ff" in owned)


def _gated(output: torch.Tensor, gate: torch.Tensor | None, owned: bool) -> torch.Tensor:
    """``gate * output`` (``output`` without a gate), in place when ``output`` is owned and keeps its layout."""
    if gate is None:
        return output
    if (owned and torch.broadcast_shapes(gate.shape, output.shape) == output.shape and gate.dtype == output.dtype
            and not output.requires_grad):
        return output.mul_(gate)
    return gate * output


def _add(made_here: torch.Tensor, other: torch.Tensor, fresh: bool) -> torch.Tensor:
    """``made_here + other``, in place when ``made_here`` is a tensor this rule made and the sum keeps its layout."""
    if fresh and made_here.shape == other.shape and made_here.dtype == other.dtype and not made_here.requires_grad:
        return made_here.add_(other)
    return made_here + other


def _wan_block_combine(block, args, kwargs, outputs: dict[str, torch.Tensor],
                       owned: frozenset[str] = frozenset()) -> torch.Tensor:
    hidden = _arg(args, kwargs, "hidden_states", 0)
    temb = _arg(args, kwargs, "temb", 2)
    if temb.ndim == 4:  # Wan 2.2 TI2V: per-token modulation
        chunks = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        gate_msa, c_gate_msa = chunks[2].squeeze(2), chunks[5].squeeze(2)
    else:
        chunks = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        gate_msa, c_gate_msa = chunks[2], chunks[5]
    hidden = (hidden.float() + outputs["self_attn"] * gate_msa).type_as(hidden)
    hidden = hidden + outputs["cross_attn"]
    return (hidden.float() + outputs["ff"].float() * c_gate_msa).type_as(hidden)


def _ltx_block_combine(block, args, kwargs, outputs: dict[str, torch.Tensor],
                       owned: frozenset[str] = frozenset()) -> torch.Tensor:
    hidden = _arg(args, kwargs, "hidden_states", 0)
    temb = _arg(args, kwargs, "temb", 2)
    num_ada_params = block.scale_shift_table.shape[0]
    ada_values = block.scale_shift_table[None, None].to(temb.device) + temb.reshape(
        hidden.size(0), temb.size(1), num_ada_params, -1
    )
    gate_msa, gate_mlp = ada_values.unbind(dim=2)[2::3]
    hidden = hidden + outputs["self_attn"] * gate_msa
    hidden = hidden + outputs["cross_attn"]
    return hidden + outputs["ff"] * gate_mlp


def _allegro_block_combine(block, args, kwargs, outputs: dict[str, torch.Tensor],
                           owned: frozenset[str] = frozenset()) -> torch.Tensor:
    hidden = _arg(args, kwargs, "hidden_states", 0)
    temb = _arg(args, kwargs, "temb", 2)
    chunks = (block.scale_shift_table[None] + temb.reshape(hidden.shape[0], 6, -1)).chunk(6, dim=1)
    hidden = chunks[2] * outputs["self_attn"] + hidden
    if "cross_attn" in outputs:
        hidden = outputs["cross_attn"] + hidden
    return chunks[5] * outputs["ff"] + hidden


BASIC_BLOCK_RULE = ResidualRule(_basic_block_covers, _basic_block_combine)
ALLEGRO_BLOCK_RULE = ResidualRule(lambda block, args, kwargs: _arg(args, kwargs, "hidden_states", 0).ndim == 3,
                                  _allegro_block_combine)
LTX_BLOCK_RULE = ResidualRule(lambda block, args, kwargs: True, _ltx_block_combine)
WAN_BLOCK_RULE = ResidualRule(lambda block, args, kwargs: True, _wan_block_combine)
# SkyReels-V2's block is Wan's, but its 4-D temb (diffusion forcing) is laid out [batch, 6, tokens, dim], not Wan
# 2.2's [batch, tokens, 6, dim]: the rule covers the per-sample modulation of the text-to-video pipeline only.
SKYREELS_BLOCK_RULE = ResidualRule(lambda block, args, kwargs: _arg(args, kwargs, "temb", 2).ndim == 3,
                                   _wan_block_combine)

_DIT_BRANCHES = {"self_attn": "attn1", "cross_attn": "attn2", "ff": "ff"}
_MMDIT_BRANCHES = {"joint_attn": "attn", "ff": "ff", "ff_context": "ff_context"}
_SINGLE_STREAM_BRANCHES = {"joint_attn": "attn", "ff": "proj_mlp"}

ADAPTERS: tuple[FamilyAdapter, ...] = (
    FamilyAdapter(
        name="dit",
        denoiser_classes=("DiTTransformer2DModel",),
        pipeline_classes=("DiTPipeline",),
        block_groups=(BlockGroup("transformer_blocks.*", _DIT_BRANCHES, residual_rule=BASIC_BLOCK_RULE),),
        modulation=("transformer_blocks.*.norm1", "transformer_blocks.*.norm1.*", "proj_out_1"),
        token_layout=_image_layout,
        cfg="batched",
        cfg_batch_order=("cond", "uncond"),
        conditioning="class",
        notes="Each block's AdaLayerNormZero holds its own timestep + class embedder.",
    ),
    FamilyAdapter(
        name="pixart-alpha",
        denoiser_classes=("PixArtTransformer2DModel",),
        pipeline_classes=("PixArtAlphaPipeline",),
        block_groups=(BlockGroup("transformer_blocks.*", _DIT_BRANCHES, residual_rule=BASIC_BLOCK_RULE),),
        modulation=("adaln_single", "adaln_single.*"),
        token_layout=_image_layout,
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        notes="AdaLN-single: one shared modulation MLP plus a per-block scale_shift_table parameter.",
    ),
    FamilyAdapter(
        name="pixart-sigma",
        denoiser_classes=("PixArtTransformer2DModel",),
        pipeline_classes=("PixArtSigmaPipeline",),
        block_groups=(BlockGroup("transformer_blocks.*", _DIT_BRANCHES, residual_rule=BASIC_BLOCK_RULE),),
        modulation=("adaln_single", "adaln_single.*"),
        token_layout=_image_layout,
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
    ),
    FamilyAdapter(
        name="sd3",
        denoiser_classes=("SD3Transformer2DModel",),
        pipeline_classes=("StableDiffusion3Pipeline",),
        block_groups=(
            BlockGroup(
                "transformer_blocks.*", {**_MMDIT_BRANCHES, "self_attn": "attn2"}, dual_stream=True,
                returns="context_hidden",
            ),
        ),
        modulation=("time_text_embed", "time_text_embed.*", "transformer_blocks.*.norm1*", "norm_out", "norm_out.*"),
        token_layout=lambda model, args, kwargs: _image_layout(model, args, kwargs, text_position="last"),
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        notes="Joint attention concatenates [image, text]; SD3.5's optional attn2 is image-only self-attention.",
    ),
    FamilyAdapter(
        name="flux",
        denoiser_classes=("FluxTransformer2DModel",),
        pipeline_classes=("FluxPipeline",),
        block_groups=(
            BlockGroup("transformer_blocks.*", _MMDIT_BRANCHES, dual_stream=True, returns="context_hidden"),
            BlockGroup("single_transformer_blocks.*", _SINGLE_STREAM_BRANCHES, returns="context_hidden",
                       count_key="num_single_layers"),
        ),
        modulation=("time_text_embed", "time_text_embed.*", "*.norm1.linear", "*.norm1_context.linear",
                    "single_transformer_blocks.*.norm.linear", "norm_out.linear"),
        token_layout=_flux_layout,
        cfg="separate",
        notes="Joint attention concatenates [text, image]; true CFG runs cond and uncond in separate calls.",
    ),
    FamilyAdapter(
        name="wan",
        denoiser_classes=("WanTransformer3DModel",),
        pipeline_classes=("WanPipeline",),
        block_groups=(
            BlockGroup(
                "blocks.*", {"self_attn": "attn1", "cross_attn": "attn2", "ff": "ffn"}, residual_rule=WAN_BLOCK_RULE
            ),
        ),
        modulation=("condition_embedder.time_embedder*", "condition_embedder.time_proj"),
        token_layout=_video_layout(channels_first=True),
        cfg="separate",
        video=True,
        notes="Wan 2.2 A14B has two experts (transformer, transformer_2); per-block scale_shift_table parameters.",
    ),
    FamilyAdapter(
        name="skyreels-v2",
        denoiser_classes=("SkyReelsV2Transformer3DModel",),
        pipeline_classes=("SkyReelsV2Pipeline",),
        block_groups=(
            BlockGroup(
                "blocks.*", {"self_attn": "attn1", "cross_attn": "attn2", "ff": "ffn"},
                residual_rule=SKYREELS_BLOCK_RULE,
            ),
        ),
        modulation=("condition_embedder.time_embedder*", "condition_embedder.time_proj", "fps_projection*"),
        token_layout=_video_layout(channels_first=True),
        cfg="separate",
        video=True,
        notes="Wan's architecture (per-block scale_shift_table, cross-attention to UMT5 text); cond and uncond run "
              "in separate calls; the diffusion-forcing pipelines' per-frame timesteps are not declared.",
    ),
    FamilyAdapter(
        name="ltx-video",
        denoiser_classes=("LTXVideoTransformer3DModel",),
        pipeline_classes=("LTXPipeline",),
        block_groups=(BlockGroup("transformer_blocks.*", _DIT_BRANCHES, residual_rule=LTX_BLOCK_RULE),),
        modulation=("time_embed", "time_embed.*"),
        token_layout=_ltx_layout,
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        video=True,
        notes="AdaLN-single (one shared time_embed plus a per-block scale_shift_table); packed [B, S, C] tokens, the "
              "latent grid passed as num_frames / height / width; cross-attention to T5 text.",
    ),
    FamilyAdapter(
        name="allegro",
        denoiser_classes=("AllegroTransformer3DModel",),
        pipeline_classes=("AllegroPipeline",),
        block_groups=(BlockGroup("transformer_blocks.*", _DIT_BRANCHES, residual_rule=ALLEGRO_BLOCK_RULE),),
        modulation=("adaln_single", "adaln_single.*"),
        token_layout=_allegro_layout,
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        video=True,
        notes="PixArt-style blocks over video tokens: AdaLN-single plus per-block scale_shift_table, cross-attention "
              "to T5 text, 3-D RoPE on self-attention.",
    ),
    FamilyAdapter(
        name="cogvideox",
        denoiser_classes=("CogVideoXTransformer3DModel",),
        pipeline_classes=("CogVideoXPipeline",),
        block_groups=(
            BlockGroup(
                "transformer_blocks.*", {"joint_attn": "attn1", "ff": "ff"}, dual_stream=True, returns="hidden_context"
            ),
        ),
        modulation=("time_embedding", "time_embedding.*", "transformer_blocks.*.norm*.linear", "norm_out.linear"),
        token_layout=_video_layout(channels_first=False, text_position="first"),
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        video=True,
        notes="Joint attention concatenates [text, video].",
    ),
    FamilyAdapter(
        name="hunyuan-video",
        denoiser_classes=("HunyuanVideoTransformer3DModel",),
        pipeline_classes=("HunyuanVideoPipeline",),
        block_groups=(
            BlockGroup("transformer_blocks.*", _MMDIT_BRANCHES, dual_stream=True, returns="hidden_context"),
            BlockGroup("single_transformer_blocks.*", _SINGLE_STREAM_BRANCHES, returns="hidden_context",
                       count_key="num_single_layers"),
        ),
        modulation=("time_text_embed", "time_text_embed.*", "*.norm1.linear", "*.norm1_context.linear",
                    "single_transformer_blocks.*.norm.linear", "norm_out.linear"),
        token_layout=_video_layout(channels_first=True, text_position="last"),
        cfg="separate",
        video=True,
        notes="Joint attention concatenates [video, text]; true CFG runs cond and uncond in separate calls.",
    ),
    FamilyAdapter(
        name="aura-flow",
        denoiser_classes=("AuraFlowTransformer2DModel",),
        pipeline_classes=("AuraFlowPipeline",),
        block_groups=(
            BlockGroup("joint_transformer_blocks.*", _MMDIT_BRANCHES, dual_stream=True, returns="context_hidden",
                       count_key="num_mmdit_layers"),
            BlockGroup("single_transformer_blocks.*", {"joint_attn": "attn", "ff": "ff"}, concatenated="first",
                       count_key="num_single_dit_layers"),
        ),
        modulation=("time_step_embed", "time_step_proj", "time_step_proj.*", "*.norm1.linear",
                    "*.norm1_context.linear", "norm_out.linear"),
        token_layout=_aura_flow_layout,
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        notes="Joint attention concatenates [registers + text, image]; the single blocks take that concatenation "
              "as their one hidden_states stream.",
    ),
    FamilyAdapter(
        name="chroma",
        denoiser_classes=("ChromaTransformer2DModel",),
        pipeline_classes=("ChromaPipeline",),
        block_groups=(
            BlockGroup("transformer_blocks.*", _MMDIT_BRANCHES, dual_stream=True, returns="context_hidden"),
            BlockGroup("single_transformer_blocks.*", _SINGLE_STREAM_BRANCHES, concatenated="first",
                       count_key="num_single_layers"),
        ),
        modulation=("time_text_embed", "time_text_embed.*", "distilled_guidance_layer",
                    "distilled_guidance_layer.*"),
        token_layout=_flux_layout,
        cfg="separate",
        attention_always_masked=True,
        notes="Flux with pruned modulation: one approximator MLP (distilled_guidance_layer) makes every block's "
              "modulation, the blocks' norms hold no weights. Joint attention concatenates [text, image]; the single "
              "blocks take that concatenation as their one hidden_states stream. CFG runs two calls.",
    ),
    FamilyAdapter(
        name="qwen-image",
        denoiser_classes=("QwenImageTransformer2DModel",),
        pipeline_classes=("QwenImagePipeline",),
        block_groups=(
            BlockGroup("transformer_blocks.*", {"joint_attn": "attn", "ff": "img_mlp", "ff_context": "txt_mlp"},
                       dual_stream=True, returns="context_hidden", discarded_in_last=("ff_context",)),
        ),
        modulation=("time_text_embed", "time_text_embed.*", "transformer_blocks.*.img_mod*",
                    "transformer_blocks.*.txt_mod*", "norm_out.linear"),
        token_layout=_qwen_image_layout,
        cfg="separate",
        notes="MMDiT blocks only; joint attention concatenates [text, image]; true CFG runs cond and uncond in "
              "separate calls. No Qwen2.5-VL text encoder can be built offline (tiny pipelines take prompt_embeds).",
    ),
    FamilyAdapter(
        name="bria",
        denoiser_classes=("BriaTransformer2DModel",),
        pipeline_classes=("BriaPipeline",),
        block_groups=(
            BlockGroup("transformer_blocks.*", _MMDIT_BRANCHES, dual_stream=True, returns="context_hidden"),
            BlockGroup("single_transformer_blocks.*", _SINGLE_STREAM_BRANCHES, returns="context_hidden",
                       count_key="num_single_layers"),
        ),
        modulation=("time_embed", "time_embed.*", "*.norm1.linear", "*.norm1_context.linear",
                    "single_transformer_blocks.*.norm.linear", "norm_out.linear"),
        token_layout=_flux_layout,
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        notes="Flux's block layout (single blocks take and return the two streams apart); joint attention "
              "concatenates [text, image]; batched CFG.",
    ),
    FamilyAdapter(
        name="ovis-image",
        denoiser_classes=("OvisImageTransformer2DModel",),
        pipeline_classes=("OvisImagePipeline",),
        block_groups=(
            BlockGroup("transformer_blocks.*", _MMDIT_BRANCHES, dual_stream=True, returns="context_hidden"),
            BlockGroup("single_transformer_blocks.*", _SINGLE_STREAM_BRANCHES, returns="context_hidden",
                       count_key="num_single_layers"),
        ),
        modulation=("time_proj", "timestep_embedder", "timestep_embedder.*", "*.norm1.linear",
                    "*.norm1_context.linear", "single_transformer_blocks.*.norm.linear", "norm_out.linear"),
        token_layout=_flux_layout,
        cfg="separate",
        notes="Flux's block layout with SwiGLU feed-forwards (single blocks take and return text and image apart); "
              "joint attention concatenates [text, image]; true CFG runs cond and uncond in separate calls. No "
              "Qwen3 text encoder can be built offline (tiny pipelines take prompt_embeds).",
    ),
    FamilyAdapter(
        name="cogview3plus",
        denoiser_classes=("CogView3PlusTransformer2DModel",),
        pipeline_classes=("CogView3PlusPipeline",),
        block_groups=(
            BlockGroup(
                "transformer_blocks.*", {"joint_attn": "attn1", "ff": "ff"}, dual_stream=True, returns="hidden_context"
            ),
        ),
        modulation=("time_condition_embed", "time_condition_embed.*", "transformer_blocks.*.norm1.linear",
                    "norm_out.linear"),
        token_layout=lambda model, args, kwargs: _image_layout(model, args, kwargs, text_position="first"),
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        notes="CogVideoX-style blocks: joint attention concatenates [text, image]; one feed-forward runs on the "
              "concatenated streams, each stream with its own AdaLN-zero modulation.",
    ),
    FamilyAdapter(
        name="easyanimate",
        denoiser_classes=("EasyAnimateTransformer3DModel",),
        pipeline_classes=("EasyAnimatePipeline",),
        block_groups=(
            # MMDiT blocks (the first mmdit_layers; every block in EasyAnimate V5.1): txt_ff is the text stream's own
            # feed-forward. A block past mmdit_layers has no txt_ff and runs ff on both streams. The forward reads
            # only the video stream after the last block, so that block's txt_ff feeds nothing.
            BlockGroup(
                "transformer_blocks.*", {"joint_attn": "attn1", "ff": "ff", "ff_context": "txt_ff"},
                dual_stream=True, returns="hidden_context", discarded_in_last=("ff_context",),
            ),
        ),
        modulation=("time_proj", "time_embedding", "time_embedding.*", "transformer_blocks.*.norm1.linear",
                    "transformer_blocks.*.norm2.linear", "norm_out.linear"),
        token_layout=_video_layout(channels_first=True, text_position="first"),
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        video=True,
        notes="Joint attention concatenates [text, video]; the text attention mask never reaches the transformer.",
    ),
    FamilyAdapter(
        name="unet",
        denoiser_classes=("UNet2DConditionModel",),
        pipeline_classes=("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
        block_groups=tuple(
            BlockGroup(f"{stage}.attentions.*.transformer_blocks.*", _DIT_BRANCHES, residual_rule=BASIC_BLOCK_RULE)
            for stage in ("down_blocks.*", "mid_block", "up_blocks.*")
        ),
        modulation=("time_embedding", "time_embedding.*", "add_embedding", "add_embedding.*", "*.time_emb_proj"),
        token_layout=_unet_layout,
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        denoiser_attrs=("unet",),
        sequential_blocks=False,
        notes="SD 1.5 / SDXL: the 'blocks' are the BasicTransformerBlocks inside the U-Net's attention stages.",
    ),
    FamilyAdapter(
        name="sana",
        denoiser_classes=("SanaTransformer2DModel",),
        pipeline_classes=("SanaPipeline",),
        block_groups=(
            BlockGroup("transformer_blocks.*", {"linear_attn": "attn1", "cross_attn": "attn2", "ff": "ff"}),
        ),
        modulation=("time_embed", "time_embed.*"),
        token_layout=_image_layout,
        cfg="batched",
        cfg_batch_order=("uncond", "cond"),
        notes="Self-attention (attn1) is linear attention (SanaLinearAttnProcessor2_0, no softmax, no SDPA call); "
              "cross-attention to the Gemma2 text is SDPA. AdaLN-single plus a per-block scale_shift_table; the "
              "feed-forward (GLUMBConv) is convolutional and works on the [B, C, H, W] image.",
    ),
    FamilyAdapter(
        name="flux2",
        denoiser_classes=("Flux2Transformer2DModel",),
        pipeline_classes=("Flux2Pipeline",),
        block_groups=(
            BlockGroup("transformer_blocks.*", _MMDIT_BRANCHES, dual_stream=True, returns="context_hidden"),
            # fed the concatenated [text, image] sequence as hidden_states; the MLP is fused into the attention module
            # (one projection makes q, k, v and the MLP input): its activation is the block's "ff" branch
            BlockGroup("single_transformer_blocks.*", {"joint_attn": "attn", "ff": "attn.mlp_act_fn"},
                       count_key="num_single_layers"),
        ),
        modulation=("time_guidance_embed", "time_guidance_embed.*", "double_stream_modulation_*",
                    "single_stream_modulation", "single_stream_modulation.*", "norm_out.linear"),
        token_layout=_flux_layout,
        cfg="batched",
        notes="Joint attention concatenates [text, image]. Guidance-distilled: guidance_scale is embedded and each "
              "step is one denoiser call (no CFG batch). The single-stream blocks take and return the concatenated "
              "[text, image] sequence; modulation is computed once per forward and shared by all blocks.",
    ),
    FamilyAdapter(
        name="lumina2",
        denoiser_classes=("Lumina2Transformer2DModel",),
        pipeline_classes=("Lumina2Pipeline",),
        block_groups=(BlockGroup("layers.*", {"joint_attn": "attn", "ff": "feed_forward"}),),
        modulation=("time_caption_embed.time_proj", "time_caption_embed.timestep_embedder",
                    "time_caption_embed.timestep_embedder.*", "*.norm1.linear", "norm_out.linear_1"),
        token_layout=_lumina2_layout,
        cfg="separate",
        notes="Joint attention over [text, image] with shared weights (single stream). Before the joint 'layers' a "
              "context refiner (text only) and a noise refiner (image only) run: they are not declared blocks. "
              "CFG is two calls, cond then uncond (none after cfg_trunc_ratio).",
    ),
)

FAMILY_NAMES: tuple[str, ...] = tuple(adapter.name for adapter in ADAPTERS)


def supported_denoiser_classes() -> list[str]:
    return sorted({name for adapter in ADAPTERS for name in adapter.denoiser_classes})


def adapter_for_model(model: torch.nn.Module, pipeline_class: str | None = None) -> FamilyAdapter:
    """The adapter for a denoiser, looked up by its class (and the pipeline class where two families share one);
    for a class no family declares, the one ``infer_adapter`` makes from the module tree."""
    class_name = type(model).__name__
    matches = [adapter for adapter in ADAPTERS if class_name in adapter.denoiser_classes]
    if not matches:
        try:
            return infer_adapter(model, pipeline_class or "")
        except ValueError as error:
            raise ValueError(f"{error} Declared: {', '.join(supported_denoiser_classes())}.") from None
    for adapter in matches:
        if pipeline_class in adapter.pipeline_classes:
            return adapter
    return matches[0]


def diffusers_pipeline_class(pipe) -> str:
    """The name of the known pipeline class ``pipe`` is an instance of (a subclass of ``DiTPipeline`` counts as one),
    or its own class name."""
    known = {name for adapter in ADAPTERS for name in adapter.pipeline_classes}
    return next((cls.__name__ for cls in type(pipe).__mro__ if cls.__name__ in known), type(pipe).__name__)


def adapter_for(pipe) -> FamilyAdapter:
    """The adapter for a diffusers pipeline instance."""
    for attr in ("transformer", "unet"):
        model = getattr(pipe, attr, None)
        if isinstance(model, torch.nn.Module):
            return adapter_for_model(model, diffusers_pipeline_class(pipe))
    raise ValueError(
        f"{type(pipe).__name__} has no `transformer` or `unet` component; accel wraps diffusers pipelines whose "
        f"denoiser is one of: {', '.join(supported_denoiser_classes())}."
    )


def adapter_for_pipeline_class(class_name: str) -> FamilyAdapter:
    """The adapter for a pipeline class name (as in a saved pipeline's ``model_index.json``)."""
    for adapter in ADAPTERS:
        if class_name in adapter.pipeline_classes:
            return adapter
    known = sorted({name for adapter in ADAPTERS for name in adapter.pipeline_classes})
    raise ValueError(f"accel has no adapter for the pipeline class {class_name!r}. Supported: {', '.join(known)}.")


def get_adapter(name: str) -> FamilyAdapter:
    for adapter in ADAPTERS:
        if adapter.name == name:
            return adapter
    raise ValueError(f"Unknown family {name!r}; known families: {', '.join(FAMILY_NAMES)}.")


# ----------------------------------------------------------------------------------- structural fallback
# The structural fallback: a ``FamilyAdapter`` inferred from a denoiser's module tree when none is declared.
# What it finds: the denoiser's blocks (every ``nn.ModuleList`` of two or more modules of one class, each holding a
# diffusers-style attention module, one that has a ``processor``), in registration order, and in each block its
# branches: the attention children in order (the first "self_attn", a second "cross_attn") and the feed-forward
# child (a class named ``*FeedForward*`` or a child named ``ff`` / ``mlp`` / ``feed_forward``). What it cannot know
# from the tree is checked on the wrapped pipeline's first call (``BlockCallCheck``, a dry run on the call's own
# inputs): every block is called in that order with ``hidden_states`` and returns a tensor of its shape. A model the
# tree does not explain is refused with a ``ValueError`` naming what was missing; a call the check does not confirm
# raises one naming the block and what it saw, and every later call of that pipeline raises it again.
# Only methods that need nothing else (registered with ``structural=True``: Δ-DiT, BAC, AdaSpa, VMoBA) apply to an
# inferred adapter; a model with two-stream blocks, a U-Net, or anything a method needs a declared fact for (residual
# rules, modulation layers, CFG layout) needs its own ``FamilyAdapter``.

logger = logging.getLogger(__name__)
_FEED_FORWARD_NAMES = ("ff", "mlp", "feed_forward")
_INFERRED: dict[type, FamilyAdapter] = {}  # by denoiser class: every adapter inferred in this process
_LOCK = threading.Lock()


def _is_attention(module: torch.nn.Module) -> bool:
    return getattr(module, "processor", None) is not None


def _is_feed_forward(name: str, module: torch.nn.Module) -> bool:
    return "FeedForward" in type(module).__name__ or name in _FEED_FORWARD_NAMES


def block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The ``ModuleList``s of two or more same-class modules that each hold an attention module."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if all(any(_is_attention(m) for m in child.modules()) for child in module):
            found.append((name, module))
    return found


def _branches(block: torch.nn.Module) -> dict[str, str]:
    branches: dict[str, str] = {}
    attentions = [name for name, child in block.named_children() if _is_attention(child)]
    for kind, name in zip(("self_attn", "cross_attn"), attentions):
        branches[kind] = name
    feed_forward = [name for name, child in block.named_children() if _is_feed_forward(name, child)]
    if feed_forward:
        branches["ff"] = feed_forward[0]
    return branches


def _layout(model, args, kwargs) -> TokenLayout:
    hidden = _arg(args, kwargs, "hidden_states", 0)
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"{type(model).__name__} was called without a hidden_states tensor.")
    patch_t, patch_h, patch_w = _patch_size(getattr(getattr(model, "config", None), "patch_size", None) or 1)
    if hidden.ndim == 5:  # [B, C, F, H, W]
        return TokenLayout(hidden.shape[2] // patch_t, hidden.shape[3] // patch_h, hidden.shape[4] // patch_w)
    if hidden.ndim == 4:  # [B, C, H, W]
        return TokenLayout(1, hidden.shape[2] // patch_h, hidden.shape[3] // patch_w)
    return TokenLayout(1, 1, hidden.shape[1])  # a token sequence


def infer_adapter(model: torch.nn.Module, pipeline_class: str) -> FamilyAdapter:
    """An adapter for ``model`` from its module tree, or ``ValueError`` naming what the tree lacks."""
    class_name = type(model).__name__
    with _LOCK:
        known = _INFERRED.get(type(model))
    if known is not None:
        return known
    lists = block_lists(model)
    if not lists:
        raise ValueError(
            f"accel has no adapter for the denoiser class {class_name!r} and could not infer one: it holds no "
            "nn.ModuleList of two or more blocks of one class that each contain an attention module (one with a "
            "`processor`)."
        )
    groups = []
    for name, blocks in lists:
        branches = _branches(blocks[0])
        if "self_attn" not in branches:
            raise ValueError(f"accel has no adapter for the denoiser class {class_name!r} and could not infer one: "
                             f"the blocks of {name} hold their attention deeper than a direct child, so their "
                             "branches cannot be told apart.")
        groups.append(BlockGroup(f"{name}.*", branches))
    adapter = FamilyAdapter(
        name=f"inferred:{class_name}", denoiser_classes=(class_name,), pipeline_classes=(pipeline_class,),
        block_groups=tuple(groups), modulation=(), token_layout=_layout, cfg="batched", inferred=True,
        notes="inferred from the module tree (accel.pipelines.inferred); confirmed on the first call",
    )
    with _LOCK:
        _INFERRED.setdefault(type(model), adapter)
    logger.warning("accel: no adapter is declared for %s; inferred one from its module tree: blocks %s. Only the "
                   "methods that need nothing more apply (Δ-DiT, BAC, the sparse attention methods); the first call "
                   "checks the blocks' calls.", class_name, ", ".join(group.pattern for group in groups))
    return adapter


def inferred_families() -> list[str]:
    """The adapters inferred so far in this process, by family name."""
    with _LOCK:
        return sorted(adapter.name for adapter in _INFERRED.values())


class BlockCallCheck:
    """Confirms, on a pipeline's first denoiser forward, what an inferred adapter assumed about its blocks: they run
    in the adapter's order, each with a ``hidden_states`` tensor, returning a tensor of that shape."""

    def __init__(self, denoiser: str) -> None:
        self.denoiser = denoiser
        self.confirmed = False
        self.next_index = 0
        self.failure: str | None = None

    def check(self, block_name: str, index: int, args: tuple, kwargs: dict, output) -> None:
        if self.confirmed:
            return
        hidden = _arg(args, kwargs, "hidden_states", 0)
        problem = None
        if index != self.next_index:
            problem = f"ran as block {self.next_index} of the forward, not as block {index} of the module tree"
        elif not isinstance(hidden, torch.Tensor):
            problem = "was called without a hidden_states tensor (as its first argument or by name)"
        elif not isinstance(output, torch.Tensor) or output.shape != hidden.shape:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            problem = f"returned {shape} for hidden_states of shape {tuple(hidden.shape)}, not a tensor of that shape"
        if problem is not None:
            self.failure = (f"accel's inferred adapter does not fit this model: {block_name} {problem}. Unwrap the "
                            "pipeline; the model needs a declared FamilyAdapter (accel.pipelines.adapters).")
            raise ValueError(self.failure)
        self.next_index += 1

    def forward_done(self, blocks: int, args: tuple, kwargs: dict, output) -> None:
        if not self.confirmed and self.next_index == blocks:
            self.confirmed = True
        elif not self.confirmed and self.failure is None:
            self.failure = (f"accel's inferred adapter does not fit this model: the first forward ran "
                            f"{self.next_index} of its {blocks} blocks. Unwrap the pipeline; the model needs a "
                            "declared FamilyAdapter (accel.pipelines.adapters).")
            raise ValueError(self.failure)
