"""Peer caching methods, each applied to one diffusers pipeline instance for a side-by-side benchmark.

``apply_peer(pipe, name, calibration_kwargs)`` enables a peer on ``pipe`` in place and returns a function that
removes it again; after removal the pipeline's output is bit-identical to before. Everything is installed on this
pipeline's own modules (diffusers ``HookRegistry`` hooks and instance attributes), so two pipelines of the same
class stay independent. ``peer_status(name, pipe)`` says why a peer cannot run (``None`` when it can).

``calibration_kwargs`` are the call kwargs the benchmark will run the pipeline with. MagCache calibrates on them
(one full run, generators left as they were); DBCache reads the step count and whether CFG is on from them.

The peers and the configuration each gets (the library's documented defaults unless said otherwise):

* ``fbc-0.1``, ``fbc-0.2``: First Block Cache (ParaAttention; diffusers ``FirstBlockCacheConfig``). Runs the first
  transformer block and skips the rest of the step, reusing the last computed residual, while the first block's
  residual changed by less than ``threshold`` (relative mean absolute difference) since the last full step.
* ``taylorseer-blocks``, ``taylorseer-attn-ff``: TaylorSeer (Liu et al. 2025, arXiv 2503.06923; diffusers
  ``TaylorSeerCacheConfig``): full steps every ``cache_interval=5`` after ``disable_cache_before_step=3`` warm-up
  steps; in between, module outputs are forecast with a first-order (``max_order=1``) Taylor series in the step
  index. That is the configuration of the example in diffusers' ``apply_taylorseer_cache`` docstring, factors in
  float32 included (bfloat16 measured the same RMSE on digits-dit and only adds casts; second order was slightly
  worse there, RMSE 0.037 instead of 0.034 against the baseline). diffusers' default identifiers
  (``^transformer_blocks.*attn``, full match) hook nothing on DiT or Wan, whose attention modules are called
  ``attn1``/``attn2``, so both variants name their modules from ``accel.pipelines.adapters``:
  ``-blocks`` skips every block but the last on forecast steps and forecasts the last block's output (the final
  norm and projection still run with the current timestep's modulation; diffusers' "lite" mode, moved from
  ``proj_out`` to the last block because DiT has no ``proj_out``); ``-blocks-final`` is the same with
  ``disable_cache_after_step`` set so the final step computes, the departure accel's Δ-DiT and BAC make by default
  (given to TaylorSeer too, so the comparison stays like for like). The default schedule computes steps 0-2 and
  every 5th step from step 4 on, so at 20 and 50 steps (last steps 19 and 49) it computes the final step already
  and the two rows run the same schedule; they differ at other step counts (8: step 7); ``-attn-ff`` forecasts
  every attention and feed-forward output of every block (the paper's per-module features), while norms, gates
  and residual adds run.
* ``magcache``: MagCache (Ma et al. 2025, github.com/Zehong-Ma/MagCache; diffusers ``MagCacheConfig``). Skips
  whole steps while the accumulated error predicted from the per-step magnitude ratios of the residual stays under
  ``threshold=0.06``, at most ``max_skip_steps=3`` in a row, never in the first ``retention_ratio=0.2`` of steps.
  The ratios are model- and schedule-specific: ``apply_peer`` measures them with diffusers' calibration mode on one
  run of ``calibration_kwargs`` (same step count). Wan's cond and uncond branches are calibrated separately and
  averaged, as diffusers applies one ratio table to both.
* ``fastercache``: FasterCache (Lv et al. 2024, arXiv 2410.19355; diffusers ``FasterCacheConfig``). Reuses
  self-attention outputs every other step with the paper's linear extrapolation, and (CFG-Cache) skips the
  unconditional half of the batch, rebuilding it from the conditional output plus the cached low/high-frequency
  difference. diffusers' defaults (its flat attention weight 0.5, passed explicitly; the paper's 0-to-1 ramp
  measured the same on digits-dit, RMSE 0.0214 against 0.0213), with ``class_labels`` added to the inputs it
  halves (DiT's class embedder needs them halved with the batch). diffusers assumes a batch ordered [uncond,
  cond]; DiTPipeline batches [cond, uncond], so the peer swaps the halves around the transformer call. Without
  the swap CFG-Cache rebuilds the conditional branch from the unconditional one: 2.5x the RMSE against the
  baseline on digits-dit (0.054 instead of 0.021).
* ``pab``: Pyramid Attention Broadcast (Zhao et al. 2024, arXiv 2408.12588; diffusers
  ``PyramidAttentionBroadcastConfig``). Reuses attention outputs: spatial self-attention computed every 2nd call
  inside the timestep window (100, 800), cross-attention every 5th call inside (100, 900), the example
  configuration of the authors' VideoSys (docs/pab.md; these models have no temporal attention). The hooks keep
  one state per module, so with Wan's separate cond/uncond calls the unconditional call would get the conditional
  call's attention; the peer keeps one state per ``cache_context`` branch instead.
* ``dbcache-0.08``, ``dbcache-0.2``: DBCache from cache-dit (github.com/vipshop/cache-dit, ``DBCacheConfig``),
  F1B0 (first block always computed, no tail blocks; the configuration of cache-dit's DBCache benchmark table,
  whose thresholds are 0.08 and 0.20) with cache-dit's default warm-up of 8 steps out of 28 scaled to the run's
  step count, unlimited cached steps, and ``enable_separate_cfg`` for Wan when CFG is on.

What this module does beyond calling the libraries, and why:

* ``DiTTransformer2DModel`` is no ``CacheMixin``: it has no ``enable_cache``/``disable_cache``/``cache_context``,
  and DiTPipeline's end-of-call ``maybe_free_model_hooks`` only resets the hooks of ``CacheMixin`` components, so on
  DiT every stateful hook would carry its state (steps, cached residuals, Taylor factors) into the next call. So
  the hooks are installed with diffusers' ``apply_*`` functions and removed by hook name (what ``disable_cache``
  does), and this pipeline instance's class is switched to a subclass (same name and signature) whose
  ``__call__`` resets the transformer's stateful hooks on entry and in ``finally``, as ``accel.wrap`` does.
  Other pipelines of the same class keep the original class.
* DiTPipeline sets no ``cache_context`` either, and First Block Cache and TaylorSeer keep their state per context
  (without one they raise "No cache context is set"). An outermost hook on this transformer gives each forward
  that arrives without a context the context ``"batched"`` (the CFG batch is one branch); Wan's own ``"cond"`` /
  ``"uncond"`` contexts pass through. The same hook records the forward's ``timestep`` for the PAB and FasterCache
  timestep callbacks (DiTPipeline has no ``current_timestep``).
* cache-dit, given a pipeline, patches ``type(pipe).__call__``, i.e. every pipeline of that class. It is given the
  transformer alone instead (cache-dit's "transformer-only" mode, with a persistent cache context), and the
  per-call reset above refreshes that context: cache-dit's own refresh in that mode comes one step late, so every
  call after the first would start in the previous call's last state.

Cannot run (``peer_status`` says so): ``fastercache`` on WanPipeline (CFG-Cache needs the two branches in one
batched call; Wan runs them as separate transformer calls, and diffusers' hooks raise on a batch of one); the
cache-dit peers when cache-dit is not installed; any peer on a two-expert Wan 2.2 pipeline (``transformer_2``).

Tested with diffusers 0.42.1, torch 2.14.1 (CPU) and cache-dit 1.5.3, on ``DiTPipeline`` and ``WanPipeline``
(tests/test_peers.py, tiny random models). On the reference ``digits-dit`` (12 blocks, 20 DDIM steps, guidance
1.5, 8 digits x 2 seeds, 2 CPU cores) every peer kept the classifier's 100% accuracy; attention and feed-forward
calls actually computed (of 240 each) and the images' RMSE against the baseline (pixels in [0, 1]):

==================  =========  ===  ======
peer                attention  ff   RMSE
==================  =========  ===  ======
fbc-0.1             174        174  0.0076
fbc-0.2             86         86   0.0336
taylorseer-blocks   84         84   0.0342
taylorseer-attn-ff  84         84   0.0343
magcache            108        108  0.0250
fastercache         180        240  0.0213  (and the unconditional half of the batch skipped on 10 of 20 steps)
pab                 156        240  0.0098
dbcache-0.08        229        229  0.0018
dbcache-0.2         141        141  0.0212
==================  =========  ===  ======
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import importlib.util
import inspect
import io
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager, _set_cache_context
from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

from accel.hooks import call_wrapping_class
from accel.pipelines.adapters import ATTENTION_BRANCHES, FamilyAdapter, adapter_for

_CONTEXT_HOOK = "benchmarks.peers.context"
_RESET_ATTR = "_benchmarks_peers_reset"  # on a pipeline instance: what its __call__ runs around every call
_BATCHED_BRANCH = "batched"  # the cache_context name of a forward that carries the whole (CFG-batched) batch
_CACHE_DIT_LOGGER = "CACHE_DIT"
_CACHE_DIT_API = ("DBCacheConfig", "enable_cache", "disable_cache", "refresh_context", "BlockAdapterRegister")

# diffusers' installer and hook names per config type: what `CacheMixin.enable_cache`/`disable_cache` would do,
# done here directly because DiTTransformer2DModel is no CacheMixin.
_DIFFUSERS_METHODS: dict[type, tuple[Callable[..., None], tuple[str, ...]]] = {
    FirstBlockCacheConfig: (apply_first_block_cache, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)),
    TaylorSeerCacheConfig: (apply_taylorseer_cache, (_TAYLORSEER_CACHE_HOOK,)),
    MagCacheConfig: (apply_mag_cache, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK)),
    FasterCacheConfig: (apply_faster_cache, (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK)),
    PyramidAttentionBroadcastConfig: (apply_pyramid_attention_broadcast, (_PYRAMID_ATTENTION_BROADCAST_HOOK,)),
}

Remover = Callable[[], None]


# ------------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class _Run:
    """What a peer may know about the calls it will serve, read from ``calibration_kwargs``."""

    steps: int
    guidance: bool
    kwargs: dict[str, Any] | None


def _call_default(pipe, name: str) -> Any:
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def _run_of(pipe, calibration_kwargs: dict[str, Any] | None) -> _Run:
    kwargs = calibration_kwargs or {}
    steps = kwargs.get("num_inference_steps", _call_default(pipe, "num_inference_steps"))
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}.")
    scale = kwargs.get("guidance_scale", _call_default(pipe, "guidance_scale"))
    return _Run(steps, scale is not None and scale > 1.0, calibration_kwargs)


# ------------------------------------------------------------------------------------------ per-call reset


class _ResetAroundCalls:
    """What ``accel.hooks.call_wrapping_class`` runs around every call of a pipeline with a peer applied."""

    def __init__(self, reset: Callable[[], None]) -> None:
        self.reset = reset

    @contextlib.contextmanager
    def pipeline_call(self):
        self.reset()
        try:
            yield
        finally:
            self.reset()


def _peer_class(cls: type) -> type:
    """A subclass of ``cls`` (same name, module, signature) whose ``__call__`` resets the instance's hooks on entry
    and in ``finally``; only the instance whose ``__class__`` is switched to it is affected."""
    return call_wrapping_class(cls, _RESET_ATTR)


# ------------------------------------------------------------------------------------------ the context hook


class _BranchState(BaseState):
    """One CFG branch's copy of the state of hooks that keep a single state per module (PAB)."""

    def __init__(self, hooks: tuple[ModelHook, ...]) -> None:
        self.states = {hook: type(hook.state)() for hook in hooks}

    def reset(self) -> None:
        for state in self.states.values():
            state.reset()


@torch.compiler.disable
def _scalar_timestep(timestep) -> float | None:
    if timestep is None:
        return None
    return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)


def _swap_halves(value: torch.Tensor) -> torch.Tensor:
    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class _PeerContextHook(ModelHook):
    """Outermost hook on the transformer: branch context, timestep, per-branch states, CFG batch order, reset.

    ``_is_stateful`` so that diffusers' ``cache_context`` reaches its ``StateManager`` (that is how it learns the
    branch) and every reset of the transformer's stateful hooks reaches ``reset_state``.
    """

    _is_stateful = True

    def __init__(self, swap_cfg_halves: bool = False) -> None:
        super().__init__()
        self.swap_cfg_halves = swap_cfg_halves
        self.timestep: float | None = None
        self.on_reset: list[Callable[[], None]] = []
        self.state_manager = StateManager(_BranchState, ((),))
        self._timestep_index: int | None = None

    def keep_state_per_branch(self, hooks: list[ModelHook]) -> None:
        self.state_manager = StateManager(_BranchState, (tuple(hooks),))

    def initialize_hook(self, module):
        parameters = list(inspect.signature(type(module).forward).parameters)[1:]
        self._timestep_index = parameters.index("timestep") if "timestep" in parameters else None
        return module

    def current_timestep(self) -> float:
        if self.timestep is None:
            raise RuntimeError("The peer's timestep callback was called outside a transformer forward.")
        return self.timestep

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        timestep = kwargs.get("timestep")
        if timestep is None and self._timestep_index is not None and self._timestep_index < len(args):
            timestep = args[self._timestep_index]
        self.timestep = _scalar_timestep(timestep)
        if self.state_manager._context is not None:  # the pipeline set one (Wan: "cond" / "uncond")
            return self._forward(args, kwargs)
        _set_cache_context(module, CacheContext(_BATCHED_BRANCH))
        try:
            return self._forward(args, kwargs)
        finally:
            _set_cache_context(module, None)

    def _forward(self, args, kwargs):
        for hook, state in self.state_manager.get_state().states.items():
            hook.state = state
        if not self.swap_cfg_halves:
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch = hidden_states.shape[0]

        def swap(value):
            is_batched = torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch and batch % 2 == 0
            return _swap_halves(value) if is_batched else value

        output = self.fn_ref.original_forward(*map(swap, args), **{k: swap(v) for k, v in kwargs.items()})
        if isinstance(output, tuple):
            return (swap(output[0]), *output[1:])
        if torch.is_tensor(output):
            return swap(output)
        output.sample = swap(output.sample)
        return output

    def reset_state(self, module):
        self.state_manager.reset()
        self.timestep = None
        for reset in self.on_reset:
            reset()
        return module


# ------------------------------------------------------------------------------------------ install / remove


class _Snapshot:
    """The instance attributes and child modules of a module tree, to drop whatever a peer leaves behind."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.root = root
        self.entries = [(module, set(vars(module)), set(module._modules)) for module in root.modules()]

    def restore(self) -> None:
        for module, attributes, children in self.entries:
            for name in set(module._modules) - children:
                del module._modules[name]
            registry = module.__dict__.get("_diffusers_hook")
            in_use = registry is not None and bool(registry.hooks)  # someone else's hooks: leave them working
            for name in set(vars(module)) - attributes:
                if not (in_use and name in ("_diffusers_hook", "forward")):
                    del module.__dict__[name]
        _invalidate_registries(self.root)


def _invalidate_registries(module: torch.nn.Module) -> None:
    # diffusers caches which sub-modules carry hooks, for `cache_context`; stale after adding or removing hooks.
    registry = module.__dict__.get("_diffusers_hook")
    if registry is not None:
        registry.invalidate_child_registries_cache()


def _is_peer_applied(pipe) -> bool:
    registry = pipe.transformer.__dict__.get("_diffusers_hook")
    return (
        _RESET_ATTR in pipe.__dict__
        or (registry is not None and registry.get_hook(_CONTEXT_HOOK) is not None)
        or bool(getattr(pipe.transformer, "_is_cached", False))  # cache-dit
    )


def _reset_hooks(transformer: torch.nn.Module) -> None:
    registry = transformer.__dict__.get("_diffusers_hook")
    if registry is not None:
        registry.reset_stateful_hooks(recurse=True)


def _install(pipe, context_hook: _PeerContextHook, enable: Callable[[], None], disable: Callable[[], None]) -> Remover:
    """Run ``enable``, put ``context_hook`` outermost on the transformer and reset its hooks around every call of
    this pipeline instance; return the remover, which undoes all of it (also after a failed ``enable``)."""
    transformer = pipe.transformer
    snapshot = _Snapshot(transformer)
    original_class = type(pipe)
    removed = False

    def remove() -> None:
        nonlocal removed
        if removed:
            return
        removed = True
        pipe.__dict__.pop(_RESET_ATTR, None)
        if type(pipe) is _peer_class(original_class) and type(pipe) is not original_class:
            pipe.__class__ = original_class
        registry = transformer.__dict__.get("_diffusers_hook")
        if registry is not None and registry.get_hook(_CONTEXT_HOOK) is not None:
            registry.remove_hook(_CONTEXT_HOOK, recurse=False)
        disable()
        snapshot.restore()

    try:
        enable()
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(context_hook, _CONTEXT_HOOK)
        _invalidate_registries(transformer)
        pipe.__dict__[_RESET_ATTR] = _ResetAroundCalls(functools.partial(_reset_hooks, transformer))
        pipe.__class__ = _peer_class(original_class)
    except BaseException:
        remove()
        raise
    return remove


def _enable_diffusers(transformer: torch.nn.Module, config) -> None:
    apply, _ = _DIFFUSERS_METHODS[type(config)]
    apply(transformer, config)


def _disable_diffusers(transformer: torch.nn.Module, config) -> None:
    _, hook_names = _DIFFUSERS_METHODS[type(config)]
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in hook_names:
        registry.remove_hook(name, recurse=True)


def _install_diffusers(pipe, config, context_hook: _PeerContextHook | None = None, after_enable=None) -> Remover:
    transformer = pipe.transformer

    def enable() -> None:
        _enable_diffusers(transformer, config)
        if after_enable is not None:
            after_enable()

    return _install(
        pipe, context_hook or _PeerContextHook(), enable, functools.partial(_disable_diffusers, transformer, config)
    )


def _hooks_named(transformer: torch.nn.Module, name: str) -> list[ModelHook]:
    hooks = []
    for module in transformer.modules():
        registry = module.__dict__.get("_diffusers_hook")
        hook = registry.get_hook(name) if registry is not None else None
        if hook is not None:
            hooks.append(hook)
    return hooks


# ------------------------------------------------------------------------------------------ diffusers peers


def _install_fbc(pipe, run: _Run, *, threshold: float) -> Remover:
    return _install_diffusers(pipe, FirstBlockCacheConfig(threshold=threshold))


def _taylorseer_config(**options) -> TaylorSeerCacheConfig:
    return TaylorSeerCacheConfig(
        cache_interval=5, disable_cache_before_step=3, max_order=1, taylor_factors_dtype=torch.float32, **options
    )


def _install_taylorseer_blocks(pipe, run: _Run, *, final_step: bool = False) -> Remover:
    names = [re.escape(block.name) for block in adapter_for(pipe).blocks(pipe.transformer)]
    config = _taylorseer_config(skip_predict_identifiers=names[:-1], cache_identifiers=names[-1:],
                                disable_cache_after_step=run.steps - 1 if final_step else None)
    return _install_diffusers(pipe, config)


def _install_taylorseer_attn_ff(pipe, run: _Run) -> Remover:
    names = [
        re.escape(qualified)
        for block in adapter_for(pipe).blocks(pipe.transformer)
        for kind, (qualified, _) in block.branches.items()
        if kind in ATTENTION_BRANCHES or kind in ("ff", "ff_context")
    ]
    return _install_diffusers(pipe, _taylorseer_config(cache_identifiers=names))


@contextlib.contextmanager
def _generators_kept(kwargs: dict[str, Any]) -> Iterator[None]:
    """Put every generator in ``kwargs`` back where it was afterwards, so calibration consumes none of them."""
    generators = kwargs.get("generator")
    generators = generators if isinstance(generators, (list, tuple)) else [generators]
    generators = [g for g in generators if isinstance(g, torch.Generator)]
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def _magcache_ratios(pipe, run: _Run) -> torch.Tensor:
    """One run in diffusers' MagCache calibration mode; its magnitude ratios, averaged over the CFG branches."""
    recorded: dict[str, list[float]] = {}

    def record_ratios() -> None:
        for hook in _hooks_named(pipe.transformer, _MAG_CACHE_BLOCK_HOOK):
            if not hook.is_tail:
                continue

            # The hook drops its ratios when the last step ends, so copy them after every step.
            def record(state, residual, hook=hook, original=hook._perform_calibration_step):
                original(state, residual)
                recorded[hook.state_manager.context.name] = list(state.calibration_ratios)

            hook._perform_calibration_step = record

    config = MagCacheConfig(calibrate=True, num_inference_steps=run.steps)
    remove = _install_diffusers(pipe, config, after_enable=record_ratios)
    try:
        with _generators_kept(run.kwargs), contextlib.redirect_stdout(io.StringIO()):  # it prints the ratios
            pipe(**run.kwargs)
    finally:
        remove()
    lengths = {len(ratios) for ratios in recorded.values()}
    if lengths != {run.steps}:
        raise RuntimeError(f"MagCache calibration recorded {sorted(lengths)} ratios per branch, expected {run.steps}.")
    return torch.tensor(list(recorded.values()), dtype=torch.float32).mean(dim=0)


def _install_magcache(pipe, run: _Run) -> Remover:
    if run.kwargs is None:
        raise ValueError("magcache needs calibration_kwargs: the call kwargs to measure its magnitude ratios on.")
    ratios = _magcache_ratios(pipe, run)
    return _install_diffusers(pipe, MagCacheConfig(mag_ratios=ratios, num_inference_steps=run.steps))


def _install_fastercache(pipe, run: _Run) -> Remover:
    adapter = adapter_for(pipe)
    context_hook = _PeerContextHook(swap_cfg_halves=run.guidance and adapter.cfg_batch_order == ("cond", "uncond"))
    config = FasterCacheConfig(
        current_timestep_callback=context_hook.current_timestep,
        attention_weight_callback=lambda _: 0.5,
        tensor_format="BCHW",
        is_guidance_distilled=not run.guidance,
        _unconditional_conditional_input_kwargs_identifiers=[
            *FasterCacheConfig._unconditional_conditional_input_kwargs_identifiers, "class_labels",
        ],
    )
    return _install_diffusers(pipe, config, context_hook)


def _install_pab(pipe, run: _Run) -> Remover:
    context_hook = _PeerContextHook()
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, cross_attention_block_skip_range=5,
        spatial_attention_timestep_skip_range=(100, 800), cross_attention_timestep_skip_range=(100, 900),
        current_timestep_callback=context_hook.current_timestep,
    )

    def per_branch() -> None:
        context_hook.keep_state_per_branch(_hooks_named(pipe.transformer, _PYRAMID_ATTENTION_BROADCAST_HOOK))

    return _install_diffusers(pipe, config, context_hook, after_enable=per_branch)


# ------------------------------------------------------------------------------------------ cache-dit peers


@contextlib.contextmanager
def _cache_dit_quiet(level: int = logging.WARNING) -> Iterator[None]:
    """cache-dit logs every decision at INFO to stdout, from one logger per module; keep what is above ``level``."""
    loggers = [
        logger for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith(("cache_dit", _CACHE_DIT_LOGGER)) and isinstance(logger, logging.Logger)
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, level))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _install_dbcache(pipe, run: _Run, *, threshold: float) -> Remover:
    import cache_dit

    transformer = pipe.transformer
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1,
        Bn_compute_blocks=0,
        residual_diff_threshold=threshold,
        max_warmup_steps=max(1, round(run.steps * 8 / 28)),
        num_inference_steps=run.steps,
        enable_separate_cfg=adapter_for(pipe).cfg == "separate" and run.guidance,
    )
    context_hook = _PeerContextHook()

    def refresh() -> None:
        with _cache_dit_quiet():
            cache_dit.refresh_context(transformer)

    def enable() -> None:
        with _cache_dit_quiet():
            cache_dit.enable_cache(transformer, cache_config=config)
        context_hook.on_reset.append(refresh)

    def disable() -> None:
        if getattr(transformer, "_is_cached", False):
            with _cache_dit_quiet(logging.ERROR):  # it warns that it did what it was asked
                cache_dit.disable_cache(transformer)

    return _install(pipe, context_hook, enable, disable)


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class _Peer:
    install: Callable[[Any, _Run], Remover]
    library: str  # "diffusers" or "cache-dit"
    batched_cfg_only: bool = False


_PEERS: dict[str, _Peer] = {
    "fbc-0.1": _Peer(functools.partial(_install_fbc, threshold=0.1), "diffusers"),
    "fbc-0.2": _Peer(functools.partial(_install_fbc, threshold=0.2), "diffusers"),
    "taylorseer-blocks": _Peer(_install_taylorseer_blocks, "diffusers"),
    "taylorseer-blocks-final": _Peer(functools.partial(_install_taylorseer_blocks, final_step=True), "diffusers"),
    "taylorseer-attn-ff": _Peer(_install_taylorseer_attn_ff, "diffusers"),
    "magcache": _Peer(_install_magcache, "diffusers"),
    "fastercache": _Peer(_install_fastercache, "diffusers", batched_cfg_only=True),
    "pab": _Peer(_install_pab, "diffusers"),
    "dbcache-0.08": _Peer(functools.partial(_install_dbcache, threshold=0.08), "cache-dit"),
    "dbcache-0.2": _Peer(functools.partial(_install_dbcache, threshold=0.2), "cache-dit"),
}


def _installer(name: str) -> Callable[..., Remover]:
    def install(pipe, calibration_kwargs: dict[str, Any] | None = None) -> Remover:
        return apply_peer(pipe, name, calibration_kwargs)

    install.__name__ = install.__qualname__ = f"install_{name.replace('-', '_').replace('.', '')}"
    install.__doc__ = f"Enable peer {name!r} on ``pipe``; see ``apply_peer``."
    return install


PEERS: dict[str, Callable[..., Remover]] = {name: _installer(name) for name in _PEERS}
"""Peer name -> installer: ``PEERS[name](pipe, calibration_kwargs)`` is ``apply_peer(pipe, name, ...)``."""


def _check_name(name: str) -> _Peer:
    peer = _PEERS.get(name)
    if peer is None:
        close = difflib.get_close_matches(str(name), _PEERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown peer {name!r}.{hint} Known peers: {', '.join(_PEERS)}.")
    return peer


def _cache_dit_status() -> str | None:
    if importlib.util.find_spec("cache_dit") is None:
        return "cache-dit is not installed (`pip install --no-deps cache-dit`; its requirements are already met here)."
    try:
        with _cache_dit_quiet():
            cache_dit = importlib.import_module("cache_dit")
    except Exception as error:  # an incompatible cache-dit can fail in many ways on import
        return f"cache-dit does not import against this diffusers/torch: {type(error).__name__}: {error}"
    missing = [name for name in _CACHE_DIT_API if not hasattr(cache_dit, name)]
    if missing:
        return f"cache-dit {cache_dit.__version__} lacks {', '.join(missing)} (written against cache-dit 1.5.3)."
    return None


def _pipeline_status(peer: _Peer, name: str, pipe) -> str | None:
    pipeline = type(pipe).__name__
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        return f"{pipeline} has no `transformer`; the peers hook a diffusers transformer."
    if getattr(pipe, "transformer_2", None) is not None:
        return f"{pipeline} has two experts (transformer_2); the peers are set up for one transformer."
    try:
        adapter: FamilyAdapter = adapter_for(pipe)
    except ValueError as error:
        return str(error)
    if peer.batched_cfg_only and adapter.cfg == "separate":
        return (
            f"{name}: its CFG-Cache needs the conditional and unconditional branches in one batched call, and "
            f"{pipeline} runs them as separate transformer calls (diffusers' hook fails on the batch of one)."
        )
    if peer.batched_cfg_only and adapter.video:
        return f"{name}: set up for image pipelines (tensor_format BCHW); {pipeline} is a video pipeline."
    if peer.library == "cache-dit":
        import cache_dit

        if not cache_dit.BlockAdapterRegister.is_supported(transformer):
            return f"cache-dit {cache_dit.__version__} has no block adapter for {type(transformer).__name__}."
    return None


def peer_status(name: str, pipe=None) -> str | None:
    """``None`` if peer ``name`` can run here (and on ``pipe``, when given); else a one-line reason why not."""
    peer = _check_name(name)
    if peer.library == "cache-dit":
        reason = _cache_dit_status()
        if reason is not None:
            return reason
    return None if pipe is None else _pipeline_status(peer, name, pipe)


def apply_peer(pipe, name: str, calibration_kwargs: dict[str, Any] | None = None) -> Remover:
    """Enable peer ``name`` on ``pipe`` (in place); return a function that removes it again.

    After the remover runs, the pipeline's output is bit-identical to its output before ``apply_peer``.
    ``calibration_kwargs`` are the call kwargs the benchmark will run: MagCache calibrates on them (one run; any
    generator in them is put back as it was) and needs them; DBCache reads the step count and CFG from them.
    Raises ``ValueError`` for an unknown name, a peer that cannot run here (the reason ``peer_status`` gives), or a
    pipeline that already has a peer applied.
    """
    peer = _check_name(name)
    reason = peer_status(name, pipe)
    if reason is not None:
        raise ValueError(f"Peer {name!r} cannot run: {reason}")
    if _is_peer_applied(pipe):
        raise ValueError(f"{type(pipe).__name__} already has a cache applied; remove it before applying {name!r}.")
    return peer.install(pipe, _run_of(pipe, calibration_kwargs))
