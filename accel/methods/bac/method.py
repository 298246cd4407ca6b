"""BAC's runtime: the config, the per-branch and per-block hooks that reuse (or forecast) a branch's output on its
non-update steps, and ``install_bac``. The package docstring (``accel.methods.bac``) says what and why."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, NamedTuple

import torch
from diffusers.hooks import ModelHook

from accel.config import AccelConfig, check_bool, check_choice, check_float, check_int
from accel.hooks import BranchStates, MethodScope, SpanMember
from accel.pipelines.adapters import BlockInfo

from .schedule import BACSchedule, branch_names
from .solvers import uniform_updates

logger = logging.getLogger("accel.methods.bac")

_BAC_HOOK = "branch"

_BLOCK_HOOK = "block"

METRICS = {
    "cosine": "cosine similarity of flattened branch outputs, mean over samples and CFG branches",
    "l2": "squared L2 error of each reused output under the reuse rule in force (last update, or the forecast from "
          "the last two), mean over samples, summed over CFG branches",
    "sensitivity": "squared first-order change of the final sample that each reused output's error makes under the "
                   "reuse rule in force, from random projections of the final sample's gradient, summed over "
                   "samples and projections",
}


@dataclasses.dataclass


class BACConfig(AccelConfig):
    """Configuration of BAC (arXiv 2506.13456).

    Args:
        budget: the share of the steps on which each branch is recomputed, ``M = max(1, round(budget * steps))``
            (1.0 computes everything). Used by ``accel.calibrate`` and by the uncalibrated fallback.
        top_k: how many of the most volatile branches get the Bubbling Union (0 turns it off).
        schedule: a calibrated ``BACSchedule``, or the path of its JSON file or its ``to_dict()``, read into one
            when the config is made, used for calls with its step count.
        calibrate: on the first call with a step count no schedule covers, calibrate on that call's inputs
            (``accel.calibrate``'s pass, with its progress bar) and keep the schedule for the pipeline and on disk
            (``accel.methods.bac.cache``: keyed by model, weights, scheduler, steps and these settings), so later
            calls and processes reuse it. ``False``: such calls update evenly spaced steps, with a warning.
        forecast: 0 reuses a branch's last update output (the paper); 1 extrapolates linearly from its last two
            updates (package docstring).
        forecast_gain: with ``forecast=1``, the share of the linear extrapolation a reused branch takes (ours):
            ``y_b + gain * (t - b) / (b - a) * (y_b - y_a)``. 1.0 is the plain first-order forecast; below 1 damps
            it toward the last update. Calibration places the updates for the forecast with this gain.
        compute_final_step: make the last step an update of every branch (package docstring); ``False``
            follows the paper.
        skip_reused_blocks: a block all of whose branches are reused on a step does not run; its output is its
            input plus the reused outputs under the step's gates (package docstring). ``False`` runs the
            block's norms and modulation anyway, as the paper does; the output is the same bit for bit.
        metric: what the calibration's dynamic program optimises. ``"cosine"`` (the paper): the summed cosine
            similarity between each update's output and the outputs of the steps that reuse it. ``"l2"`` (ours): the
            summed squared L2 error of what each reused step returns, under the reuse rule in force, so with
            ``forecast=1`` the program places the updates for the forecast (package docstring).
            ``"sensitivity"`` (ours): the same errors, each measured by the first-order change it makes to the final
            sample; calibration then runs with gradients, and holds the autograd graph of a whole call.
        per_block: every branch of a block shares one schedule, chosen for the sum of their objectives (ours), so a
            block whose branches are reused is skipped whole (``skip_reused_blocks``); ``False`` gives each branch
            its own, as the paper does.
        share_budget: the groups (blocks with ``per_block``, else branches) share ``M`` updates each among them,
            by least summed error (ours; needs ``metric="l2"`` or ``"sensitivity"``), instead of taking ``M`` each.
        projections: with ``metric="sensitivity"``, how many random projections of each calibration call's final
            sample are differentiated (one backward pass each through the whole sampling run).
    """

    method = "bac"
    budget: float = 0.4
    top_k: int = 4
    schedule: BACSchedule | str | dict | None = None
    calibrate: bool = True
    forecast: int = 0
    forecast_gain: float = 1.0
    compute_final_step: bool = True
    skip_reused_blocks: bool = True
    metric: str = "cosine"
    per_block: bool = False
    share_budget: bool = False
    projections: int = 16

    def validate(self) -> None:
        check_float("budget", self.budget, minimum=0.0, maximum=1.0, open_min=True)
        check_int("top_k", self.top_k, minimum=0)
        check_int("forecast", self.forecast, minimum=0, maximum=1)
        check_float("forecast_gain", self.forecast_gain, minimum=0.0, maximum=2.0, open_min=True)
        if self.forecast_gain != 1.0 and not self.forecast:
            raise ValueError(f"forecast_gain={self.forecast_gain!r} scales the forecast; it needs forecast=1 "
                             "(forecast=0 reuses the last update as it is).")
        check_bool("calibrate", self.calibrate)
        check_bool("compute_final_step", self.compute_final_step)
        check_bool("skip_reused_blocks", self.skip_reused_blocks)
        check_bool("per_block", self.per_block)
        check_bool("share_budget", self.share_budget)
        check_choice("metric", self.metric, tuple(METRICS))
        check_int("projections", self.projections, minimum=1)
        if self.share_budget and self.metric == "cosine":
            raise ValueError("share_budget=True compares errors across blocks; it needs metric='l2' or 'sensitivity'.")
        if isinstance(self.schedule, os.PathLike):
            self.schedule = os.fspath(self.schedule)
        # a missing or corrupt schedule fails here, before any pipeline is touched; from here on it is an object
        if isinstance(self.schedule, str):
            self.schedule = BACSchedule.load(self.schedule)
        elif isinstance(self.schedule, dict):
            self.schedule = BACSchedule.from_dict(self.schedule)
        elif self.schedule is not None and not isinstance(self.schedule, BACSchedule):
            raise ValueError(
                f"schedule={self.schedule!r} is not accepted; pass a BACSchedule, its to_dict(), the path of its JSON "
                "file, or None."
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON values; the schedule as its ``to_dict()``."""
        data = super().to_dict()
        data["schedule"] = self.schedule.to_dict() if self.schedule is not None else None
        return data


class BACState:
    """Per-call state: the update steps in force for this call (the same for every denoiser and CFG branch)."""

    def reset(self) -> None:
        self.updates: dict[str, frozenset[int]] | None = None
        self.stores: dict[str, frozenset[int]] = {}  # update steps whose output a later step reuses
        self.schedule_used: str | None = None


@dataclasses.dataclass
class CachedOutput:
    """A branch's held outputs for one denoiser and CFG branch: the last update's, or the last two to forecast."""

    input_shape: tuple
    history: list[tuple[int, Any]]  # [(step, output)], oldest first


class Reuse(NamedTuple):
    """What a reused branch returns at ``step``: made from its held outputs."""

    step: int
    history: list[tuple[int, Any]]

    @property
    def forecasts(self) -> bool:
        """Whether the reuse extrapolates the last two updates (a new tensor) rather than return the held output."""
        return len(self.history) == 2


def _input_shape(args: tuple, kwargs: dict) -> tuple:
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    return tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else ()


class BACBranchHook(ModelHook):
    """On each branch module. The decision and the bookkeeping sit in ``torch.compiler.disable`` helpers."""

    def __init__(self, scope: MethodScope, state: BACState, caches: BranchStates[dict[str, CachedOutput]],
                 plan: BACPlan, denoiser: str, name: str) -> None:
        super().__init__()
        self.scope, self.state, self.caches, self.plan = scope, state, caches, plan
        self.denoiser, self.name = denoiser, name

    def new_forward(self, module, *args, **kwargs):
        shape = _input_shape(args, kwargs)
        cache, reuse = self.lookup(shape)
        if reuse is not None:
            return self.reused_output(reuse)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if cache is not None:
            self._store(cache, shape, output)
        return output

    def will_compute(self, module) -> bool:
        """Whether this forward computes the branch for sure (a compiled denoiser's ``BlockSpans`` look ahead)."""
        info = self.scope.current if self.scope.is_active() else None
        if info is None or info.denoiser != self.denoiser:
            return True
        updates = self.plan.updates_for_call(self.state, info.num_steps)
        return updates is None or info.step in updates[self.name]

    def computed_in_span(self, module, args, kwargs, output) -> None:
        """Book a forward a compiled span computed for this branch: what ``new_forward`` does after computing."""
        shape = _input_shape(args, kwargs)
        cache, reuse = self.lookup(shape)
        if reuse is not None:
            raise RuntimeError(f"BAC: a span computed {self.name}, which this step reuses.")  # will_compute said no
        if cache is not None:
            self._store(cache, shape, output)

    @torch.compiler.disable
    def lookup(self, shape: tuple) -> tuple[dict[str, CachedOutput] | None, Reuse | None]:
        """(the cache to store this forward's output in, or None; the reuse, or None to compute) for this forward."""
        info = self.scope.current if self.scope.is_active() else None
        if info is None or info.denoiser != self.denoiser:
            return None, None
        updates = self.plan.updates_for_call(self.state, info.num_steps)
        if updates is None:
            return None, None
        cache = self.caches.get(info)
        if info.step in updates[self.name]:
            # Keep the output only if a later step reads it: holding tensors nobody reads costs memory and time.
            return (cache if info.step in self.state.stores[self.name] else None), None
        stored = cache.get(self.name)
        if stored is None or stored.input_shape != shape:
            return cache, None
        return cache, Reuse(info.step, stored.history)

    def reused_output(self, reuse: Reuse):
        """The last update's output, or with ``forecast=1`` the extrapolation of the last two."""
        if reuse.forecasts:
            (earlier, older), (last, newest) = reuse.history
            return _extrapolate(older, newest, self.plan.config.forecast_gain * (reuse.step - last) / (last - earlier))
        return reuse.history[-1][1]

    @torch.compiler.disable
    def _store(self, cache: dict[str, CachedOutput], shape: tuple, output) -> None:
        stored = cache.get(self.name)
        history = stored.history if stored is not None and stored.input_shape == shape else []
        keep = 2 if self.plan.config.forecast else 1
        if len(history) == keep and _same_layout(history[0][1], output):
            # Copy into the tensor this store drops instead of holding a new one: the cache then keeps the same
            # memory all call long. Holding each new output made the allocator map fresh pages step after step.
            output = history[0][1].copy_(output)
        cache[self.name] = CachedOutput(shape, [*history, (self.scope.current.step, output)][-keep:])


def _same_layout(held, output) -> bool:
    return (isinstance(held, torch.Tensor) and isinstance(output, torch.Tensor) and held.shape == output.shape
            and held.dtype == output.dtype and held.device == output.device and held.stride() == output.stride())


class BACBlockHook(ModelHook):
    """On each block with a residual rule (``accel.pipelines.adapters.ResidualRule``), when ``skip_reused_blocks``.

    When every branch of the block is reused this step, the block does not run: its output is its input plus each
    reused output under the current step's gate, bit-identical to what the block itself would return. Its norms and
    input modulation only feed the branches, and they are a fifth of a computed block's time on ``digits-dit``.
    """

    def __init__(self, scope: MethodScope, block: BlockInfo, branch_hooks: dict[str, BACBranchHook]) -> None:
        super().__init__()
        self.scope, self.block, self.branch_hooks = scope, block, branch_hooks
        self.rule = block.residual_rule

    def new_forward(self, module, *args, **kwargs):
        # A span of reused blocks that an earlier block started holds this block's output: this hook decided the
        # reuse when the span looked ahead, and nothing it reads (the step, the branches' held outputs) has changed.
        output = self.scope.held_span_output(module, args, kwargs)
        if output is not None:
            return output
        reuses = self._reuses(module, args, kwargs)
        if reuses is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        # under a denoiser compiled whole, the reused blocks that follow this one combine in the same graph
        output = self.scope.span_output(module, lambda: self._replacement(reuses), args, kwargs)
        if output is not None:
            return output
        replacement = self._replacement(reuses)
        return self.scope.compiled_like(module, self.rule.combine)(module, args, kwargs, *replacement.extra)

    def _replacement(self, reuses: dict[str, Reuse]) -> SpanMember:
        """The block's output as the residual rule's ``combine`` makes it from the reused branch outputs."""
        # The forecasts are made here, outside any graph: traced, their step-dependent ratio became a symbolic float
        # that inductor's range analysis rejected (docs/methods/compile.md).
        outputs = {kind: self.branch_hooks[kind].reused_output(reuse) for kind, reuse in reuses.items()}
        # a forecast is a tensor made for this step alone (the extrapolation of the last two updates); the rule may
        # gate it in place. A plainly reused output is the cache's own tensor.
        owned = frozenset(kind for kind, reuse in reuses.items() if reuse.forecasts)
        return SpanMember("replaced", self.rule.combine, (outputs, owned))

    def will_compute(self, module) -> bool:
        """Whether this forward runs the block with every branch computed (``BlockSpans`` look ahead with it)."""
        return all(hook.will_compute(module) for hook in self.branch_hooks.values())

    def span_replacement(self, module, args, kwargs) -> SpanMember | None:
        """This block's member of a span of reused blocks, if every branch is reused in this forward."""
        reuses = self._reuses(module, args, kwargs)
        return None if reuses is None else self._replacement(reuses)

    @torch.compiler.disable
    def _reuses(self, module, args, kwargs) -> dict[str, Reuse] | None:
        """Each branch's reuse, if every branch of the block is reused this forward and the rule covers it."""
        if not self.scope.is_active() or not self.rule.covers(module, args, kwargs):
            return None
        shape = _input_shape(args, kwargs)
        reuses = {}
        for kind, hook in self.branch_hooks.items():
            _, reuse = hook.lookup(shape)
            if reuse is None:
                return None
            reuses[kind] = reuse
        return reuses


def _extrapolate(older, newest, ratio: float):
    """``newest + ratio * (newest - older)`` for a tensor or each tensor of a tuple (other entries: newest's)."""
    if isinstance(newest, torch.Tensor):
        return torch.lerp(older, newest, 1 + ratio)
    return type(newest)(_extrapolate(a, b, ratio) if isinstance(b, torch.Tensor) else b for a, b in zip(older, newest))


class BACPlan:
    """The update steps of a wrapped pipeline: the schedule for the call's step count (given, or calibrated on a
    first call, ``accel.methods.bac.auto``), else evenly spaced."""

    def __init__(self, scope: MethodScope, config: BACConfig, schedule: BACSchedule | None, names: list[str]) -> None:
        self.scope, self.config, self.names = scope, config, names
        self.schedules: dict[int, BACSchedule] = {}
        if schedule is not None:
            self.schedules[schedule.num_inference_steps] = schedule
        self.passive = False  # True while BAC's own calibration runs the pipeline: every branch computes

    @torch.compiler.disable
    def updates_for_call(self, state: BACState, num_steps: int | None) -> dict[str, frozenset[int]] | None:
        if self.passive or state.updates is not None or num_steps is None:
            return state.updates
        schedule = self.schedules.get(num_steps)
        if schedule is not None:
            schedule.check_scheduler(self.scope.pipe.scheduler)  # it may have been swapped since it was made
            state.updates = {name: frozenset(steps) for name, steps in schedule.updates.items()}
            state.schedule_used = "calibrated"
            self.scope.extras.update(calibrated_for_steps=num_steps, calibration=schedule.metadata)
        else:
            steps = frozenset(uniform_updates(num_steps, self.config.budget, self.config.compute_final_step))
            state.updates = {name: steps for name in self.names}
            state.schedule_used = "uniform"
            if self.schedules:
                logger.warning(
                    "BAC: the schedule was calibrated for %s steps but this call runs %d; using %d evenly spaced "
                    "updates per branch instead. Calibrate for %d steps with accel.calibrate(pipe, 'bac', inputs, "
                    "num_inference_steps=%d), or wrap with calibrate=True.",
                    "/".join(map(str, sorted(self.schedules))), num_steps, len(steps), num_steps, num_steps,
                )
        # forecasting reads the last two updates before a reuse, so it keeps every update's output
        state.stores = {
            name: frozenset(steps if self.config.forecast else _steps_reused_after(sorted(steps), num_steps))
            for name, steps in state.updates.items()
        }
        self.scope.extras.update(
            schedule=state.schedule_used, num_inference_steps=num_steps,
            branch_steps_computed_share=sum(map(len, state.updates.values())) / (len(state.updates) * num_steps),
        )
        return state.updates


def _steps_reused_after(updates: list[int], num_steps: int) -> list[int]:
    """The update steps followed by at least one non-update step before the next update (or the end)."""
    following = [*updates[1:], num_steps]
    return [step for step, next_update in zip(updates, following) if next_update > step + 1]


def install_bac(scope: MethodScope, config: BACConfig) -> BACPlan:
    """Install BAC's hooks on every branch of every block of the pipeline behind ``scope``; return its plan."""
    schedule = config.schedule
    branches = branch_names(scope)
    if schedule is not None:
        schedule.check_matches(scope)
        scope.extras.update(calibrated_for_steps=schedule.num_inference_steps, calibration=schedule.metadata)
    elif not config.calibrate:
        logger.warning(
            "BAC has no calibrated schedule and calibrate=False: each branch updates on %.0f%% of the steps, evenly "
            "spaced. For the adaptive schedule wrap with calibrate=True (the first call calibrates), or pass "
            "schedule=accel.calibrate(pipe, 'bac', inputs, num_inference_steps=...).", 100 * config.budget,
        )
        scope.extras.update(schedule="uniform")
    state = scope.add_state(BACState())
    caches = scope.add_branch_states(dict)
    plan = BACPlan(scope, config, schedule, list(branches))
    hooks_by_block: dict[tuple[str, int], dict[str, BACBranchHook]] = {}
    for name, (denoiser, index, kind, module) in branches.items():
        hook = BACBranchHook(scope, state, caches, plan, denoiser, name)
        scope.register_hook(module, hook, f"{_BAC_HOOK}.{name}")
        hooks_by_block.setdefault((denoiser, index), {})[kind] = hook
    if not config.skip_reused_blocks:
        return plan
    for denoiser, blocks in scope.blocks.items():
        for block in blocks:
            hooks = hooks_by_block.get((denoiser, block.index))
            # A block hook of a method wrapped before BAC would sit inside this one, and it must see every forward.
            if block.residual_rule is not None and hooks and scope.only_counted(block.module):
                scope.register_hook(block.module, BACBlockHook(scope, block, hooks),
                                    f"{_BLOCK_HOOK}.{denoiser}.{block.name}")
    return plan
