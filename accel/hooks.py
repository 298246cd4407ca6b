"""The instance-level hook machinery every accelerator plugs into.

* ``PipelineContext`` lives on one wrapped pipeline instance. It owns the per-call state: on entry to every
  pipeline call and in ``finally`` it resets every accelerator's state, so nothing leaks between calls.
* Step and CFG-branch tracking. The step is the number of ``scheduler.step`` calls made so far in this pipeline
  call (the scheduler instance is patched for the duration of the call only), which works for pipelines that set
  no ``cache_context`` (DiT, PixArt, SD3, U-Net) as well as for those that do. The branch is the pipeline's
  ``cache_context`` name ("cond", "uncond", "cond_uncond") when it sets one, else, for separate CFG, the adapter's
  ``cfg_call_order`` name of the k-th denoiser call of the step, else ``"call{k}"`` (``"call0"`` for batched CFG).
  Accelerators read ``scope.current`` and never count.
* ``MethodScope`` is what an accelerator's ``apply`` receives: it registers diffusers ``ModelHook``s, states
  (``BranchStates``: one per denoiser and CFG branch, like diffusers' ``StateManager`` per cache context), step
  observers and attention replacements, and removes all of them again on ``unwrap`` or when a later method fails
  to apply. ``temporary_scope`` gives calibration passes the same for the length of a ``with`` block.
* ``ComputeHook``, innermost on every denoiser, block and branch, counts the forwards that really run and runs the
  module's own forward, compiled below the hooks once ``module.compile()`` was called (``accel.compiling``); every
  hooked ``forward`` is kept out of torch.compile's graphs, so decisions are always made eagerly.
* ``attach_context`` / ``detach_context`` switch one pipeline instance's class to a subclass whose ``__call__``
  runs inside ``PipelineContext.pipeline_call`` (``call_wrapping_class``); other instances are untouched.

All hooks are inert outside a call of *their* pipeline (a context variable says which wrapped pipeline is running
in this thread), so a plain pipeline that shares modules with a wrapped one, or runs in another thread, is
unaffected.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from accel.pipelines.adapters import ATTENTION_BRANCHES, BlockCallCheck, BlockInfo, FamilyAdapter, adapter_for

from . import compiling
from .attention import AttentionInterceptHook, check_interceptable
from .compiling import SpanMember as SpanMember  # re-exported: what a method's hook hands a compiled span
from .steps import StepInfo
from .summary import CallRecorder, StepRecord

if TYPE_CHECKING:
    from .config import AccelConfig

CONTEXT_ATTR = "_accel_context"  # where a wrapped pipeline instance holds its PipelineContext
_TRACKER_HOOK = "accel.step_tracker"
_COUNTER_HOOK = "accel.counter"

_ACTIVE: contextvars.ContextVar[PipelineContext | None] = contextvars.ContextVar("accel_active", default=None)


@torch.compiler.disable
def active_context() -> PipelineContext | None:
    """The wrapped pipeline whose call is running in this thread, if any."""
    return _ACTIVE.get()


class ResettableState(Protocol):
    def reset(self) -> None: ...


State = TypeVar("State")


class BranchStates(Generic[State]):
    """One state object per (denoiser, CFG branch) of the running call, made by ``factory`` on first use and
    dropped when the call ends: diffusers' ``StateManager`` per cache context, for pipelines that set no
    ``cache_context`` too. Register it with ``MethodScope.add_branch_states``."""

    def __init__(self, factory: Callable[[], State]) -> None:
        self.factory = factory
        self._states: dict[tuple[str, str], State] = {}

    def get(self, info: StepInfo) -> State:
        """The state of the denoiser and CFG branch that ``info`` describes."""
        key = (info.denoiser, info.branch)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = self.factory()
        return state

    def reset(self) -> None:
        self._states = {}


# --------------------------------------------------------------------------------------------- hooks


class _CacheContextListener(StateManager):
    """Receives the pipeline's ``cache_context`` name through diffusers' own mechanism."""

    def __init__(self, context: PipelineContext) -> None:
        super().__init__(BaseState)
        self._owner = weakref.ref(context)

    def set_context(self, cache_context) -> None:
        owner = self._owner()
        if owner is not None and _ACTIVE.get() is owner:
            owner._cache_context_name = cache_context.name if cache_context is not None else None


class _StepTrackerHook(ModelHook):
    """Outermost hook on each denoiser: tells the context a forward begins."""

    _is_stateful = True  # so diffusers' cache_context reaches our listener

    def __init__(self, context: PipelineContext, denoiser: str) -> None:
        super().__init__()
        self.context = context
        self.denoiser = denoiser
        self.cache_context_listener = _CacheContextListener(context)

    def pre_forward(self, module, *args, **kwargs):
        _begin_forward(self.context, self.denoiser, module, args, kwargs)
        return args, kwargs

    def reset_state(self, module):
        return module


@torch.compiler.disable
def _begin_forward(context: PipelineContext, denoiser: str, module, args, kwargs) -> None:
    if _ACTIVE.get() is context:
        context._begin_forward(denoiser, module, args, kwargs)


class ComputeHook(ModelHook):
    """Innermost hook on each denoiser, block and branch: counts forwards that really execute (``kinds``) and runs
    the module's own forward, compiled once compilation was asked for (``accel.compiling``)."""

    def __init__(self, context: PipelineContext, kinds: tuple[str, ...]) -> None:
        super().__init__()
        self.context = context
        self.kinds = kinds
        self.compiled: Callable[..., Any] | None = None  # the module's forward under torch.compile
        self.compile_kwargs: dict[str, Any] | None = None  # what it was compiled with
        self.check: Callable[[tuple, dict, Any], None] | None = None  # an inferred adapter's first-call check
        # a compiled denoiser's block spans (compiling.BlockSpans): on each of its blocks (with the block's index),
        # and on the denoiser, which drops what a forward left held
        self.spans: compiling.BlockSpans | None = None
        self.index = -1
        self.span_member: Callable[[], compiling.SpanMember | None] | None = None  # this block's, when it runs

    def new_forward(self, module, *args, **kwargs):
        if self.kinds:
            _count(self.context, self.kinds)
        spans = self.spans
        if spans is not None and self.index < 0:  # the denoiser
            spans.clear()
            try:
                return self._run(module, args, kwargs)
            finally:
                spans.clear()
        if spans is not None and self.check is None and self.compiled is not None:
            output = spans.output_for(self.index, "forward", self.span_member, args, kwargs)
            if output is not None:
                return output
        return self._run(module, args, kwargs)

    def _run(self, module, args, kwargs):
        if self.compiled is not None and id(module) not in self.context.attention_owners:
            output = self.compiled(*args, **kwargs)
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if self.check is not None and _ACTIVE.get() is self.context:
            self.check(args, kwargs, output)
        return output


@torch.compiler.disable
def _count(context: PipelineContext, kinds: tuple[str, ...]) -> None:
    record = context.recorder.current
    if record is None or _ACTIVE.get() is not context:
        return
    for kind in kinds:
        if kind == "block":
            record.blocks_computed += 1
        elif kind == "branch":
            record.branches_computed += 1
        else:
            record.attention_calls += 1


class _CountingStep:
    """Stands in for ``scheduler.step`` during wrapped calls; tells the running context a step ended."""

    def __init__(self, original: Callable) -> None:
        self.original = original
        self.users = 0
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        output = self.original(*args, **kwargs)
        context = _ACTIVE.get()
        if context is not None:
            context._scheduler_steps += 1
            for observe in context.step_observers:
                output = observe(output, context._scheduler_steps)
        return output


_SCHEDULER_LOCK = threading.Lock()


def _attach_step_counter(scheduler) -> None:
    with _SCHEDULER_LOCK:
        counter = scheduler.__dict__.get("step")
        if not isinstance(counter, _CountingStep):
            counter = _CountingStep(scheduler.step)
            scheduler.step = counter
        counter.users += 1


def _detach_step_counter(scheduler) -> None:
    with _SCHEDULER_LOCK:
        counter = scheduler.__dict__.get("step")
        if isinstance(counter, _CountingStep):
            counter.users -= 1
            if counter.users <= 0:
                del scheduler.step


_hooks_changed = 0  # counts registrations and removals: what a cached look at the hooks was made under


def _register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    global _hooks_changed
    _hooks_changed += 1
    registry = HookRegistry.check_if_exists_or_initialize(module)
    compiling.expose_hooks(module)
    try:
        registry.register_hook(hook, name)
    finally:
        compiling.keep_hooks_eager(module)


def _unregister(module: torch.nn.Module, name: str) -> None:
    global _hooks_changed
    _hooks_changed += 1
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    compiling.expose_hooks(module)
    registry.remove_hook(name, recurse=False)
    if registry.hooks:
        compiling.keep_hooks_eager(module)
    else:
        # Leave the module as diffusers found it: no empty registry, no instance-level `forward`.
        del module._diffusers_hook
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module:
            del module.forward


# ------------------------------------------------------------------------------------------ context


class PipelineContext:
    """Per-pipeline-instance state of accel. Created by ``accel.wrap``; removed by ``accel.unwrap``."""

    def __init__(self, pipe, adapter: FamilyAdapter) -> None:
        self._pipe = weakref.ref(pipe)
        self.adapter = adapter
        self.family = adapter.name
        self.denoisers: dict[str, torch.nn.Module] = adapter.denoisers(pipe)
        if not self.denoisers:
            raise ValueError(f"{type(pipe).__name__} has no {adapter.name} denoiser to wrap.")
        self.blocks: dict[str, list[BlockInfo]] = {attr: adapter.blocks(m) for attr, m in self.denoisers.items()}
        # an inferred adapter's assumptions, confirmed on the first call (accel.pipelines.adapters.BlockCallCheck)
        self.block_checks = {attr: BlockCallCheck(attr) for attr in self.denoisers} if adapter.inferred else {}
        self.scopes: list[MethodScope] = []
        self.recorder = CallRecorder()
        self.last_call: list[StepRecord] = []
        self.current: StepInfo | None = None
        self.attention_owners: dict[int, str] = {}
        # called after every scheduler step of a call as observe(step output, steps done) -> the output to hand on
        self.step_observers: list[Callable[[Any, int], Any]] = []
        # called before every call, outside it, as prepare(call arguments by name); a method may run the pipeline
        self.call_preparers: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.RLock()  # held by a call, and by every change (wrap, unwrap, a calibration scope)
        self._installed: list[tuple[torch.nn.Module, str]] = []
        self._compute_hooks: dict[int, tuple[torch.nn.Module, ComputeHook]] = {}
        self._inside_checked: dict[int, tuple[int, tuple]] = {}  # id(block) -> (_hooks_changed, hooked inside)
        self.compiled_modules: dict[torch.nn.Module, dict[str, Any]] = {}  # module.compile(**kwargs) taken over
        self._compiled_parts: list[torch.nn.Module] = []  # a compiled denoiser's parts outside its blocks
        # id(branch) -> (branch, what its compute hook counts, its block)
        self._branches: dict[int, tuple[torch.nn.Module, tuple[str, ...], torch.nn.Module]] = {}
        self._reset_call_counters()

    @property
    def pipe(self):
        return self._pipe()

    def _reset_call_counters(self) -> None:
        self._scheduler_steps = 0
        self._last_step = -1
        self._calls_in_step = 0
        self._cache_context_name: str | None = None
        self.current = None

    # -- installation -----------------------------------------------------------------------------
    def install(self) -> None:
        """Compute hooks (innermost, counting) on every denoiser, block and branch, then the step trackers on the
        denoisers; ``module.compile()`` on any of them then compiles below the hooks (``accel.compiling``)."""
        for attr, module in self.denoisers.items():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(_TRACKER_HOOK) is not None:
                raise ValueError(
                    f"The pipeline's {attr} is already wrapped by accel through another pipeline that shares it; "
                    "unwrap that one first, or give each pipeline its own copy of the model."
                )
        hooked = self._hooked_modules()
        compiling.check_not_compiled((name, module) for name, module, _ in hooked)
        taken_over = [(module, compiling.take_over_compiled(module)) for _, module, _ in hooked]
        try:
            checks = self._call_checks()
            for _, module, kinds in hooked:
                hook = ComputeHook(self, kinds)
                hook.check = checks.get(id(module))
                self._install(module, hook, _COUNTER_HOOK)
                self._compute_hooks[id(module)] = (module, hook)
                compiling.intercept_compile(module, self.compile_below_hooks)
            self.place_trackers_outermost()
            for module, kwargs in taken_over:
                if kwargs is not None:
                    self.compile_below_hooks(module, kwargs)
        except BaseException:
            for module, kwargs in taken_over:  # handed back compiled as it came
                if kwargs is not None:
                    self.compiled_modules.setdefault(module, kwargs)
            self.uninstall()
            raise

    def _call_checks(self) -> dict[int, Callable[[tuple, dict, Any], None]]:
        """id(module) -> its compute hook's check, for an inferred adapter: each block's call, the forward's end."""
        checks: dict[int, Callable[[tuple, dict, Any], None]] = {}
        for attr, check in self.block_checks.items():
            blocks = self.blocks[attr]
            checks[id(self.denoisers[attr])] = functools.partial(check.forward_done, len(blocks))
            for block in blocks:
                checks[id(block.module)] = functools.partial(check.check, block.name, block.index)
        return checks

    def _hooked_modules(self) -> list[tuple[str, torch.nn.Module, tuple[str, ...]]]:
        """(name, module, what its compute hook counts) for every denoiser, block and branch."""
        hooked = []
        for attr, module in self.denoisers.items():
            hooked.append((f"pipe.{attr}", module, ()))
            for index, block in enumerate(self.blocks[attr]):
                hooked.append((f"pipe.{attr} block {index}", block.module, ("block",)))
                for kind, (_, branch) in block.branches.items():
                    kinds = ("branch", "attention") if kind in ATTENTION_BRANCHES else ("branch",)
                    hooked.append((f"pipe.{attr} block {index} {kind}", branch, kinds))
                    self._branches[id(branch)] = (branch, kinds, block.module)
        return hooked

    def compile_below_hooks(self, module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
        """What ``module.compile(**kwargs)`` does on a wrapped pipeline: compile the computation of ``module`` and of
        every hooked module inside it, below accel's hooks. Branches that only accel's counter hooks are unhooked
        first, so that their block compiles as one graph; the block counts them when it runs (``_let_sleep``).
        With ``fullgraph=True`` only hooked modules that contain no other hooked module (a graph may not break)."""
        with self.changing("module.compile()"):
            inside_ids = {id(m) for m in module.modules()}
            for branch_id, (branch, _, block) in list(self._branches.items()):
                if branch_id in inside_ids and branch_id in self._compute_hooks and id(block) in self._compute_hooks:
                    self._let_sleep(branch)
            inside = [self._compute_hooks[id(m)] for m in module.modules() if id(m) in self._compute_hooks]
            hooked_ids = {id(m) for m, _ in inside}
            denoiser_ids = {id(denoiser) for denoiser in self.denoisers.values()}
            for member, hook in inside:
                nested = any(id(m) in hooked_ids for m in member.modules() if m is not member)
                if nested and (kwargs.get("fullgraph") or id(member) in denoiser_ids):
                    hook.compiled = None  # dynamo gives up on a forward whose loop over hooked blocks breaks it
                    continue
                hook.compiled = compiling.compiled_forward(hook.fn_ref.original_forward, kwargs)
                hook.compile_kwargs = dict(kwargs)
            if id(module) in denoiser_ids:
                self._compile_spans(module, kwargs)
                # the denoiser's own forward runs eagerly (its block loop breaks the graph); its other parts compile
                for child in module.children():
                    if all(id(m) not in self._compute_hooks for m in child.modules()) and \
                            getattr(child, "_compiled_call_impl", None) is None:
                        type(child).compile(child, **kwargs)
                        self._compiled_parts.append(child)
            self.compiled_modules[module] = dict(kwargs)
            compiling.remember(module, kwargs)

    def _compile_spans(self, denoiser: torch.nn.Module, kwargs: dict[str, Any]) -> None:
        """A denoiser compiled whole runs the blocks a forward runs in a row as one graph (``BlockSpans``)."""
        (attr,) = [attr for attr, module in self.denoisers.items() if module is denoiser]
        spans = compiling.BlockSpans(self.blocks[attr], functools.partial(self._span_member, attr),
                                     self._book_span, kwargs)
        self._compute_hooks[id(denoiser)][1].spans = spans
        for block in self.blocks[attr]:
            hook = self._compute_hooks[id(block.module)][1]
            hook.spans, hook.index = spans, block.index
            hook.span_member = functools.partial(self._span_member, attr, block.index, None, None)

    def _span_member(self, attr: str, index: int, args: tuple | None,
                     kwargs: dict | None) -> compiling.SpanMember | None:
        """How block ``index`` of denoiser ``attr`` would run inside a span in this forward, or None if it cannot.
        ``args`` / ``kwargs``: the span's first call, to look ahead with; None when the block's own compute hook
        asks (its hooks decided already). The block must be compiled and run its plain forward. Looking ahead, the
        innermost method hook may replace the block (``span_replacement(module, args, kwargs)``: a member, or
        None), and every other hook must say it calls through (``will_compute(module)``). A block that runs its
        forward takes the hooked modules inside it along if each of their hooks says it will compute and can book
        a call the span made for it (``computed_in_span(module, args, kwargs, output)``)."""
        module = self.blocks[attr][index].module
        hook = self._compute_hooks[id(module)][1]
        if hook.compiled is None or hook.check is not None or \
                not compiling.is_plain_forward(hook.fn_ref.original_forward, module):
            return None
        if args is not None:
            others = [other for other in module._diffusers_hook.hooks.values() if other is not hook]
            replace = getattr(others[0], "span_replacement", None) if others else None
            member = replace(module, args, kwargs) if replace is not None else None
            if member is not None:
                return member if self._hooks_will_compute(module, others[1:], booked=False) else None
            if not self._hooks_will_compute(module, others, booked=False):
                return None
        inside = self._hooked_inside(module)
        for member in inside:
            entry = self._compute_hooks.get(id(member))
            if entry is None or id(member) in self.attention_owners or \
                    not compiling.is_plain_forward(entry[1].fn_ref.original_forward, member):
                return None
            others = [other for other in member._diffusers_hook.hooks.values() if other is not entry[1]]
            if not self._hooks_will_compute(member, others, booked=True):
                return None
        return compiling.SpanMember("forward", compiling.run_forward(type(module)), (), inside)

    @staticmethod
    def _hooks_will_compute(module: torch.nn.Module, hooks: list[ModelHook], booked: bool) -> bool:
        for hook in hooks:
            will_compute = getattr(hook, "will_compute", None)
            if will_compute is None or (booked and not hasattr(hook, "computed_in_span")) or \
                    not will_compute(module):
                return False
        return True

    def _hooked_inside(self, module: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
        """The modules inside ``module`` that carry hooks (cached until a hook is registered or removed)."""
        cached = self._inside_checked.get(id(module))
        if cached is None or cached[0] != _hooks_changed:
            inside = tuple(m for m in module.modules() if m is not module and getattr(m, "_diffusers_hook", None))
            cached = self._inside_checked[id(module)] = (_hooks_changed, inside)
        return cached[1]

    def _book_span(self, records: list[tuple[torch.nn.Module, tuple, dict, Any]]) -> None:
        """Book each call a span made of a hooked module as its hooks would have: counted, and handed to the
        other hooks' ``computed_in_span``."""
        for module, args, kwargs, output in records:
            for hook in module._diffusers_hook.hooks.values():
                if isinstance(hook, ComputeHook):
                    if hook.kinds:
                        _count(self, hook.kinds)
                else:
                    hook.computed_in_span(module, args, kwargs, output)

    def _let_sleep(self, branch: torch.nn.Module) -> None:
        """Remove the compute hook of a branch no method hooks (so a compiled block traces straight through it) and
        let its block's compute hook count it: a block that runs calls each of its branches once."""
        registry = getattr(branch, "_diffusers_hook", None)
        if registry is None or list(registry.hooks) != [_COUNTER_HOOK]:
            return
        _, kinds, block = self._branches[id(branch)]
        _unregister(branch, _COUNTER_HOOK)
        self._installed.remove((branch, _COUNTER_HOOK))
        compiling.release_compile(branch)
        del self._compute_hooks[id(branch)]
        self._compute_hooks[id(block)][1].kinds += kinds

    def wake(self, module: torch.nn.Module) -> None:
        """Before a method hooks ``module``: if it is a sleeping branch, give it back its own compute hook (innermost)
        and compile what was compiled again, now with the graph breaking at it."""
        record = self._branches.get(id(module))
        if record is None or id(module) in self._compute_hooks:
            return
        branch, kinds, block = record
        block_hook = self._compute_hooks[id(block)][1]
        kept = list(block_hook.kinds)
        for kind in kinds:
            kept.remove(kind)
        block_hook.kinds = tuple(kept)
        hook = ComputeHook(self, kinds)
        self._install(branch, hook, _COUNTER_HOOK)
        self._compute_hooks[id(branch)] = (branch, hook)
        compiling.intercept_compile(branch, self.compile_below_hooks)
        for compiled, kwargs in list(self.compiled_modules.items()):
            if any(m is branch for m in compiled.modules()):
                hook.compiled = compiling.compiled_forward(hook.fn_ref.original_forward, kwargs)
                hook.compile_kwargs = dict(kwargs)
                if kwargs.get("fullgraph"):
                    self.compile_below_hooks(compiled, kwargs)

    def _install(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        _register(module, hook, name)
        self._installed.append((module, name))

    def place_trackers_outermost(self) -> None:
        """(Re-)register the step trackers last, so they run before every accelerator hook on the denoiser."""
        for attr, module in self.denoisers.items():
            if (module, _TRACKER_HOOK) in self._installed:
                _unregister(module, _TRACKER_HOOK)
                self._installed.remove((module, _TRACKER_HOOK))
            self._install(module, _StepTrackerHook(self, attr), _TRACKER_HOOK)
            module._diffusers_hook.invalidate_child_registries_cache()

    def uninstall(self) -> None:
        for scope in reversed(self.scopes):
            scope.remove()
        self.scopes.clear()
        for module, _ in self._compute_hooks.values():
            compiling.release_compile(module)
        self._compute_hooks.clear()
        self._branches.clear()
        for module, name in reversed(self._installed):
            _unregister(module, name)
        self._installed.clear()
        for module in self.denoisers.values():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                registry.invalidate_child_registries_cache()
        for part in self._compiled_parts:
            part._compiled_call_impl = None
        self._compiled_parts.clear()
        for module, kwargs in self.compiled_modules.items():
            compiling.hand_back_compiled(module, kwargs)
        self.compiled_modules.clear()

    @contextlib.contextmanager
    def changing(self, action: str) -> Iterator[None]:
        """Hold the pipeline for a change (``action``: what is being done). Another thread's call finishes first; a
        change from inside this pipeline's own call in this thread (a step callback) raises ``RuntimeError``: it
        would wait for the call that is running it, or change the hooks under that call's feet."""
        if _ACTIVE.get() is self:
            raise RuntimeError(f"{action} cannot run during this pipeline's own call (from its "
                               "callback_on_step_end or a hook); do it before or after the call.")
        with self._lock:
            yield

    # -- per call ---------------------------------------------------------------------------------
    def prepare_call(self, args: tuple, kwargs: dict) -> None:
        """Run the methods' preparers (``MethodScope.before_each_call``) for a call with ``args`` / ``kwargs``,
        holding the pipeline, before the call starts: a preparer may call the pipeline itself (calibration)."""
        if not self.call_preparers or _ACTIVE.get() is self:
            return  # a nested call is refused by pipeline_call
        with self._lock:
            arguments = _call_arguments(self.pipe, args, kwargs)
            for prepare in list(self.call_preparers):
                prepare(arguments)

    @contextlib.contextmanager
    def pipeline_call(self):
        if _ACTIVE.get() is self:
            raise RuntimeError("A wrapped pipeline was called from inside its own call; accel does not support that.")
        with self._lock:  # one call at a time per wrapped instance; a plain diffusers pipeline isn't reentrant either
            for check in self.block_checks.values():
                if check.failure is not None:
                    raise ValueError(check.failure)
            token = _ACTIVE.set(self)
            scheduler = self.pipe.scheduler
            self._start_call()
            _attach_step_counter(scheduler)
            try:
                yield
            finally:
                _detach_step_counter(scheduler)
                self.last_call = self.recorder.finish()
                self._reset_states()
                self._reset_call_counters()
                _ACTIVE.reset(token)

    def _start_call(self) -> None:
        self._reset_call_counters()
        self.recorder.finish()
        self._reset_states()

    def _reset_states(self) -> None:
        for scope in self.scopes:
            for state in scope.states:
                state.reset()

    def _branch_name(self) -> str:
        adapter, named = self.adapter, self._cache_context_name
        if named is not None:
            return dict(adapter.context_branches).get(named, named)
        if adapter.cfg == "separate" and self._calls_in_step < len(adapter.cfg_call_order):
            return adapter.cfg_call_order[self._calls_in_step]
        return f"call{self._calls_in_step}"

    def _begin_forward(self, denoiser: str, module, args, kwargs) -> None:
        step = self._scheduler_steps
        if step != self._last_step:
            self._last_step, self._calls_in_step = step, 0
        else:
            self._calls_in_step += 1
        branch = self._branch_name()
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        num_steps = len(timesteps) if timesteps is not None else None
        adapter = self.adapter
        self.current = StepInfo(
            step, num_steps, branch, self._calls_in_step, denoiser,
            lambda: adapter.token_layout(module, args, kwargs),
        )
        blocks = self.blocks[denoiser]
        self.recorder.begin_forward(step, branch, len(blocks), sum(len(b.branches) for b in blocks))

    def is_active(self) -> bool:
        return active_context() is self


# --------------------------------------------------------------------------------------------- scope


class MethodScope:
    """What an accelerator's ``apply(scope, config)`` works through; everything it adds is removed with it."""

    def __init__(self, context: PipelineContext, name: str, config: AccelConfig | None = None) -> None:
        self.context = context
        self.config = config
        self.name = name
        self.states: list[ResettableState] = []
        self.extras: dict[str, Any] = {}  # figures for accel.summary(pipe).extras[name]
        self._hooks: list[tuple[torch.nn.Module, str]] = []
        self._preparers: list[Callable[[dict[str, Any]], None]] = []
        self._when_applied: list[Callable[[], None]] = []
        self.unwrap_refusal: str | None = None  # set by a method whose change cannot be undone: unwrap says this

    # What the accelerator reads.
    @property
    def adapter(self) -> FamilyAdapter:
        return self.context.adapter

    @property
    def family(self) -> str:
        return self.context.family

    @property
    def denoisers(self) -> dict[str, torch.nn.Module]:
        return self.context.denoisers

    @property
    def blocks(self) -> dict[str, list[BlockInfo]]:
        return self.context.blocks

    @property
    def pipe(self):
        return self.context.pipe

    @property
    def current(self) -> StepInfo | None:
        """Step, CFG branch and token layout of the denoiser forward now running (``None`` outside one)."""
        return self.context.current

    def is_active(self) -> bool:
        """Whether this pipeline's call is running in this thread; hooks pass through when it is not."""
        return self.context.is_active()

    def applied_methods(self) -> list[str]:
        """The names of the methods applied to this pipeline so far (this one among them once it is applied)."""
        return [scope.name for scope in self.context.scopes]

    # What the accelerator adds.
    def add_state(self, state: ResettableState) -> ResettableState:
        """Register per-call state; ``state.reset()`` runs on entry to every pipeline call and in ``finally``."""
        self.states.append(state)
        state.reset()
        return state

    def add_branch_states(self, factory: Callable[[], State]) -> BranchStates[State]:
        """Per-call state kept apart for every (denoiser, CFG branch): ``states.get(scope.current)``."""
        return self.add_state(BranchStates(factory))

    @contextlib.contextmanager
    def observe_steps(self, observer: Callable[[Any, int], Any]) -> Iterator[None]:
        """Within the ``with`` block, ``observer(step output, steps done)`` runs after every ``scheduler.step`` of
        this pipeline's calls and returns the output to hand on (calibration reads or replaces it)."""
        self.context.step_observers.append(observer)
        try:
            yield
        finally:
            self.context.step_observers.remove(observer)

    def before_each_call(self, prepare: Callable[[dict[str, Any]], None]) -> None:
        """Run ``prepare(arguments)`` before every call of the pipeline, outside the call (hooks inert), with the
        call's arguments by name (positional ones named, defaults not filled in). It may call the pipeline, e.g.
        to calibrate on the call's own inputs; it is removed with the method."""
        self.context.call_preparers.append(prepare)
        self._preparers.append(prepare)

    def call_undecorated(self, **kwargs):
        """Call the pipeline through its class's own ``__call__`` without the ``torch.no_grad`` decorator diffusers
        puts on it, inside this pipeline's call tracking, so a calibration can differentiate through the sampling
        run (under ``torch.enable_grad()``). ``ValueError`` if that ``__call__`` wraps no undecorated function."""
        pipe = self.pipe
        base = type(pipe).__dict__.get("_accel_base_class", type(pipe))
        call = getattr(base.__call__, "__wrapped__", None)
        if call is None:
            raise ValueError(f"{self.name}: running {type(pipe).__name__} with gradients needs the undecorated "
                             "__call__ of a diffusers pipeline (the one under its torch.no_grad decorator); this one "
                             "wraps none.")
        with self.context.pipeline_call():
            return call(pipe, **kwargs)

    def when_applied(self, action: Callable[[], None]) -> None:
        """Run ``action`` once every method of this ``accel.wrap`` call applied without error: a change that cannot
        be undone (freeing weights) goes here, so a failing method later in the stack leaves the pipeline as it
        was."""
        self._when_applied.append(action)

    def run_when_applied(self) -> None:
        actions, self._when_applied = self._when_applied, []
        for action in actions:
            action()

    def register_hook(self, module: torch.nn.Module, hook: ModelHook, suffix: str = "") -> None:
        """Register a diffusers ``ModelHook`` on ``module`` under a name owned by this method."""
        name = f"accel.{self.name}" + (f".{suffix}" if suffix else "")
        self.context.wake(module)
        _register(module, hook, name)
        self._hooks.append((module, name))

    def compiled_like(self, module: torch.nn.Module, function: Callable) -> Callable:
        """``function`` under torch.compile with the settings ``module``'s computation was compiled with, else
        ``function`` itself: for tensor work a method does in a module's stead (a reused block's output)."""
        entry = self.context._compute_hooks.get(id(module))
        kwargs = None if entry is None or entry[1].compiled is None else entry[1].compile_kwargs
        return function if kwargs is None else compiling.compiled_function(function, kwargs)

    def span_output(self, module: torch.nn.Module, make_member: Callable[[], compiling.SpanMember | None],
                    args: tuple, kwargs: dict) -> Any | None:
        """For a hook that returns block ``module``'s output without running it: under a denoiser compiled whole,
        that output from a span of such blocks (``accel.compiling.BlockSpans``; ``make_member()``: this block's
        "replaced" member), else None: the hook computes it itself."""
        spans, index = self._spans_of(module)
        return None if spans is None else spans.output_for(index, "replaced", make_member, args, kwargs)

    def held_span_output(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any | None:
        """Block ``module``'s output if a running span of replaced blocks holds it for this very call: the hook that
        replaced it decided so when the span started, from the same state (see ``span_output``), else None."""
        spans, index = self._spans_of(module)
        return None if spans is None else spans.held_output(index, "replaced", args, kwargs)

    def _spans_of(self, block: torch.nn.Module) -> tuple[compiling.BlockSpans | None, int]:
        """The spans ``block`` belongs to (a denoiser compiled whole) and its index there, or (None, -1)."""
        entry = self.context._compute_hooks.get(id(block))
        if entry is None or entry[1].spans is None or entry[1].index < 0:
            return None, -1
        return entry[1].spans, entry[1].index

    def only_counted(self, module: torch.nn.Module) -> bool:
        """Whether accel's counter is the only hook on ``module`` so far: a hook registered now wraps no other
        method's, so returning without calling the module skips no one's bookkeeping. Later hooks run outside it."""
        registry = getattr(module, "_diffusers_hook", None)
        return registry is None or all(name == _COUNTER_HOOK for name in registry.hooks)

    def intercept_attention(self, module: torch.nn.Module, replacement, *, kind: str, name: str = "") -> None:
        """Replace the attention computation (the SDPA call) inside ``module`` with ``replacement(call)``.

        See ``accel.attention``. One method per attention module: a second raises ``ValueError``.
        """
        owner = self.context.attention_owners.get(id(module))
        if owner is not None:
            raise ValueError(f"{self.name!r} and {owner!r} both replace the attention of {name or module}.")
        check_interceptable(module, name)
        self.register_hook(module, AttentionInterceptHook(self, replacement, kind=kind, name=name), "attention")
        self.context.attention_owners[id(module)] = self.name

    def record_attention_density(self, density: float) -> None:
        """Report the share of the attention matrix computed by the call running now (1.0 = dense)."""
        record = self.context.recorder.current
        if record is not None and self.is_active():
            record.attention_reported += 1
            record.attention_density_sum += float(density)

    def remove(self) -> None:
        for module, name in reversed(self._hooks):
            _unregister(module, name)
        self._hooks.clear()
        owners = self.context.attention_owners
        self.context.attention_owners = {key: owner for key, owner in owners.items() if owner != self.name}
        for state in self.states:
            state.reset()
        self.states.clear()
        for prepare in self._preparers:
            if prepare in self.context.call_preparers:
                self.context.call_preparers.remove(prepare)
        self._preparers.clear()


# ---------------------------------------------------------------------------------------- attaching


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
                prepare = getattr(owner, "prepare_call", None)
                if prepare is not None:
                    prepare(args, kwargs)
                with owner.pipeline_call():
                    return original_call(self, *args, **kwargs)

            functools.update_wrapper(__call__, original_call)
            namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                         "__doc__": cls.__doc__, "_accel_base_class": cls, "_accel_call_attr": attr}
            wrapped = _WRAPPED_CLASSES[(cls, attr)] = type(cls.__name__, (cls,), namespace)
        return wrapped


def _call_arguments(pipe, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by name: positional ones get their parameter names from the pipeline's ``__call__``."""
    if not args:
        return dict(kwargs)
    base = type(pipe).__dict__.get("_accel_base_class", type(pipe))
    signature = inspect.signature(base.__call__)
    try:
        bound = signature.bind_partial(pipe, *args, **kwargs)
    except TypeError as error:
        raise TypeError(f"{type(pipe).__name__}.__call__: {error}") from None
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(arguments)))  # self
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:  # binds as one dict
            arguments.update(arguments.pop(parameter.name, {}))
    return arguments


def context_of(pipe) -> PipelineContext | None:
    """The ``PipelineContext`` of a wrapped pipeline instance, ``None`` if it is not wrapped."""
    return getattr(pipe, "__dict__", {}).get(CONTEXT_ATTR)


def attach_context(pipe, adapter: FamilyAdapter) -> PipelineContext:
    """Install accel's step tracking and counters on ``pipe`` and switch its class to the call-wrapping one."""
    context = PipelineContext(pipe, adapter)
    context.install()
    pipe.__dict__[CONTEXT_ATTR] = context
    pipe.__class__ = call_wrapping_class(type(pipe), CONTEXT_ATTR)
    return context


def detach_context(pipe) -> None:
    """Remove everything ``attach_context`` and the scopes added; the pipeline is as it was before."""
    context = context_of(pipe)
    if context is None:
        return
    context.uninstall()
    del pipe.__dict__[CONTEXT_ATTR]
    if type(pipe).__dict__.get("_accel_call_attr") == CONTEXT_ATTR:
        pipe.__class__ = type(pipe).__dict__["_accel_base_class"]


@contextlib.contextmanager
def temporary_scope(pipe, name: str, install: Callable[[MethodScope], None]) -> Iterator[MethodScope]:
    """A method scope on ``pipe`` for the length of a ``with`` block (calibration passes record through one).

    ``install(scope)`` registers its hooks; on exit they are removed, and a pipeline that was not wrapped before
    is unwrapped again.
    """
    context = context_of(pipe)
    created = context is None
    if created:
        context = attach_context(pipe, adapter_for(pipe))
    scope = MethodScope(context, name)
    try:
        with context.changing(f"accel's {name} pass"):
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
                detach_context(pipe)
