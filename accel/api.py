"""``wrap``, ``unwrap``, ``summary``: the public verbs, and the per-instance pipeline-call wrapper.

A wrapped pipeline's ``__class__`` is switched to a subclass of its own class (same name, module and signature)
whose ``__call__`` runs the original inside ``PipelineContext.pipeline_call``. Only that instance changes: other
pipelines of the same class, in this thread or another, keep the original class, and ``unwrap`` switches back.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

from accel.pipelines.adapters import adapter_for

from .config import AccelConfig
from .hooks import MethodScope, PipelineContext
from .registry import AcceleratorSpec, resolve, spec_for
from .summary import Summary

_CONTEXT_ATTR = "_accel_context"
_WRAPPED_CLASSES: dict[tuple[type, str], type] = {}
_CLASS_LOCK = threading.Lock()


def call_wrapping_class(cls: type, attr: str) -> type:
    """A subclass of ``cls`` (same name, module, docstring and ``__call__`` signature) whose ``__call__`` runs the
    original inside ``self.__dict__[attr].pipeline_call()`` when the instance holds that attribute.

    Switching one instance's ``__class__`` to it changes that instance only; switch back to
    ``type(pipe)._accel_base_class`` to undo. accel's own wrapper uses it, and so can other per-instance patches
    (the benchmark's peers), each with its own ``attr``.
    """
    if cls.__dict__.get("_accel_call_attr") == attr:
        return cls
    with _CLASS_LOCK:
        wrapped = _WRAPPED_CLASSES.get((cls, attr))
        if wrapped is None:
            original_call = cls.__call__

            def __call__(self, *args, **kwargs):
                owner = self.__dict__.get(attr)
                if owner is None:
                    return original_call(self, *args, **kwargs)
                with owner.pipeline_call():
                    return original_call(self, *args, **kwargs)

            functools.update_wrapper(__call__, original_call)
            namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                         "__doc__": cls.__doc__, "_accel_base_class": cls, "_accel_call_attr": attr}
            wrapped = _WRAPPED_CLASSES[(cls, attr)] = type(cls.__name__, (cls,), namespace)
        return wrapped


def _wrapped_class(cls: type) -> type:
    return call_wrapping_class(cls, _CONTEXT_ATTR)


def _context(pipe) -> PipelineContext | None:
    return getattr(pipe, "__dict__", {}).get(_CONTEXT_ATTR)


def _check_pipeline(pipe) -> None:
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise ValueError(f"accel wraps diffusers pipelines (DiffusionPipeline instances), got {type(pipe).__name__}.")


def wrap(pipe, methods: str | AccelConfig | list[str | AccelConfig], **overrides: Any):
    """Apply accelerators to this pipeline instance, in place, and return it.

    Args:
        pipe: a diffusers pipeline of a supported family (see ``accel.pipelines.adapters``).
        methods: a preset name (``"bac"``), a config object (``BACConfig(...)``), or a list of them to stack.
            An empty list installs only accel's step tracking, so ``accel.summary`` measures a plain run.
        **overrides: config fields to change, applied to every chosen config that has the field.

    Raises ``ValueError`` for an unknown name, a bad value, an unsupported family, or a method applied twice;
    after any error the pipeline is exactly as it was before the call.
    """
    _check_pipeline(pipe)
    configs = resolve(methods, overrides)
    context = _context(pipe)
    adapter = context.adapter if context is not None else adapter_for(pipe)
    specs = [spec_for(config) for config in configs]
    for spec in specs:
        if not spec.supports(adapter.name):
            raise ValueError(
                f"{spec.name!r} does not support the {adapter.name!r} family ({type(pipe).__name__}); "
                f"supported: {', '.join(spec.families or ())}."
            )
    if context is not None:
        applied_names = {scope.name for scope in context.scopes}
        again = [spec.name for spec in specs if spec.name in applied_names]
        if again:
            raise ValueError(f"{', '.join(again)} already applied to this pipeline; unwrap it first.")

    created = context is None
    if created:
        context = PipelineContext(pipe, adapter)
        context.install()
    added: list[MethodScope] = []
    try:
        with context._lock:
            for spec, config in zip(specs, configs):
                scope = MethodScope(context, spec, config)
                added.append(scope)
                spec.apply(scope, config)
            context.scopes.extend(added)
            context.place_trackers_outermost()
    except BaseException:
        for scope in reversed(added):
            scope.remove()
        if created:
            context.uninstall()
        raise
    if created:
        pipe.__dict__[_CONTEXT_ATTR] = context
        pipe.__class__ = _wrapped_class(type(pipe))
    return pipe


def calibrate(pipe, method: str | AccelConfig, inputs, *, num_inference_steps: int, progress: bool = True,
              **overrides: Any):
    """Run a method's offline calibration on ``pipe`` and return its artifact (BAC: a ``BACSchedule``).

    Args:
        pipe: the pipeline to calibrate, unwrapped or wrapped with other methods (they stay applied while it runs).
        method: a preset name or config of a method that calibrates (``"bac"``, ``"bac-fast"``, ``BACConfig(...)``).
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
        calibrating = sorted(s.name for s in _calibrating_specs())
        raise ValueError(f"{spec.name!r} has no calibration; methods that calibrate: {', '.join(calibrating)}.")
    return spec.calibrate(pipe, configs[0], inputs, num_inference_steps=num_inference_steps, progress=progress)


def wrap_calibrated(pipe, methods, calibration_inputs, *, num_inference_steps: int, **overrides: Any):
    """``wrap`` after calibrating every chosen method that has an offline pass (BAC) on ``pipe`` with
    ``calibration_inputs`` (call kwargs without the steps, or a list of them) for ``num_inference_steps``.

    Methods without calibration are applied as given. Use inputs (seeds) that the measured calls never use.
    """
    configs = []
    for config in resolve(methods, overrides):
        if spec_for(config).calibrate is not None:
            artifact = calibrate(pipe, config, calibration_inputs, num_inference_steps=num_inference_steps,
                                 progress=False)
            config = config.replace(schedule=artifact)
        configs.append(config)
    return wrap(pipe, configs)


def _calibrating_specs() -> list[AcceleratorSpec]:
    from .registry import _SPECS

    return [spec for spec in _SPECS.values() if spec.calibrate is not None]


@contextlib.contextmanager
def temporary_scope(pipe, name: str, install: Callable[[MethodScope], None]) -> Iterator[MethodScope]:
    """A method scope on ``pipe`` for the length of a ``with`` block (calibration passes record through one).

    ``install(scope)`` registers its hooks; on exit they are removed, and a pipeline that was not wrapped before
    is unwrapped again.
    """
    _check_pipeline(pipe)
    created = _context(pipe) is None
    if created:
        wrap(pipe, [])
    context = _context(pipe)
    spec = AcceleratorSpec(name, AccelConfig, lambda scope, config: None, name, None, {})
    scope = MethodScope(context, spec, AccelConfig())
    try:
        with context._lock:
            install(scope)
            context.scopes.append(scope)
            context.place_trackers_outermost()
        yield scope
    finally:
        with context._lock:
            scope.remove()
            if scope in context.scopes:
                context.scopes.remove(scope)
        if created:
            unwrap(pipe)


def unwrap(pipe):
    """Remove everything accel applied to this pipeline; its output is then bit-identical to a never-wrapped one.

    A pipeline that is not wrapped is returned unchanged.
    """
    _check_pipeline(pipe)
    context = _context(pipe)
    if context is None:
        return pipe
    with context._lock:
        context.uninstall()
        del pipe.__dict__[_CONTEXT_ATTR]
        if type(pipe).__dict__.get("_accel_call_attr") == _CONTEXT_ATTR:
            pipe.__class__ = type(pipe).__dict__["_accel_base_class"]
    return pipe


def is_wrapped(pipe) -> bool:
    return _context(pipe) is not None


def summary(pipe) -> Summary:
    """What accel applied to ``pipe`` and, for its last call, per step and CFG branch what was computed vs reused."""
    _check_pipeline(pipe)
    context = _context(pipe)
    if context is None:
        raise ValueError(f"This {type(pipe).__name__} is not wrapped by accel; call accel.wrap(pipe, ...) first.")
    return Summary(
        family=context.family,
        methods=[scope.config.to_dict() for scope in context.scopes],
        steps=list(context.last_call),
        extras={scope.name: dict(scope.extras) for scope in context.scopes if scope.extras},
    )
