"""Two minimal accelerators that exist only to exercise the machinery (no placeholder ships in ``accel``).

* ``ProbeConfig``: changes nothing. It records, for every denoiser forward, the step / branch / layout it was
  told, and replaces every attention computation with an exact dense one (reporting density 1.0), so wrapped
  output must equal the baseline bit for bit.
* ``ReuseBlocksConfig``: really changes the output. On steps where ``step % period != 0`` it returns each chosen
  block's output cached from the last computed step (keyed by CFG branch), so stale state would show up as
  wrong output. It falls back to computing when the block's input shapes change.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.hooks import ModelHook

from accel import AccelConfig, MethodScope, register_accelerator, unregister_accelerator
from accel.config import check_float, check_int


@dataclasses.dataclass
class ProbeConfig(AccelConfig):
    method = "test-probe"
    intercept_attention: bool = True


class ProbeState:
    def __init__(self) -> None:
        self.forwards: list[tuple[int, int | None, str, str]] = []
        self.layouts: list = []
        self.attention_calls: list[tuple[int, str, str, tuple[int, ...]]] = []
        self.history: list[dict] = []  # what each finished call saw, kept across resets for the tests

    def reset(self) -> None:
        if self.forwards:
            self.history.append(
                {"forwards": self.forwards, "layouts": self.layouts, "attention_calls": self.attention_calls}
            )
        self.forwards, self.layouts, self.attention_calls = [], [], []


class _ProbeHook(ModelHook):
    def __init__(self, scope: MethodScope, state: ProbeState) -> None:
        super().__init__()
        self.scope, self.state = scope, state

    def pre_forward(self, module, *args, **kwargs):
        if self.scope.is_active():
            info = self.scope.current
            self.state.forwards.append((info.step, info.num_steps, info.branch, info.denoiser))
            self.state.layouts.append(info.layout)
        return args, kwargs


def apply_probe(scope: MethodScope, config: ProbeConfig) -> None:
    state = scope.add_state(ProbeState())
    scope.probe_state = state
    for attr, denoiser in scope.denoisers.items():
        scope.register_hook(denoiser, _ProbeHook(scope, state), attr)
    if not config.intercept_attention:
        return

    def exact(call):
        state.attention_calls.append((call.step.step, call.step.branch, call.kind, tuple(call.query.shape)))
        scope.record_attention_density(1.0)
        return call.dense()

    for blocks in scope.blocks.values():
        for block in blocks:
            for kind, (name, module) in block.attentions.items():
                scope.intercept_attention(module, exact, kind=kind, name=name)


@dataclasses.dataclass
class ReuseBlocksConfig(AccelConfig):
    method = "test-reuse"
    period: int = 2
    fraction: float = 0.5  # share of blocks, counted from the last, whose output is reused

    def validate(self) -> None:
        check_int("period", self.period, minimum=1)
        check_float("fraction", self.fraction, minimum=0.0, maximum=1.0)


class ReuseState:
    def __init__(self) -> None:
        self.outputs: dict = {}

    def reset(self) -> None:
        self.outputs = {}


def _shapes(args, kwargs):
    return tuple(tuple(v.shape) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))


class _ReuseHook(ModelHook):
    def __init__(self, scope: MethodScope, state: ReuseState, key: str, period: int) -> None:
        super().__init__()
        self.scope, self.state, self.key, self.period = scope, state, key, period

    def new_forward(self, module, *args, **kwargs):
        info = self.scope.current if self.scope.is_active() else None
        if info is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        cache_key = (self.key, info.branch)
        shapes = _shapes(args, kwargs)
        cached = self.state.outputs.get(cache_key)
        if info.step % self.period != 0 and cached is not None and cached[0] == shapes:
            return cached[1]
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.state.outputs[cache_key] = (shapes, output)
        return output


def apply_reuse(scope: MethodScope, config: ReuseBlocksConfig) -> None:
    state = scope.add_state(ReuseState())
    for attr, blocks in scope.blocks.items():
        count = round(len(blocks) * config.fraction)
        for block in blocks[len(blocks) - count:]:
            scope.register_hook(block.module, _ReuseHook(scope, state, f"{attr}.{block.name}", config.period))


def register() -> None:
    register_accelerator(ProbeConfig, apply_probe, description="test: records what it sees, changes nothing")
    register_accelerator(
        ReuseBlocksConfig, apply_reuse, description="test: reuses rear block outputs on alternate steps",
        presets={"test-reuse-3": lambda: ReuseBlocksConfig(period=3)},
    )


def unregister() -> None:
    unregister_accelerator(ProbeConfig)
    unregister_accelerator(ReuseBlocksConfig)
