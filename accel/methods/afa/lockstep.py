"""The members in lock-step at run time: hooks on the lead denoiser and its blocks that run every member's block
on the same mixed input and hand the aggregator's mix of their outputs to the next block.

The lead (the first member) drives the forward. At its first block the other members' own block inputs are
captured by running each member's forward up to its first block (their own patch and timestep embeddings); the
members' later blocks reuse those captured arguments with the mixed streams swapped in, which holds for families
whose blocks all take the same non-stream arguments (checked on every block: anything else is a clear error).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers.hooks import ModelHook

from accel.pipelines.adapters import BlockInfo

from .aggregator import Aggregator


class _Captured(Exception):
    """Raised by the capture hook on a member's first block: its inputs are all the forward was run for."""


_STREAM = object()  # stands in for the streams when two calls' other arguments are compared


def _same_arguments(block: BlockInfo, first: tuple[tuple, dict], now: tuple[tuple, dict]) -> bool:
    """Whether a block's call passes the same non-stream arguments (the same objects) as the first block's."""
    a_args, a_kwargs = block.with_streams_in(*first, _STREAM, _STREAM)
    b_args, b_kwargs = block.with_streams_in(*now, _STREAM, _STREAM)
    if len(a_args) != len(b_args) or a_kwargs.keys() != b_kwargs.keys():
        return False
    pairs = list(zip(a_args, b_args)) + [(a_kwargs[key], b_kwargs[key]) for key in a_kwargs]
    return all(x is y or (not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and x == y)
               for x, y in pairs)


def _tokens(feature: torch.Tensor) -> int:
    """Tokens per sample of a mixing point's feature: [B, T, D] tokens, or [B, C, H, W] maps (a token per pixel)."""
    return feature.shape[2] * feature.shape[3] if feature.ndim == 4 else feature.shape[1]


class LockStepState:
    """What one forward of the lead denoiser carries between its blocks (set by the denoiser hook)."""

    def __init__(self) -> None:
        self.call: tuple[tuple, dict] | None = None
        self.named: dict | None = None  # the call's arguments by parameter name
        self.first_block_call: tuple[tuple, dict] | None = None
        self.member_calls: list[tuple[tuple, dict]] | None = None
        self.embedding: tuple[torch.Tensor, torch.Tensor] | None = None
        # Guidance-shared mixing: the batch half that holds the conditional branch (batched CFG), or the branch of
        # this call (separate CFG: "cond" keeps its weights for the step's "uncond" call).
        self.conditional_half: int | None = None
        self.branch: str | None = None
        self.forwards = 0  # ensemble forwards since the last reset (for accel.summary)

    def reset(self) -> None:
        self.call = self.named = self.first_block_call = self.member_calls = self.embedding = None
        self.conditional_half = self.branch = None


class ConditionalWeights:
    """A separate-CFG family's conditional-call mixing weights of the running step, per mixing point, for the
    step's unconditional call (reset with every pipeline call)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.by_point: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.step, self.by_point = None, {}


class LockStep:
    """The hooks' shared logic: ``lead`` is the lead's blocks, ``members`` each other member's (model, blocks);
    ``condition_of(arguments)`` picks the aggregator's condition from a denoiser call's arguments by name."""

    def __init__(self, aggregator: Aggregator | None, lead: list[BlockInfo],
                 members: list[tuple[torch.nn.Module, list[BlockInfo]]],
                 condition_of: Callable[[dict], torch.Tensor]) -> None:
        self.aggregator, self.lead, self.members, self.condition_of = aggregator, lead, members, condition_of
        self.state = LockStepState()
        # Set per pipeline call by AFA (``guide``); training runs without guidance and leaves it off.
        self.share_guidance = False
        self.cfg_batch_order: tuple[str, str] | None = None
        self.current: Callable[[], object] = lambda: None  # the running forward's StepInfo (step, branch)
        self.conditional_weights = ConditionalWeights()

    def guide(self, share: bool, cfg_batch_order: tuple[str, str] | None, current: Callable[[], object]) -> None:
        """Mix the unconditional branch of classifier-free guidance with the conditional branch's weights
        (``share``) for the calls to come; ``cfg_batch_order`` names the halves of a batched-CFG family's batch
        (None: the branches are separate calls, ``current().branch`` says which)."""
        self.share_guidance, self.cfg_batch_order, self.current = share, cfg_batch_order, current

    def begin(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.state.reset()
        self.state.call = (args, kwargs)
        try:  # positional arguments by name (the SD pipelines pass the U-Net's timestep positionally)
            self.state.named = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
        except (TypeError, ValueError):
            self.state.named = dict(kwargs)
        self.state.forwards += 1
        if self.share_guidance and self.aggregator is not None:
            self._find_guidance_branches()

    def _find_guidance_branches(self) -> None:
        """Batched CFG: the conditional half, when the batch is the same latents twice (as every diffusers
        pipeline builds it under guidance). Separate CFG: the branch is read at the first mix (``_weights``)."""
        state = self.state
        if self.cfg_batch_order is None:
            return
        stream = state.named.get("hidden_states", state.named.get("sample"))
        if not isinstance(stream, torch.Tensor) or stream.ndim == 0 or stream.shape[0] % 2:
            return
        half = stream.shape[0] // 2
        if torch.equal(stream[:half], stream[half:]):
            state.conditional_half = self.cfg_batch_order.index("cond")

    def member_calls(self) -> list[tuple[tuple, dict]]:
        state = self.state
        if state.member_calls is None:
            state.member_calls = [self._capture(model, blocks[0]) for model, blocks in self.members]
        return state.member_calls

    def _capture(self, model: torch.nn.Module, first: BlockInfo) -> tuple[tuple, dict]:
        found: dict[str, tuple[tuple, dict]] = {}

        def stop(module, args, kwargs):
            found["call"] = (args, kwargs)
            raise _Captured

        handle = first.module.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            model(*self.state.call[0], **self.state.call[1])
        except _Captured:
            pass
        finally:
            handle.remove()
        if "call" not in found:
            raise ValueError(f"AFA: the member {type(model).__name__} returned without calling its first block "
                             f"({first.name}); its forward cannot be run in lock-step.")
        return found["call"]

    def mix(self, point: int, features: list[torch.Tensor]) -> torch.Tensor:
        if self.aggregator is None:  # untrained: the plain mean, what a trained aggregator starts from
            return sum(features[1:], features[0]) / len(features)
        state = self.state
        if state.embedding is None:
            named = state.named
            if named.get("timestep") is None:
                raise ValueError("AFA's aggregator reads the denoiser call's 'timestep'; this call passes none.")
            state.embedding = self.aggregator.embed(named["timestep"], self.condition_of(named), len(features[0]))
        mixer = self.aggregator.mixers[point]
        return mixer.combine(features, self._weights(point, mixer, features))

    def _weights(self, point: int, mixer, features: list[torch.Tensor]) -> torch.Tensor:
        state, kept = self.state, self.conditional_weights
        if self.share_guidance and self.cfg_batch_order is None and state.branch is None:
            state.branch = getattr(self.current(), "branch", "")
        if state.branch == "uncond":
            step = getattr(self.current(), "step", None)
            weights = kept.by_point.get(point) if kept.step == step else None
            if weights is not None and weights.shape[:2] == (len(features[0]), _tokens(features[0])):
                return weights
        weights = mixer.mixing_weights(features, *state.embedding, conditional_half=state.conditional_half)
        if state.branch == "cond":
            step = getattr(self.current(), "step", None)
            if kept.step != step:
                kept.step, kept.by_point = step, {}
            kept.by_point[point] = weights
        return weights

    def run_block(self, index: int, original: Callable, args: tuple, kwargs: dict):
        """Block ``index`` of every member on the mixed input; the aggregator's mix of their outputs."""
        block = self.lead[index]
        if self.state.first_block_call is None:
            self.state.first_block_call = (args, kwargs)
        elif not _same_arguments(block, self.state.first_block_call, (args, kwargs)):
            raise ValueError(f"AFA: block {block.name} is called with other arguments than the first block; this "
                             "family's blocks cannot share the members' captured inputs.")
        calls = self.member_calls()
        hidden, context = block.streams_in(args, kwargs)
        if index == 0:  # the members' own block inputs are mixed first (AFA mixes the input convolution's output)
            inputs = [blocks[0].streams_in(*call) for call, (_, blocks) in zip(calls, self.members)]
            hidden = self.mix(0, [hidden] + [streams[0] for streams in inputs])
            if context is not None:
                context = sum((streams[1] for streams in inputs), context) / (1 + len(inputs))
        lead_args, lead_kwargs = block.with_streams_in(args, kwargs, hidden, context)
        outputs = [block.streams_out(original(*lead_args, **lead_kwargs))]
        for call, (_, blocks) in zip(calls, self.members):
            member_block = blocks[index]
            member_args, member_kwargs = member_block.with_streams_in(*call, hidden, context)
            outputs.append(member_block.streams_out(member_block.module(*member_args, **member_kwargs)))
        mixed = self.mix(index + 1, [output[0] for output in outputs])
        mixed_context = None
        if outputs[0][1] is not None:  # the context stream (dual-stream blocks): the members' mean
            mixed_context = sum((output[1] for output in outputs[1:]), outputs[0][1]) / len(outputs)
        return block.make_output(mixed, mixed_context)


class DenoiserHook(ModelHook):
    """On the lead denoiser: starts each forward's lock-step state."""

    def __init__(self, lockstep: LockStep, enabled: Callable[[], bool]) -> None:
        super().__init__()
        self.lockstep, self.enabled = lockstep, enabled

    def pre_forward(self, module, *args, **kwargs):
        if self.enabled():
            self.lockstep.begin(module, args, kwargs)
        else:
            self.lockstep.state.reset()
        return args, kwargs

    def post_forward(self, module, output):
        self.lockstep.state.reset()
        return output


class BlockHook(ModelHook):
    """On each of the lead's blocks: runs the block of every member and returns the mix."""

    def __init__(self, lockstep: LockStep, index: int) -> None:
        super().__init__()
        self.lockstep, self.index = lockstep, index

    def new_forward(self, block_module, *args, **kwargs):
        if self.lockstep.state.call is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.lockstep.run_block(self.index, self.fn_ref.original_forward, args, kwargs)


def install_lockstep(lockstep: LockStep, lead_model: torch.nn.Module, enabled: Callable[[], bool],
                     register: Callable[[torch.nn.Module, ModelHook, str], None]) -> None:
    """Hook the lead denoiser and its blocks; ``register(module, hook, suffix)`` installs each hook."""
    register(lead_model, DenoiserHook(lockstep, enabled), "denoiser")
    for index, block in enumerate(lockstep.lead):
        register(block.module, BlockHook(lockstep, index), "block")
