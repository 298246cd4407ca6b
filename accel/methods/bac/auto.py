"""BAC's first-call calibration: ``accel.wrap(pipe, "bac")`` with no schedule calibrates on the first call of each
step count, on that call's own inputs, and keeps the schedule (on the pipeline, and on disk through ``cache``).

The calibration runs before the call, outside it, with BAC's hooks passive: the uncached run it records is the
plain pipeline's (with any other method stacked on it applied, as ``accel.calibrate`` does). It leaves the call's
generators untouched, so the first call returns what every later call with the same seed returns.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from accel.hooks import MethodScope

from . import cache
from .calibration import calibrate_bac
from .method import BACConfig, BACPlan, install_bac

logger = logging.getLogger("accel.methods.bac")

# call arguments that are not inputs: a calibration pass must not run the user's callbacks
NOT_INPUTS = ("num_inference_steps", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "callback",
              "callback_steps")
CUSTOM_STEPS = ("timesteps", "sigmas")


def steps_of_call(pipe, arguments: dict[str, Any]) -> int | None:
    """The call's ``num_inference_steps`` (given, or the pipeline's default); ``None`` when it sets its own
    timesteps or sigmas, or its ``__call__`` has no such parameter."""
    if any(arguments.get(name) is not None for name in CUSTOM_STEPS):
        return None
    steps = arguments.get("num_inference_steps")
    if steps is None:
        base = type(pipe).__dict__.get("_accel_base_class", type(pipe))
        parameter = inspect.signature(base.__call__).parameters.get("num_inference_steps")
        steps = None if parameter is None else parameter.default
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1 else None


class FirstCallCalibration:
    """Before each call: if no schedule covers the call's step count, load one from the disk cache or calibrate."""

    def __init__(self, scope: MethodScope, config: BACConfig, plan: BACPlan) -> None:
        self.scope, self.config, self.plan = scope, config, plan
        self.warned_custom_steps = False

    def __call__(self, arguments: dict[str, Any]) -> None:
        if self.plan.passive:
            return  # a call made by the calibration itself
        pipe = self.scope.pipe
        steps = steps_of_call(pipe, arguments)
        if steps is None:
            if not self.warned_custom_steps:
                logger.warning("BAC: this call sets its own timesteps or sigmas, which a first-call calibration does "
                               "not cover; it updates evenly spaced steps. Pass schedule=accel.calibrate(...).")
                self.warned_custom_steps = True
            return
        if steps in self.plan.schedules:
            return
        key = cache.schedule_key(self.scope, self.config, steps)
        schedule = cache.load(key, self.scope)
        if schedule is None:
            logger.warning(
                "BAC: calibrating for %d steps on this call's inputs, once per model, scheduler and step count "
                "(the schedule is cached in %s; wrap with schedule=... or calibrate=False to choose otherwise).",
                steps, cache.cache_dir())
            inputs = {name: value for name, value in arguments.items() if name not in NOT_INPUTS}
            self.plan.passive = True
            try:
                schedule = calibrate_bac(pipe, self.config, inputs, num_inference_steps=steps, _bac_passive=True)
            finally:
                self.plan.passive = False
            cache.store(key, schedule)
        self.plan.schedules[steps] = schedule


def apply_bac(scope: MethodScope, config: BACConfig) -> None:
    """Install BAC (``method.install_bac``) and, with ``config.calibrate``, its first-call calibration."""
    plan = install_bac(scope, config)
    if config.calibrate:
        scope.before_each_call(FirstCallCalibration(scope, config, plan))
