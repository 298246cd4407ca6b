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

* **A compiled denoiser fuses across blocks.** When the denoiser itself was compiled (not its blocks one by one),
  the consecutive blocks a forward computes run as one compiled graph (``BlockSpans``), as they would in the plain
  model compiled whole: the hooks of the later blocks still run, and take their block's output from the span.

Limits: a module that is hooked and whose hook *is* the computation (QuEST's quantized linears) runs eagerly, and
so do attention modules whose attention an accelerator replaces (the sparse methods' block selection is Python).
``torch.compile(pipe.transformer)`` (a new ``OptimizedModule``) cannot be seen by accel: it runs correctly, but every
hooked module in it eagerly; use ``pipe.transformer.compile()``. A module compiled *before* ``accel.wrap`` is refused
with a ``ValueError`` (its compiled call would trace the hooks): wrap first, then compile. With ``fullgraph=True``
only hooked modules that contain no other hooked module are compiled (a graph may not break).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import types
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


def _settings(kwargs: dict[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    """``kwargs`` as a hashable key of compiled functions, or None when an option is unhashable (a dict of inductor
    options): the caller then compiles one function of its own, or none."""
    try:
        settings = tuple(sorted(kwargs.items()))
        hash(settings)
    except TypeError:
        return None
    return settings


def compiled_forward(forward: Callable, kwargs: dict[str, Any]) -> Callable[..., Any]:
    """``forward`` (a module's bound forward) under ``torch.compile(**kwargs)``, called as the bound method would
    be. The compiled function is the class's, shared by every instance (dynamo's cache is per code object)."""
    function = getattr(forward, "__func__", None)
    owner = getattr(forward, "__self__", None)
    settings = _settings(kwargs)
    if function is None or owner is None:
        return torch.compile(forward, **kwargs)
    compiled = _compiled(function, settings) if settings is not None else torch.compile(function, **kwargs)
    return functools.partial(compiled, owner)


def compiled_function(function: Callable, kwargs: dict[str, Any]) -> Callable:
    """``function`` under ``torch.compile(**kwargs)``, one compiled function per function and settings; itself
    when a setting is unhashable."""
    settings = _settings(kwargs)
    return function if settings is None else _compiled(function, settings)


# Spans hold every block output they compute until the blocks are called; above this they would cost real memory,
# and activations this large make a forward compute-bound, where one graph per block costs nothing noticeable.
SPAN_OUTPUT_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class SpanMember:
    """How one block runs inside a span: ``function(block, args, kwargs, *extra)`` gives its output.

    ``kind`` is "forward" (the block's own forward, ``run_forward``; ``captured``: the hooked modules inside it,
    whose calls the span records) or "replaced" (a method returns the block's output without running it, from
    ``extra``: a cache's reused branch outputs, say). A span holds members of one kind only.
    """

    kind: str
    function: Callable[..., Any]
    extra: tuple = ()
    captured: tuple[torch.nn.Module, ...] = ()


@functools.cache
def run_forward(cls: type) -> Callable[..., Any]:
    """``cls.forward`` called as a span member: ``(block, args, kwargs)``. One function per class, so dynamo guards
    on no instance."""
    forward = cls.forward

    def run(block, args, kwargs):
        return forward(block, *args, **kwargs)

    return run


def _run_blocks(functions: tuple, owners: tuple, extras: tuple, layout, args: tuple, kwargs: dict) -> tuple:
    """Run consecutive blocks of one group as the family's loop would: each output becomes the next input."""
    outputs = []
    for function, owner, extra in zip(functions, owners, extras):
        output = function(owner, args, kwargs, *extra)
        outputs.append(output)
        args, kwargs = layout.with_streams_in(args, kwargs, *layout.streams_out(output))
    return tuple(outputs)


@functools.cache
def _compiled_span(key: tuple[str, int], settings: tuple[tuple[str, Any], ...]) -> Callable[..., tuple]:
    """``_run_blocks`` compiled, under a code object of its own per (member kind, span length): dynamo keeps its
    cache and its recompile limit per code object, so spans of different kinds and lengths do not evict one
    another."""
    code = _run_blocks.__code__.replace(co_name=f"_run_{key[1]}_{key[0]}_blocks")
    function = types.FunctionType(code, _run_blocks.__globals__, code.co_name)
    return torch.compile(function, **dict(settings))


# (module, args, kwargs, output) of every hooked module a running span captured (``_recorded_forward``)
_SPAN_RECORDS: list[tuple[torch.nn.Module, tuple, dict, Any]] = []
_SPAN_RECORDS_LOCK = threading.Lock()


@functools.cache
def _recorded_forward(cls: type) -> Callable[..., Any]:
    """``cls.forward`` that also records its call in ``_SPAN_RECORDS``; traced into a span's graph, the records
    are the graph's extra outputs. One function per class, so dynamo guards on no instance."""
    forward = cls.forward

    def recorded(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        _SPAN_RECORDS.append((self, args, kwargs, output))
        return output

    return recorded


@dataclasses.dataclass
class _SpanOutputs:
    kind: str  # the span's member kind
    index: int  # the block whose call is expected next
    args: tuple  # the call it is expected with
    kwargs: dict
    outputs: tuple  # its output, then the following blocks'


class BlockSpans:
    """One compiled denoiser's blocks: the blocks a forward runs in a row run as one compiled graph.

    Whoever is about to produce a block's output (its compute hook, or a method's hook that replaces the block)
    asks ``output_for``. The first block of a span looks ahead with its own call (``member(index, args,
    kwargs)``: how a block would run in this forward, or None) and the span continues through blocks of the same
    group and the same member kind; it runs as one graph, and the first block gets its output. Hooked modules
    inside a span's blocks (a caching method's branches) are traced with their class ``forward`` and their calls
    recorded; ``after_span`` books those calls with their hooks (counts, cached outputs). Each following block is
    then handed its output, provided it asks for the same kind with exactly the inputs the span chained (the same
    tensor objects and the same other arguments). Anything else (a method deciding otherwise after all, a family
    loop that changes a stream between blocks) drops the rest of the span and the block runs alone: a wrong guess
    costs time, never correctness.
    """

    def __init__(self, blocks: list, member: Callable[[int, tuple, dict], SpanMember | None],
                 after_span: Callable[[list], None], kwargs: dict[str, Any]) -> None:
        self.blocks, self.member, self.after_span = blocks, member, after_span
        self._settings = _settings(kwargs)  # None: an unhashable option, and each block compiles alone
        self._held: _SpanOutputs | None = None

    def clear(self) -> None:
        self._held = None

    def held_output(self, index: int, kind: str, args: tuple, kwargs: dict) -> Any | None:
        """Block ``index``'s output if the running span holds it for a ``kind`` member called so, else None (and
        whatever is held stays, for ``output_for`` to judge)."""
        held = self._held
        if held is None or held.index != index or held.kind != kind or \
                not _same_call(held.args, held.kwargs, args, kwargs):
            return None
        self._held = None
        return self._hand_on(held, index, args, kwargs)

    def output_for(self, index: int, kind: str, make_first: Callable[[], SpanMember | None], args: tuple,
                   kwargs: dict) -> Any | None:
        """Block ``index``'s output, run as a ``kind`` member: from the span held, or from one started here
        (``make_first()``: this block's member), or None: the caller runs the block alone."""
        held, self._held = self._held, None
        if held is not None and held.index == index and held.kind == kind and \
                _same_call(held.args, held.kwargs, args, kwargs):
            return self._hand_on(held, index, args, kwargs)
        if self._settings is None:
            return None
        return self._start(index, make_first(), args, kwargs)

    def _start(self, index: int, first: SpanMember | None, args: tuple, kwargs: dict) -> Any | None:
        block = self.blocks[index]
        hidden, _ = block.streams_in(args, kwargs)
        if first is None or not isinstance(hidden, torch.Tensor):
            return None
        members = [first]
        # what the span holds per block: the block's output, and each captured module's input and output
        block_bytes = hidden.numel() * hidden.element_size() * (1 + 2 * len(first.captured))
        end = index + 1
        while end < len(self.blocks) and self.blocks[end].group == block.group and \
                (end - index + 1) * block_bytes <= SPAN_OUTPUT_BYTES:
            member = self.member(end, args, kwargs)
            if member is None or member.kind != first.kind:
                break
            members.append(member)
            end += 1
        captured = [module for member in members for module in member.captured]
        if len(members) < 2 and not captured:
            return None  # one block with nothing hooked inside: its own compiled forward is the same graph
        run = _compiled_span((first.kind, len(members)), self._settings)
        inputs = (tuple(member.function for member in members), tuple(b.module for b in self.blocks[index:end]),
                  tuple(member.extra for member in members), block, args, kwargs)
        if captured:
            outputs, records = self._run_capturing(run, captured, inputs)
            self.after_span(records)
        else:
            outputs = run(*inputs)
        return self._hand_on(_SpanOutputs(first.kind, index, args, kwargs, outputs), index, args, kwargs)

    @staticmethod
    def _run_capturing(run: Callable, captured: list[torch.nn.Module], inputs: tuple) -> tuple[tuple, list]:
        """Run the span with each captured module's hooked ``forward`` set aside: the graph traces its class
        ``forward`` and records the calls, which the hooks then book (``after_span``) as if they had run."""
        with _SPAN_RECORDS_LOCK:
            hooked = [(module, module.__dict__.get("forward")) for module in captured]
            _SPAN_RECORDS.clear()
            try:
                for module in captured:
                    module.forward = types.MethodType(_recorded_forward(type(module)), module)
                outputs = run(*inputs)
                records = list(_SPAN_RECORDS)
            finally:
                _SPAN_RECORDS.clear()
                for module, forward in hooked:
                    if forward is None:
                        del module.forward
                    else:
                        module.forward = forward
        return outputs, records

    def _hand_on(self, held: _SpanOutputs, index: int, args: tuple, kwargs: dict) -> Any:
        output, rest = held.outputs[0], held.outputs[1:]
        if rest:
            block = self.blocks[index]
            next_args, next_kwargs = block.with_streams_in(args, kwargs, *block.streams_out(output))
            self._held = _SpanOutputs(held.kind, index + 1, next_args, next_kwargs, rest)
        return output


def is_plain_forward(forward: Callable, module: torch.nn.Module) -> bool:
    """Whether ``forward`` is ``module``'s own class ``forward``, bound to it (nothing wrapped around it)."""
    return getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward


def _same_call(args: tuple, kwargs: dict, got_args: tuple, got_kwargs: dict) -> bool:
    return (len(args) == len(got_args) and all(a is b for a, b in zip(args, got_args))
            and kwargs.keys() == got_kwargs.keys() and all(kwargs[key] is got_kwargs[key] for key in kwargs))
