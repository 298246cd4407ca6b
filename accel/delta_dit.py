"""Δ-DiT: cache the residual of a range of transformer blocks and reuse it on cached steps.

Paper: Chen et al., "Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion Transformers",
arXiv 2406.01125. Spec: ../shared/design/METHODS.md ("Δ-DiT").

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
  Its output is the sample itself, and no later step corrects an error made there. On the 2026-11 ``digits-dit``
  (20 steps, guidance 1.5, 200 samples) it took the default setting from 33.62 to 36.79 dB PSNR against the
  uncached output, for 62.5% -> 66.2% of the blocks computed.
* A full step measures Δ only when the next step reuses it.
* Multi-stream blocks (Flux double + single blocks, SD3 joint blocks, HunyuanVideo, CogVideoX) treat the block
  lists as one sequence and carry the Δ of both streams; a stream a block drops (SD3's last block) stays dropped.
* Δ is kept per denoiser (Wan 2.2's two experts) and per CFG branch; a cached step whose input shapes differ
  from those of the stored Δ (or that has no Δ yet) computes every block instead.
* Families whose blocks are not one residual chain (the U-Net: resnets and resampling sit between its
  transformer blocks; ``FamilyAdapter.sequential_blocks``) are not supported.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.hooks import ModelHook

from accel.pipelines.adapters import ADAPTERS, BlockInfo

from .config import AccelConfig, check_bool, check_float, check_int
from .hooks import MethodScope
from .registry import register_accelerator

_DELTA_DIT_HOOK = "block"

FAMILIES = tuple(adapter.name for adapter in ADAPTERS if adapter.sequential_blocks)


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


class DeltaDiTState:
    """Per-call state: stored deltas, the inputs of ranges being measured, and this forward's skip decision."""

    def reset(self) -> None:
        self.deltas: dict[tuple, tuple] = {}  # (denoiser, branch, range) -> (shapes, Δ hidden, Δ context)
        self.range_inputs: dict[tuple, tuple] = {}  # (denoiser, branch, range) -> (hidden in, context in)
        self.skipping: dict[tuple, bool] = {}  # (denoiser, branch) -> whether this forward reuses a Δ


def _shapes(hidden: torch.Tensor, context: torch.Tensor | None) -> tuple:
    return tuple(hidden.shape), None if context is None else tuple(context.shape)


def _minus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a - b


def _plus(a: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor | None:
    return a if a is None or delta is None else a + delta


class DeltaDiTBlockHook(ModelHook):
    """On each block. The decisions and the state bookkeeping sit in ``torch.compiler.disable`` helpers, so a
    compiled transformer breaks the graph there and traces the blocks themselves."""

    def __init__(self, scope: MethodScope, state: DeltaDiTState, config: DeltaDiTConfig, denoiser: str,
                 block: BlockInfo, depth: int) -> None:
        super().__init__()
        self.scope, self.state, self.config = scope, state, config
        self.denoiser, self.block, self.depth = denoiser, block, depth
        cached = config.cached_blocks(depth)
        self.ranges = {"front": range(0, cached), "rear": range(depth - cached, depth)}

    def new_forward(self, module, *args, **kwargs):
        action, payload = self._decide(args, kwargs)
        if action == "reuse":  # first block of the reused range: its input plus the stored Δ
            (hidden, context), (delta_hidden, delta_context) = payload
            return self.block.make_output(hidden + delta_hidden, _plus(context, delta_context))
        if action == "pass":  # inside the reused range
            return self.block.make_output(*payload)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if action == "measure":
            self._measure_end(payload, output)
        return output

    @torch.compiler.disable
    def _decide(self, args, kwargs):
        """("original" | "compute" | "reuse" | "pass" | "measure", payload) for this block and forward."""
        info = self.scope.current if self.scope.is_active() else None
        if info is None or info.denoiser != self.denoiser:
            return "original", None
        index, state, branch_key = self.block.index, self.state, (self.denoiser, info.branch)
        skipped = delta_dit_plan(self.config, info.step, info.num_steps, self.depth)
        if index in skipped:
            streams = self.block.streams_in(args, kwargs)
            if index == skipped.start:
                stored = state.deltas.get((*branch_key, "front" if skipped.start == 0 else "rear"))
                reuse = stored is not None and stored[0] == _shapes(*streams)
                state.skipping[branch_key] = reuse
                return ("reuse", (streams, stored[1:])) if reuse else ("compute", None)
            return ("pass", streams) if state.skipping.get(branch_key, False) else ("compute", None)
        if skipped:  # a cached step, but this block is outside the reused range
            return "compute", None
        if not delta_dit_plan(self.config, info.step + 1, info.num_steps, self.depth):
            return "compute", None  # the next step computes every block: nothing to measure
        # A full step before a cached one: measure the residual of both ranges.
        for name, blocks in self.ranges.items():
            if blocks and index == blocks.start:
                state.range_inputs[(*branch_key, name)] = self.block.streams_in(args, kwargs)
        ends = [name for name, blocks in self.ranges.items() if blocks and index == blocks[-1]]
        return "measure", (branch_key, ends)

    @torch.compiler.disable
    def _measure_end(self, payload, output) -> None:
        branch_key, ends = payload
        for name in ends:
            hidden_in, context_in = self.state.range_inputs.pop((*branch_key, name))
            hidden_out, context_out = self.block.streams_out(output)
            self.state.deltas[(*branch_key, name)] = (
                _shapes(hidden_in, context_in), hidden_out - hidden_in, _minus(context_out, context_in)
            )


def apply_delta_dit(scope: MethodScope, config: DeltaDiTConfig) -> None:
    """Install Δ-DiT on every block of every denoiser of the pipeline behind ``scope``."""
    state = scope.add_state(DeltaDiTState())
    for denoiser, blocks in scope.blocks.items():
        for block in blocks:
            hook = DeltaDiTBlockHook(scope, state, config, denoiser, block, len(blocks))
            scope.register_hook(block.module, hook, _DELTA_DIT_HOOK)


register_accelerator(
    DeltaDiTConfig,
    apply_delta_dit,
    description="Δ-DiT: reuse the residual of the rear (early steps) or front (late steps) blocks on cached steps",
    families=FAMILIES,
)
