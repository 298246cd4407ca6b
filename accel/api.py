"""``wrap``, ``unwrap``, ``summary``: the public verbs, and the per-instance pipeline-call wrapper.

A wrapped pipeline's ``__class__`` is switched to a subclass of its own class (same name, module and signature)
whose ``__call__`` runs the original inside ``PipelineContext.pipeline_call`` (``accel.hooks.attach_context``).
Only that instance changes: other pipelines of the same class, in this thread or another, keep the original class,
and ``unwrap`` switches back.
"""

from __future__ import annotations

import logging
from typing import Any

from accel.pipelines.adapters import adapter_for

from .config import AccelConfig
from .hooks import MethodScope, attach_context, context_of, detach_context
from .registry import calibrating, registered, resolve, spec_for, stacking_conflict, stacking_warning
from .summary import Summary

logger = logging.getLogger(__name__)


def _check_pipeline(pipe) -> None:
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise ValueError(f"accel wraps diffusers pipelines (DiffusionPipeline instances), got {type(pipe).__name__}.")


def wrap(pipe, methods: str | AccelConfig | list[str | AccelConfig], **overrides: Any):
    """Apply accelerators to this pipeline instance, in place, and return it.

    Args:
        pipe: a diffusers pipeline of a supported family (see ``accel.pipelines.adapters``).
        methods: a preset name (``"bac"``), a config object (``BACConfig(...)``), or a list of them to stack; or
            what ``accel.tune`` returned (its chosen stack, compiled if it was chosen compiled).
            An empty list installs only accel's step tracking, so ``accel.summary`` measures a plain run.
        **overrides: config fields to change, applied to every chosen config that has the field.

    Raises ``ValueError`` for an unknown name, a bad value, an unsupported family, a method applied twice, or
    methods that do not stack (``accel.registry.stacking_conflict``: the matrix is docs/benchmarks/stacking.md);
    after any error the pipeline is exactly as it was before the call.
    """
    _check_pipeline(pipe)
    compile_kwargs = None
    if callable(getattr(methods, "accel_stack", None)):  # accel.tune's result
        methods, compile_kwargs = methods.accel_stack()  # ValueError when nothing met its target
    configs = resolve(methods, overrides)
    context = context_of(pipe)
    adapter = context.adapter if context is not None else adapter_for(pipe)
    specs = [spec_for(config) for config in configs]
    for spec in specs:
        if not spec.supports_adapter(adapter):
            if adapter.inferred:
                structural = ", ".join(other.name for other in registered() if other.structural)
                raise ValueError(
                    f"{spec.name!r} needs a declared adapter; accel inferred {adapter.name!r} from the module tree "
                    f"(the structural fallback), which only these methods accept: {structural}."
                )
            raise ValueError(
                f"{spec.name!r} does not support the {adapter.name!r} family ({type(pipe).__name__}); "
                f"supported: {', '.join(spec.families or ())}."
            )
    if context is not None:
        applied_names = {scope.name for scope in context.scopes}
        again = [spec.name for spec in specs if spec.name in applied_names]
        if again:
            raise ValueError(f"{', '.join(again)} already applied to this pipeline; unwrap it first.")
    applied = [spec_for(scope.config) for scope in context.scopes if scope.config is not None] if context else []
    conflict = stacking_conflict(applied + specs)
    if conflict is not None:
        raise ValueError(conflict)
    caution = stacking_warning(applied + specs)
    if caution is not None:
        logger.warning(caution)

    created = context is None
    if created:
        context = attach_context(pipe, adapter)
    added: list[MethodScope] = []
    try:
        with context.changing("accel.wrap"):
            for spec, config in zip(specs, configs):
                scope = MethodScope(context, spec.name, config)
                added.append(scope)
                spec.apply(scope, config)
            context.scopes.extend(added)
            context.place_trackers_outermost()
            for scope in added:  # what cannot be undone (QuEST releasing float weights) runs once all applied
                scope.run_when_applied()
            if compile_kwargs is not None:
                for denoiser in context.denoisers.values():
                    denoiser.compile(**compile_kwargs)
    except BaseException:
        for scope in reversed(added):
            scope.remove()
        if created:
            detach_context(pipe)
        raise
    return pipe


def ensemble(pipes: list, aggregator=None):
    """``pipes[0]``, wrapped so that each of its calls runs every pipeline of ``pipes`` in lock-step, mixed block by
    block by ``aggregator`` (a folder ``accel.train_aggregator(...).save`` wrote, the ``Aggregator`` itself, or None
    for the members' plain mean): AFA (``accel.methods.afa``). Wrap it further with other accelerators as usual;
    ``accel.unwrap`` returns ``pipes[0]`` to itself."""
    from .methods.afa import AFAConfig

    pipes = list(pipes)
    if len(pipes) < 2:
        raise ValueError(f"An ensemble needs 2 or more pipelines, got {len(pipes)}.")
    return wrap(pipes[0], AFAConfig(members=pipes[1:], aggregator=aggregator))


def calibrate(pipe, method: str | AccelConfig, inputs, *, num_inference_steps: int, progress: bool = True,
              **overrides: Any):
    """Run a method's offline calibration on ``pipe`` and return its artifact (BAC: a ``BACSchedule``; QuEST: a
    ``QuESTArtifact``).

    Args:
        pipe: the pipeline to calibrate, unwrapped or wrapped with other methods (they stay applied while it runs).
        method: a preset name or config of a method that calibrates (``"bac"``, ``"quest-w4a8"``, ``BACConfig(...)``).
        inputs: a dict of call arguments for ``pipe`` or a list of them; each runs one pipeline call.
        num_inference_steps: the step count the artifact is for.
        progress: show a progress bar.
        **overrides: config fields to change (``budget=0.3``).
    """
    _check_pipeline(pipe)
    configs = resolve(method, overrides)
    if len(configs) != 1:
        raise ValueError("calibrate takes one method at a time.")
    spec = spec_for(configs[0])
    if spec.calibrate is None:
        names = sorted(other.name for other in calibrating())
        raise ValueError(f"{spec.name!r} has no calibration; methods that calibrate: {', '.join(names)}.")
    return spec.calibrate(pipe, configs[0], inputs, num_inference_steps=num_inference_steps, progress=progress)


def wrap_calibrated(pipe, methods, calibration_inputs, *, num_inference_steps: int, **overrides: Any):
    """``wrap`` after calibrating every chosen method that has an offline pass (BAC) on ``pipe`` with
    ``calibration_inputs`` (call kwargs without the steps, or a list of them) for ``num_inference_steps``.

    Methods without calibration are applied as given. Use inputs (seeds) that the measured calls never use.
    """
    configs = []
    for config in resolve(methods, overrides):
        spec = spec_for(config)
        if spec.calibrate is not None:
            artifact = calibrate(pipe, config, calibration_inputs, num_inference_steps=num_inference_steps,
                                 progress=False)
            config = config.replace(**{spec.artifact_field: artifact})
        configs.append(config)
    return wrap(pipe, configs)


def unwrap(pipe):
    """Remove everything accel applied to this pipeline; its output is then bit-identical to a never-wrapped one.

    A pipeline that is not wrapped is returned unchanged. ``ValueError`` (and nothing changed) when a method made
    the change final (QuEST with ``release_originals=True``); the message says how to get the original back.
    """
    _check_pipeline(pipe)
    context = context_of(pipe)
    if context is None:
        return pipe
    refusals = [scope.unwrap_refusal for scope in context.scopes if scope.unwrap_refusal]
    if refusals:
        raise ValueError(" ".join(refusals))
    with context.changing("accel.unwrap"):
        detach_context(pipe)
    return pipe


def is_wrapped(pipe) -> bool:
    return context_of(pipe) is not None


def summary(pipe) -> Summary:
    """What accel applied to ``pipe`` and, for its last call, per step and CFG branch what was computed vs reused."""
    _check_pipeline(pipe)
    context = context_of(pipe)
    if context is None:
        raise ValueError(f"This {type(pipe).__name__} is not wrapped by accel; call accel.wrap(pipe, ...) first.")
    return Summary(
        family=context.family,
        methods=[scope.config.to_dict() for scope in context.scopes if scope.config is not None],
        steps=list(context.last_call),
        extras={scope.name: dict(scope.extras) for scope in context.scopes if scope.extras},
    )
