"""AFA's runtime: the config, ``apply_afa`` (check the members, load the aggregator, hook the lead's blocks),
``ensemble`` and the registration. The package docstring (``accel.methods.afa``) says what and why."""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from accel.config import AccelConfig
from accel.hooks import MethodScope, context_of
from accel.pipelines.adapters import ADAPTERS, FamilyAdapter, adapter_for
from accel.registry import register_accelerator

from ..trained import model_fingerprint
from .aggregator import Aggregator
from .lockstep import LockStep, install_lockstep
from .unet import UNetLockStep, mixing_dims, unet_stages

# Families with more than one kind of block (Flux's dual- and single-stream) call them with other arguments, which
# the captured first-block arguments cannot serve; the U-Net runs by stages (accel.methods.afa.unet).
GUIDANCE_MIXES = ("shared", "per-branch")
FAMILIES = tuple(adapter.name for adapter in ADAPTERS
                 if adapter.name == "unet" or (adapter.sequential_blocks and len(adapter.block_groups) == 1))


@dataclasses.dataclass
class AFAConfig(AccelConfig):
    """Configuration of AFA ensembling (arXiv 2405.17082).

    Args:
        members: the other pipelines of the ensemble (the wrapped pipeline is the first member), same denoiser
            architecture, not wrapped themselves; required. Not saved with the config (pipelines are not JSON).
        aggregator: the folder an aggregator was saved to (``accel.train_aggregator(...).save(dir)``), the
            ``Aggregator`` itself, or None for the untrained ensemble (the members' mean after every block).
        guidance_mix: ``"shared"`` (default): under classifier-free guidance the unconditional branch is mixed
            with the conditional branch's weights (same sample, step and mixing point), so the two predictions
            guidance combines come from one mixed model. ``"per-branch"``: each branch is mixed by its own
            condition, the null one included (the paper).
    """

    method = "afa"
    members: list[Any] | None = None
    aggregator: str | Aggregator | None = None
    guidance_mix: str = "shared"

    def validate(self) -> None:
        if self.guidance_mix not in GUIDANCE_MIXES:
            raise ValueError(f"guidance_mix={self.guidance_mix!r} is not accepted; one of "
                             f"{', '.join(repr(m) for m in GUIDANCE_MIXES)}.")
        if isinstance(self.aggregator, os.PathLike):
            self.aggregator = os.fspath(self.aggregator)
        if self.aggregator is not None and not isinstance(self.aggregator, (str, Aggregator)):
            raise ValueError(f"aggregator={self.aggregator!r} is not accepted; pass the folder an aggregator was "
                             "saved to, the Aggregator accel.train_aggregator returned, or None (the plain mean).")
        if isinstance(self.aggregator, str):
            Aggregator.read_card(self.aggregator)
        if self.members is not None:
            if isinstance(self.members, (str, bytes)) or not hasattr(self.members, "__iter__"):
                raise ValueError(f"members must be a list of pipelines, got {type(self.members).__name__}.")
            self.members = list(self.members)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["members"] = None  # pipelines are not JSON; pass them again when loading
        if isinstance(self.aggregator, Aggregator):
            data["aggregator"] = None  # the tensors are saved with aggregator.save
        return data


def condition_of(adapter: FamilyAdapter) -> Any:
    """The function that picks the aggregator's condition out of a denoiser call: the class labels of a
    class-conditioned family, the ``encoder_hidden_states`` otherwise."""
    name = "class_labels" if adapter.conditioning == "class" else "encoder_hidden_states"

    def pick(arguments: dict):
        if arguments.get(name) is None:
            raise ValueError(f"AFA's aggregator reads the denoiser call's {name!r}; this call passes none.")
        return arguments[name]

    return pick


def member_models(pipe, members: list, adapter: FamilyAdapter) -> list[torch.nn.Module]:
    """The members' denoisers, checked: distinct, not wrapped, same class and config as ``pipe``'s."""
    from diffusers import DiffusionPipeline

    if not members:
        raise ValueError("AFA needs members=[pipe_b, ...]: one or more other pipelines of the same architecture "
                         "(accel.ensemble([pipe_a, pipe_b, ...], aggregator=dir)).")
    denoisers = adapter.denoisers(pipe)
    if len(denoisers) != 1:
        raise ValueError(f"AFA ensembles pipelines with one denoiser; {type(pipe).__name__} has "
                         f"{', '.join(denoisers)} (two experts by noise level).")
    lead = next(iter(denoisers.values()))
    models = []
    for position, member in enumerate(members, start=2):
        if not isinstance(member, DiffusionPipeline):
            raise ValueError(f"Member {position} is a {type(member).__name__}; members are diffusers pipelines.")
        if adapter_for(member).name != adapter.name:
            raise ValueError(f"Member {position} is a {type(member).__name__} ({adapter_for(member).name}); AFA "
                             f"mixes same-architecture denoisers ({adapter.name}).")
        model = adapter.denoisers(member)[next(iter(adapter.denoisers(pipe)))]
        if model is lead or any(model is other for other in models):
            raise ValueError(f"Member {position} shares its denoiser with another member; pass distinct pipelines.")
        if context_of(member) is not None:
            raise ValueError(f"Member {position} is wrapped by accel; pass unwrapped members (wrap the ensemble).")
        if model_fingerprint(model)["config"] != model_fingerprint(lead)["config"]:
            raise ValueError(f"Member {position}'s {type(model).__name__} has another config than the first "
                             "member's; AFA mixes denoisers of one architecture (same class and config).")
        lead_parameter, parameter = next(lead.parameters()), next(model.parameters())
        if (lead_parameter.device, lead_parameter.dtype) != (parameter.device, parameter.dtype):
            raise ValueError(f"Member {position} is on {parameter.device} in {parameter.dtype}, the first on "
                             f"{lead_parameter.device} in {lead_parameter.dtype}; put them on one device and dtype.")
        models.append(model)
    return models


def check_aggregator(card: dict, lead: torch.nn.Module, models: list[torch.nn.Module], points: int) -> None:
    """The aggregator was trained for these members, in this order (a clear error otherwise)."""
    if card.get("members") != 1 + len(models) or card.get("points") != points:
        raise ValueError(f"The aggregator mixes {card.get('members')} members at {card.get('points')} points; this "
                         f"ensemble has {1 + len(models)} members and {points} points.")
    trained_for = card.get("member_fingerprints")
    if trained_for is not None:
        now = [model_fingerprint(model)["weights_sha256"] for model in [lead, *models]]
        if [entry["weights_sha256"] for entry in trained_for] != now:
            raise ValueError("The aggregator was trained for other member weights (or another member order); "
                             "pass the members it was trained with, in the same order.")


def units(adapter: FamilyAdapter, model: torch.nn.Module) -> list:
    """What runs in lock-step: the blocks of a DiT family, the stages of a U-Net."""
    return unet_stages(model) if adapter.name == "unet" else adapter.blocks(model)


def mixing_points(adapter: FamilyAdapter, model: torch.nn.Module) -> int:
    return len(mixing_dims(model)) if adapter.name == "unet" else len(adapter.blocks(model)) + 1


def make_lockstep(adapter: FamilyAdapter, lead: torch.nn.Module, models: list[torch.nn.Module],
                  aggregator: Aggregator | None) -> LockStep:
    kind = UNetLockStep if adapter.name == "unet" else LockStep
    return kind(aggregator, units(adapter, lead), [(model, units(adapter, model)) for model in models],
                condition_of(adapter))


def build_lockstep(pipe, adapter: FamilyAdapter, members: list, aggregator) -> tuple[LockStep, torch.nn.Module]:
    """The lock-step runtime for ``pipe`` (the lead) and ``members``; ``aggregator`` is an Aggregator, a folder
    or None."""
    lead = adapter.denoisers(pipe)[next(iter(adapter.denoisers(pipe)))]
    models = member_models(pipe, members, adapter)
    if isinstance(aggregator, (str, Path)):
        aggregator = Aggregator.load(aggregator)
    if aggregator is not None:
        check_aggregator(aggregator.card, lead, models, mixing_points(adapter, lead))
        aggregator = aggregator.to(next(lead.parameters()).device)
    return make_lockstep(adapter, lead, models, aggregator), lead


def apply_afa(scope: MethodScope, config: AFAConfig) -> None:
    """Hook the wrapped pipeline's denoiser so that its blocks run in lock-step with the members'. That AFA comes
    first is the stacking rule of its role (``accel.registry.stacking_conflict``), checked before anything applies."""
    lockstep, lead = build_lockstep(scope.pipe, scope.adapter, config.members or [], config.aggregator)
    scope.add_state(lockstep.state)
    scope.add_state(lockstep.conditional_weights)
    install_lockstep(lockstep, lead, scope.is_active, scope.register_hook)
    if config.guidance_mix == "shared":
        adapter, pipe = scope.adapter, scope.pipe
        scope.before_each_call(lambda arguments: lockstep.guide(
            guided(pipe, arguments), adapter.cfg_batch_order if adapter.cfg == "batched" else None,
            lambda: scope.current))
    scope.extras.update(members=1 + len(lockstep.members), trained=lockstep.aggregator is not None,
                        guidance_mix=config.guidance_mix)


def guided(pipe, arguments: dict) -> bool:
    """Whether a call runs classifier-free guidance: its ``guidance_scale`` (the pipeline's default when not
    passed) above 1, the rule of every diffusers pipeline that has one."""
    scale = arguments.get("guidance_scale")
    if scale is None:
        base = type(pipe).__dict__.get("_accel_base_class", type(pipe))
        parameter = inspect.signature(base.__call__).parameters.get("guidance_scale")
        scale = None if parameter is None else parameter.default
    return isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 1


register_accelerator(
    AFAConfig,
    apply_afa,
    description="AFA: same-architecture denoisers run in lock-step, mixed after every block by a trained aggregator",
    families=FAMILIES,
    trained_with="accel.train_aggregator",
    role="ensembling",
)
