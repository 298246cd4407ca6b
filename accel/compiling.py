"""torch.compile on a wrapped pipeline: accel's decisions run eagerly, the modules' own computation compiles.

Compiling a module traces whatever its ``forward`` calls, and on a wrapped denoiser that is the diffusers hook
chain: the step tracker, the methods' decisions (reuse or compute, which blocks, which attention blocks) and the
counters. Traced, those split the graph at every decision and, worse, make dynamo compile diffusers' hook frame once
per module kind and hook stack until it hits its recompile limit and falls back to eager. So accel keeps the two
apart:

* **Hooks stay eager.** Every module accel registers a hook on has its hooked ``forward`` wrapped in
  ``torch.compiler.disable`` (``keep_hooks_eager``): a compiled parent graph-breaks at the call, and no hook frame
  is ever compiled, so no hook state is ever guarded on.
* **Computation compiles below the hooks.** The innermost accel hook on every denoiser, block and branch (the
  ``ComputeHook`` of ``accel.hooks``) calls the module's own ``forward``; once compilation was asked for it calls
  ``torch.compile(forward)`` instead. One code object per module class, so twelve identical blocks share one graph.
* **The user's usual calls are honoured.** On a wrapped pipeline, ``module.compile(**kwargs)`` on the denoiser or on
  any hooked block or branch (which is what diffusers' ``compile_repeated_blocks()`` calls) compiles, with those
  kwargs, the computation of that module and of every hooked module inside it. ``accel.unwrap`` hands the compiled
  modules back compiled the ordinary way (``nn.Module.compile`` with the same kwargs).

Limits: a module that is hooked and whose hook *is* the computation (QuEST's quantized linears) runs eagerly, and
so do attention modules whose attention an accelerator replaces (the sparse methods' block selection is Python).
``torch.compile(pipe.transformer)`` (a new ``OptimizedModule``) cannot be seen by accel: it runs correctly, but every
hooked module in it eagerly; use ``pipe.transformer.compile()``. A module compiled *before* ``accel.wrap`` is refused
with a ``ValueError`` (its compiled call would trace the hooks): wrap first, then compile. With ``fullgraph=True``
only hooked modules that contain no other hooked module are compiled (a graph may not break).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

_EAGER_MARK = "_accel_hooks_eager"  # set on the disabled wrapper that keep_hooks_eager puts around a hooked forward

# The kwargs of every module.compile(...) accel took over, so a later accel.wrap can take it over again.
_COMPILE_KWARGS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def keep_hooks_eager(module: torch.nn.Module) -> None:
    """Wrap ``module``'s hooked ``forward`` (the instance attribute diffusers' ``HookRegistry`` sets) so that
    torch.compile never traces it. Idempotent; ``expose_hooks`` undoes it."""
    forward = module.__dict__.get("forward")
    if forward is None or getattr(forward, _EAGER_MARK, None) is not None:
        return

    @functools.wraps(forward)
    def eager_forward(*args, **kwargs):
        return forward(*args, **kwargs)

    eager_forward = torch.compiler.disable(eager_forward)
    setattr(eager_forward, _EAGER_MARK, forward)
    module.forward = eager_forward


def expose_hooks(module: torch.nn.Module) -> None:
    """Undo ``keep_hooks_eager``: the registry's own hooked ``forward`` is the module's ``forward`` again (diffusers
    reads and writes it when a hook is registered or removed)."""
    forward = module.__dict__.get("forward")
    inner = getattr(forward, _EAGER_MARK, None)
    if inner is not None:
        module.forward = inner


def check_not_compiled(modules: Iterable[tuple[str, torch.nn.Module]]) -> None:
    """``ValueError`` if one of ``modules`` was compiled with ``module.compile()`` by someone other than accel."""
    for name, module in modules:
        if getattr(module, "_compiled_call_impl", None) is not None and module not in _COMPILE_KWARGS:
            raise ValueError(
                f"{name} was compiled before accel.wrap; its compiled call would trace accel's hooks. Wrap the "
                "pipeline first and compile afterwards (`pipe.transformer.compile()` or "
                "`pipe.transformer.compile_repeated_blocks()`): accel then compiles the computation below its hooks."
            )


def take_over_compiled(module: torch.nn.Module) -> dict[str, Any] | None:
    """If accel handed ``module`` back compiled (``hand_back_compiled``), undo that and return the kwargs."""
    kwargs = _COMPILE_KWARGS.get(module)
    if kwargs is None or getattr(module, "_compiled_call_impl", None) is None:
        return None
    module._compiled_call_impl = None
    return kwargs


def hand_back_compiled(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """Compile ``module`` the ordinary way, as ``module.compile(**kwargs)`` would have without accel."""
    type(module).compile(module, **kwargs)
    _COMPILE_KWARGS[module] = kwargs


def forget_compiled(module: torch.nn.Module) -> None:
    """Undo ``hand_back_compiled``: the module runs eagerly again and a later ``accel.wrap`` does not compile it."""
    if module in _COMPILE_KWARGS:
        module._compiled_call_impl = None
        del _COMPILE_KWARGS[module]


def intercept_compile(module: torch.nn.Module, compile_below_hooks: Callable[..., None]) -> None:
    """Make ``module.compile(**kwargs)`` call ``compile_below_hooks(module, kwargs)`` instead (instance only)."""

    def compile(*args, **kwargs):
        if args:
            raise TypeError("module.compile() takes keyword arguments only (those of torch.compile).")
        compile_below_hooks(module, kwargs)

    functools.update_wrapper(compile, type(module).compile)
    module.__dict__["compile"] = compile


def release_compile(module: torch.nn.Module) -> None:
    module.__dict__.pop("compile", None)


def remember(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    _COMPILE_KWARGS[module] = dict(kwargs)


@functools.cache
def _compiled(function: Callable, settings: tuple[tuple[str, Any], ...]) -> Callable:
    return torch.compile(function, **dict(settings))


def compiled_forward(forward: Callable, kwargs: dict[str, Any]) -> Callable[..., Any]:
    """``forward`` (a module's bound forward) under ``torch.compile(**kwargs)``, called as the bound method would
    be. The compiled function is the class's, shared by every instance (dynamo's cache is per code object)."""
    function = getattr(forward, "__func__", None)
    owner = getattr(forward, "__self__", None)
    try:
        settings = tuple(sorted(kwargs.items()))
        hash(settings)
    except TypeError:  # an unhashable option (a dict of inductor options): one compiled function per module
        settings = None
    if function is None or owner is None:
        return torch.compile(forward, **kwargs)
    compiled = _compiled(function, settings) if settings is not None else torch.compile(function, **kwargs)
    return functools.partial(compiled, owner)
