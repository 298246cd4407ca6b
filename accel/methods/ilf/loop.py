"""The inner loop at run time: hooks on the region's blocks that, after the region's last block, run F on its
output and run the region again with F's output, scaled per block, added to each block's input."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.hooks import ModelHook

from accel.pipelines.adapters import BlockInfo

from .module import FeedbackModule


class LoopState:
    """What one denoiser forward carries between the region's blocks (reset by the first block)."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict] | None] = []
        self.rerunning = False
        self.loops = 0  # feedback loops run since the last reset (for accel.summary)


class FeedbackHook(ModelHook):
    """On each block of the loop region. ``enabled()`` says whether this forward gets the feedback (the wrapped
    pipeline's own denoiser calls; always, in training)."""

    def __init__(self, module: FeedbackModule, region: list[BlockInfo], position: int, state: LoopState,
                 enabled: Callable[[], bool]) -> None:
        super().__init__()
        self.module, self.region, self.position, self.state, self.enabled = module, region, position, state, enabled

    def new_forward(self, block_module, *args, **kwargs):
        state = self.state
        if state.rerunning or not self.enabled():
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.position == 0:
            state.calls = [None] * len(self.region)
        elif not state.calls or state.calls[0] is None:  # the region's start ran without us: no loop this forward
            return self.fn_ref.original_forward(*args, **kwargs)
        state.calls[self.position] = (args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.position < len(self.region) - 1:
            return output
        return self._loop(output)

    def _loop(self, output):
        state, last = self.state, self.region[-1]
        hidden, context = last.streams_out(output)
        feedback_args, feedback_kwargs = last.with_streams_in(*state.calls[-1], hidden, context)
        feedback_hidden, feedback_context = last.streams_out(self.module.block(*feedback_args, **feedback_kwargs))
        hidden, context = self.region[0].streams_in(*state.calls[0])
        state.rerunning = True
        try:
            for position, block in enumerate(self.region):
                hidden = hidden + self.module.scale_for("hidden", position, hidden) * feedback_hidden
                if context is not None and feedback_context is not None and self.module.context_scales is not None:
                    context = context + self.module.scale_for("context", position, context) * feedback_context
                block_args, block_kwargs = block.with_streams_in(*state.calls[position], hidden, context)
                hidden, new_context = block.streams_out(block.module(*block_args, **block_kwargs))
                context = new_context if new_context is not None else context
        finally:
            state.rerunning = False
            state.calls = []
        state.loops += 1
        return last.make_output(hidden, context if last.returns != "hidden" else None)


def install_loop(module: FeedbackModule, blocks: list[BlockInfo], enabled: Callable[[], bool],
                 register: Callable[[torch.nn.Module, ModelHook], None]) -> LoopState:
    """Hook the region ``module.region`` of ``blocks``; ``register(block module, hook)`` installs each hook."""
    first, last = module.region
    region = blocks[first:last + 1]
    state = LoopState()
    for position, block in enumerate(region):
        register(block.module, FeedbackHook(module, region, position, state, enabled))
    return state
