"""Δ-DiT: cache the residual of a range of transformer blocks and reuse it on cached steps.

Paper: Chen et al., "Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion Transformers",
arXiv 2406.01125.

What it does, in three lines: on a full step every block runs and the residual Δ = h_out - h_in of the front
``n`` blocks and of the rear ``n`` blocks is stored. On a cached step one of those ranges is skipped and its output
is h_in(current step) + Δ, so the current input still flows through: the rear range before the boundary step
``b`` (early, high-noise steps shape the outline in the front blocks), the front range from ``b`` on.

Where this implementation departs from the paper, and why:
* Both Δ_front and Δ_rear are stored on every full step, so either side of ``b`` finds its Δ (the paper stores
  the one the next cached step needs). Costs one extra tensor per range and branch.
* The schedule is static and depends only on the step index: full when ``step % interval == 0``;
  ``b = round(boundary * num_steps)``; ``n = round(cached_fraction * depth)``.
* The final step always computes (``compute_final_step=True``, the default; ``False`` is the paper's schedule).
  Its output is the sample itself, and no later step corrects an error made there (``docs/methods/delta_dit.md``).
* A full step measures Δ only when the next step reuses it.
* Multi-stream blocks (Flux double + single blocks, SD3 joint blocks, HunyuanVideo, CogVideoX) treat the block
  lists as one sequence and carry the Δ of both streams; a stream a block drops (SD3's last block) stays dropped.
* Δ is kept per denoiser (Wan 2.2's two experts) and per CFG branch; a cached step whose input shapes differ
  from those of the stored Δ (or that has no Δ yet) computes every block instead.
* Families whose blocks are not one residual chain (the U-Net: resnets and resampling sit between its
  transformer blocks; ``FamilyAdapter.sequential_blocks``) are not supported.

Measured on the shipped ``digits-dit`` (20 steps, guidance 1.5, 500 samples, 2 CPU threads; ``python
benchmarks/caching.py --model digits-dit --steps 20``): the default runs 1.50x at 41.3 dB PSNR against the uncached
output; interval 3 on the rear 11 of 12 blocks 2.19x at 34.5 dB (``docs/benchmarks/caching.md``).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

import torch
from diffusers.hooks import ModelHook

from accel.config import AccelConfig, check_bool, check_float, check_int
from accel.hooks import BranchStates, MethodScope
from accel.pipelines.adapters import ADAPTERS, BlockInfo
from accel.registry import register_accelerator

_DELTA_DIT_HOOK = "block"

# Families with `concatenated` block groups (AuraFlow) are left out: a range that runs from a dual-stream block into
# a concatenated one would subtract the (image, text) input from the cat(text, image) output; the split needs the
# forward's token layout (BlockInfo.split_concatenated), which this method does not pass to the blocks' streams.
FAMILIES = tuple(adapter.name for adapter in ADAPTERS
                 if adapter.sequential_blocks and not any(group.concatenated for group in adapter.block_groups))


@dataclasses.dataclass
class DeltaDiTConfig(AccelConfig):
    """Configuration of Δ-DiT (arXiv 2406.01125).

    Args:
        interval: one full step every ``interval`` steps (1 computes everything; 2 alternates).
        boundary: the boundary step as a share of the steps, ``b = round(boundary * num_steps)``; before it the
            rear range is cached, from it on the front range.
        cached_fraction: the share of the blocks in each cached range, ``n = round(cached_fraction * depth)``.
        compute_final_step: compute every block on the last step (see the module docstring); ``False`` follows
            the paper.
    """

    method = "delta-dit"
    interval: int = 2
    boundary: float = 0.6
    cached_fraction: float = 0.75
    compute_final_step: bool = True

    def validate(self) -> None:
        check_int("interval", self.interval, minimum=1)
        check_bool("compute_final_step", self.compute_final_step)
        check_float("boundary", self.boundary, minimum=0.0, maximum=1.0)
        check_float("cached_fraction", self.cached_fraction, minimum=0.0, maximum=1.0)

    def cached_blocks(self, depth: int) -> int:
        return min(depth, round(self.cached_fraction * depth))


def delta_dit_plan(config: DeltaDiTConfig, step: int, num_steps: int | None, depth: int) -> range:
    """The blocks skipped at ``step`` (an empty range on full steps). Static: depends on the step index only."""
    cached = config.cached_blocks(depth)
    full_from = None if num_steps is None else num_steps - (1 if config.compute_final_step else 0)
    if full_from is None or cached == 0 or step % config.interval == 0 or step >= full_from:
        return range(0)  # a full step (past the schedule too: the hook asks about the step after the last)
    if step < round(config.boundary * num_steps):
        return range(depth - cached, depth)  # early steps: reuse the rear blocks
    return range(0, cached)  # late steps: reuse the front blocks


@dataclasses.dataclass
class StoredDelta:
    """The residual of one block range, measured on the last full step before a cached one."""

    shapes: tuple  # (hidden shape, context shape or None) of the range's input
    hidden: torch.Tensor
    context: torch.Tensor | None


class DeltaDiTBranchState:
    """One denoiser and CFG branch's state within a call (kept apart by ``scope.add_branch_states``)."""

    def __init__(self) -> None:
        self.deltas: dict[str, StoredDelta] = {}  # "front" / "rear" -> the residual to reuse
        self.range_inputs: dict[str, tuple] = {}  # "front" / "rear" -> (hidden in, context in) being measured
        self.skipping = False  # whether this forward reuses a Δ (set at the reused range's first block)


class Action(enum.Enum):
    """What a block does in this forward."""

    ORIGINAL = enum.auto()  # not this pipeline's call, or another denoiser: run unchanged
    COMPUTE = enum.auto()  # run the block
    REUSE = enum.auto()  # first block of the reused range: its input plus the stored Δ
    PASS = enum.auto()  # inside the reused range: hand the streams on
    MEASURE = enum.auto()  # run the block and store the residual of the ranges that end here


class Decision(NamedTuple):
    action: Action
    streams: tuple | None = None  # REUSE, PASS: (hidden, context) in
    delta: StoredDelta | None = None  # REUSE
    state: DeltaDiTBranchState | None = None  # MEASURE
    ends: tuple[str, ...] = ()  # MEASURE: the ranges whose last block this is


def _shapes(hidden: torch.Tensor, context: torch.Tensor | None) -> tuple:
    return tuple(hidden.shape), None if context is None else tuple(context.shape)


def _minus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a - b


def _plus(a: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor | None:
    return a if a is None or delta is None else a + delta


class DeltaDiTBlockHook(ModelHook):
    """On each block. The decisions and the state bookkeeping sit in ``torch.compiler.disable`` helpers, so a
    compiled transformer breaks the graph there and traces the blocks themselves."""

    def __init__(self, scope: MethodScope, states: BranchStates[DeltaDiTBranchState], config: DeltaDiTConfig,
                 denoiser: str, block: BlockInfo, depth: int) -> None:
        super().__init__()
        self.scope, self.states, self.config = scope, states, config
        self.denoiser, self.block, self.depth = denoiser, block, depth
        cached = config.cached_blocks(depth)
        self.ranges = {"front": range(0, cached), "rear": range(depth - cached, depth)}

    def new_forward(self, module, *args, **kwargs):
        decision = self._decide(args, kwargs)
        if decision.action is Action.REUSE:
            (hidden, context), delta = decision.streams, decision.delta
            return self.block.make_output(hidden + delta.hidden, _plus(context, delta.context))
        if decision.action is Action.PASS:
            return self.block.make_output(*decision.streams)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if decision.action is Action.MEASURE:
            self._measure_end(decision, output)
        return output

    def will_compute(self, module) -> bool:
        """Whether this forward runs the block (a compiled denoiser's ``BlockSpans`` look ahead with it)."""
        info = self.scope.current if self.scope.is_active() else None
        if info is None or info.denoiser != self.denoiser:
            return True
        return self.block.index not in delta_dit_plan(self.config, info.step, info.num_steps, self.depth)

    @torch.compiler.disable
    def _decide(self, args, kwargs) -> Decision:
        info = self.scope.current if self.scope.is_active() else None
        if info is None or info.denoiser != self.denoiser:
            return Decision(Action.ORIGINAL)
        index, state = self.block.index, self.states.get(info)
        skipped = delta_dit_plan(self.config, info.step, info.num_steps, self.depth)
        if index in skipped:
            streams = self.block.streams_in(args, kwargs)
            if index == skipped.start:
                stored = state.deltas.get("front" if skipped.start == 0 else "rear")
                state.skipping = stored is not None and stored.shapes == _shapes(*streams)
                return Decision(Action.REUSE, streams, stored) if state.skipping else Decision(Action.COMPUTE)
            return Decision(Action.PASS, streams) if state.skipping else Decision(Action.COMPUTE)
        if skipped:  # a cached step, but this block is outside the reused range
            return Decision(Action.COMPUTE)
        if not delta_dit_plan(self.config, info.step + 1, info.num_steps, self.depth):
            return Decision(Action.COMPUTE)  # the next step computes every block: nothing to measure
        # A full step before a cached one: measure the residual of both ranges.
        for name, blocks in self.ranges.items():
            if blocks and index == blocks.start:
                state.range_inputs[name] = self.block.streams_in(args, kwargs)
        ends = tuple(name for name, blocks in self.ranges.items() if blocks and index == blocks[-1])
        return Decision(Action.MEASURE, state=state, ends=ends)

    @torch.compiler.disable
    def _measure_end(self, decision: Decision, output) -> None:
        for name in decision.ends:
            hidden_in, context_in = decision.state.range_inputs.pop(name)
            hidden_out, context_out = self.block.streams_out(output)
            decision.state.deltas[name] = StoredDelta(
                _shapes(hidden_in, context_in), hidden_out - hidden_in, _minus(context_out, context_in)
            )


def apply_delta_dit(scope: MethodScope, config: DeltaDiTConfig) -> None:
    """Install Δ-DiT on every block of every denoiser of the pipeline behind ``scope``."""
    states = scope.add_branch_states(DeltaDiTBranchState)
    for denoiser, blocks in scope.blocks.items():
        for block in blocks:
            hook = DeltaDiTBlockHook(scope, states, config, denoiser, block, len(blocks))
            scope.register_hook(block.module, hook, _DELTA_DIT_HOOK)


register_accelerator(
    DeltaDiTConfig,
    apply_delta_dit,
    description="Δ-DiT: reuse the residual of the rear (early steps) or front (late steps) blocks on cached steps",
    families=FAMILIES,
    role="caching",
    structural=True,
)
