"""AFA on the U-Net (SD 1.5, SDXL), the paper's own case: the members' stages (each down block, the mid block,
each up block) run in lock-step on the mixed features.

The input of the first down block (the input convolution's output) is mixed first; after a down block every skip
feature it returns is mixed (its output is the last of them), so the up blocks read mixed skips; after the mid and
every up block the output is mixed. Each member's stages get its own time embedding (captured, with its input
features, by running its forward up to the first down block); the prompt embeddings are the lead's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lockstep import LockStep

STAGE_KINDS = ("down", "mid", "up")


@dataclass(frozen=True)
class Stage:
    """One stage of a U-Net, hooked like a block (``name`` and ``module`` as ``BlockInfo`` has them)."""

    name: str
    module: torch.nn.Module
    kind: str

    @property
    def mixed_outputs(self) -> int:
        """How many tensors a call's output holds to mix: a down block's skip features, else its one output."""
        if self.kind != "down":
            return 1
        return len(self.module.resnets) + (len(self.module.downsamplers) if self.module.downsamplers else 0)


def unet_stages(model: torch.nn.Module) -> list[Stage]:
    return ([Stage(f"down_blocks.{i}", block, "down") for i, block in enumerate(model.down_blocks)]
            + [Stage("mid_block", model.mid_block, "mid")]
            + [Stage(f"up_blocks.{i}", block, "up") for i, block in enumerate(model.up_blocks)])


def mixing_dims(model: torch.nn.Module) -> list[int]:
    """The channel count of each mixing point in order: the first stage's input, then each stage's outputs."""
    dims = [int(model.conv_in.out_channels)]
    for stage in unet_stages(model):
        dims += [int(stage.module.resnets[-1].out_channels)] * stage.mixed_outputs
    return dims


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _time_embedding(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["temb"] if "temb" in kwargs else args[1]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs or not args:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


def _substitute(value, old: torch.Tensor, new: torch.Tensor):
    """``value`` (nested tuples, lists, dicts) with every occurrence of the tensor ``old`` replaced by ``new``."""
    if value is old:
        return new
    if isinstance(value, dict):
        return {key: _substitute(item, old, new) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_substitute(item, old, new) for item in value)
    return value


class UNetLockStep(LockStep):
    """``lead`` and the members' stage lists are ``unet_stages``; mixing point offsets follow from them."""

    def __init__(self, aggregator, lead: list[Stage], members, condition_of) -> None:
        super().__init__(aggregator, lead, members, condition_of)
        self.offsets, point = [], 1
        for stage in lead:
            self.offsets.append(point)
            point += stage.mixed_outputs

    def run_block(self, index: int, original, args: tuple, kwargs: dict):
        stage = self.lead[index]
        calls = self.member_calls()
        hidden = _hidden(args, kwargs)
        if index == 0:  # the members' own input features are mixed first
            hidden = self.mix(0, [hidden] + [_hidden(*call) for call in calls])
        args, kwargs = _with_hidden(args, kwargs, hidden)
        lead_time = _time_embedding(args, kwargs)
        outputs = [original(*args, **kwargs)]
        for call, (_, stages) in zip(calls, self.members):
            member_args, member_kwargs = _substitute((args, kwargs), lead_time, _time_embedding(*call))
            outputs.append(stages[index].module(*member_args, **member_kwargs))
        offset = self.offsets[index]
        if stage.kind != "down":
            return self.mix(offset, outputs)
        skips = [output[1] for output in outputs]
        mixed = tuple(self.mix(offset + j, [skip[j] for skip in skips]) for j in range(len(skips[0])))
        position = next((j for j, skip in enumerate(outputs[0][1]) if skip is outputs[0][0]), None)
        if position is None or len(mixed) != stage.mixed_outputs:
            raise ValueError(f"AFA: {stage.name} ({type(stage.module).__name__}) returns an output that is not one "
                             "of its skip features; this U-Net's down blocks cannot be mixed.")
        return mixed[position], mixed
