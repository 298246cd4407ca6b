"""The tester mixin every accelerator passes.

Subclass it, set ``families`` and ``saves`` and implement ``make_config()`` (and ``config_for(family)`` where a
family needs its own, e.g. a calibrated artifact):

    class TestBAC(AcceleratorTesterMixin):
        families = ("dit", "flux")
        saves = "branches"          # the accel.summary figure the method must bring below 1
        def make_config(self):
            return BACConfig(...)

For every family it checks: the method does something (``saves``: the summary's blocks or branches computed, or
its attention density, is below 1 on the test inputs); unwrap restores bit-identical output; the same seed gives
the same output; no state leaks across calls that change batch size, steps, resolution, frame count or guidance
(each call equals the same call on a freshly wrapped pipeline); a wrapped and a plain instance coexist, also in two
threads at once. Once per class: every preset of the method round-trips through JSON, and on one family
(``compile_family``, default "dit") the wrapped denoiser compiled whole or block by block (``module.compile()``,
dynamo's aot_eager backend) gives the eager outputs and compiles nothing after its first call, over three calls
with two step counts. ``call_kwargs(family)``
gives inputs on which the method has work to skip (the sparse methods need more tokens than a block).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import accel
from accel.eval.metrics import output_array
from accel.hooks import context_of
from accel.pipelines import tiny
from accel.registry import resolve

_LARGER_SIZE = {"wan": 32, "wan2.2": 32, "cogvideox": 48, "hunyuan-video": 32, "skyreels-v2": 32, "ltx-video": 64,
                "allegro": 32, "sana": 64, "lumina2": 64, "easyanimate": 32}
_MORE_FRAMES = {"wan": 9, "wan2.2": 9, "cogvideox": 13, "hunyuan-video": 9, "skyreels-v2": 9, "ltx-video": 9,
                "allegro": 9, "easyanimate": 9}


def run(pipe, family: str, **kwargs) -> np.ndarray:
    output = pipe(**tiny.example_inputs(family, **kwargs))
    return output_array(output)


def call_variations(family: str) -> list[dict]:
    """The base call, then calls that change one thing each, then the base call again."""
    variations = [{}, {"batch_size": 2}, {"num_inference_steps": 4}, {"size": _LARGER_SIZE.get(family, 16)},
                  {"guidance": False}]
    if family in tiny.VIDEO_FAMILIES:
        variations.append({"num_frames": _MORE_FRAMES[family]})
    return variations + [{}]


def compilations() -> dict[str, int]:
    """What dynamo compiled so far: frames it tried (recompilations included) and graphs it made."""
    return {"frames": counters["frames"]["total"], "graphs": counters["stats"]["unique_graphs"]}


def compile_wrapped(pipe, how: str):
    """``module.compile(backend="aot_eager")`` on the wrapped denoisers ("whole") or on each of their blocks."""
    context = context_of(pipe)
    if how == "whole":
        modules = list(context.denoisers.values())
    else:
        modules = [block.module for blocks in context.blocks.values() for block in blocks]
    for module in modules:
        module.compile(backend="aot_eager")
    return pipe


_SUMMARY_FIGURES = {"blocks": "blocks_computed_share", "branches": "branches_computed_share",
                    "attention": "attention_density"}


class AcceleratorTesterMixin:
    families: tuple[str, ...] = ()
    saves: str | None = None  # "blocks", "branches" or "attention"; None only for a method that skips nothing
    compile_family: str | None = None  # the family of the compile test; default "dit", else the first declared

    def make_config(self):
        raise NotImplementedError

    def config_for(self, family: str):
        """The config the family's tests wrap with (a calibrated method's carries that family's artifact)."""
        return self.make_config()

    def call_kwargs(self, family: str) -> dict:
        """``tiny.example_inputs`` kwargs for this method's tests, on top of each test's own."""
        return {}

    def build(self, family: str):
        """A fresh tiny pipeline of ``family`` for this method's tests."""
        return tiny.build(family)

    def wrapped(self, family: str):
        return accel.wrap(self.build(family), self.config_for(family))

    def run(self, pipe, family: str, **kwargs) -> np.ndarray:
        return run(pipe, family, **{**self.call_kwargs(family), **kwargs})

    def test_the_method_saves_work(self, family):
        if self.saves is None:
            pytest.skip(f"{type(self).__name__} declares a method that skips nothing")
        pipe = self.wrapped(family)
        self.run(pipe, family)
        figure = getattr(accel.summary(pipe), _SUMMARY_FIGURES[self.saves])
        assert figure is not None and figure < 1.0, f"{self.saves}: {figure} on {family}"

    def test_every_preset_round_trips_through_json(self):
        method = self.make_config().method
        (entry,) = [entry for entry in accel.available() if entry["name"] == method]
        for preset in entry["presets"]:
            (config,) = resolve(preset)
            again = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
            assert again == config, preset
        config = self.make_config()
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config

    def test_unwrap_restores_bit_identical_output(self, family):
        pipe = self.build(family)
        before = self.run(pipe, family)
        accel.wrap(pipe, self.config_for(family))
        self.run(pipe, family)
        accel.unwrap(pipe)
        np.testing.assert_array_equal(self.run(pipe, family), before)
        np.testing.assert_array_equal(self.run(self.build(family), family), before)

    def test_same_seed_same_output(self, family):
        pipe = self.wrapped(family)
        np.testing.assert_array_equal(self.run(pipe, family), self.run(pipe, family))

    def test_no_state_leak_across_calls(self, family):
        pipe = self.wrapped(family)
        for kwargs in call_variations(family):
            fresh = self.run(self.wrapped(family), family, **kwargs)
            np.testing.assert_array_equal(self.run(pipe, family, **kwargs), fresh, err_msg=f"after call {kwargs}")

    def test_wrapped_and_plain_instances_coexist(self, family):
        plain, wrapped = self.build(family), self.wrapped(family)
        plain_reference = self.run(self.build(family), family)
        wrapped_reference = self.run(self.wrapped(family), family)
        np.testing.assert_array_equal(self.run(wrapped, family), wrapped_reference)
        np.testing.assert_array_equal(self.run(plain, family), plain_reference)
        assert type(plain) is not type(wrapped) and type(plain).__name__ == type(wrapped).__name__
        assert not accel.is_wrapped(plain)

    def test_wrapped_and_plain_instances_in_two_threads(self, family):
        plain, wrapped = self.build(family), self.wrapped(family)
        expected = {"plain": self.run(self.build(family), family), "wrapped": self.run(self.wrapped(family), family)}
        results: dict[str, list] = {"plain": [], "wrapped": []}
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def work(name, pipe):
            try:
                barrier.wait()
                for _ in range(3):
                    results[name].append(self.run(pipe, family))
            except BaseException as error:  # surfaced below
                errors.append(error)

        threads = [threading.Thread(target=work, args=item) for item in (("plain", plain), ("wrapped", wrapped))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for name, outputs in results.items():
            assert len(outputs) == 3
            for output in outputs:
                np.testing.assert_array_equal(output, expected[name], err_msg=name)

    @pytest.mark.parametrize("how", ["whole", "blocks"])
    def test_compiled_stays_compiled(self, how):
        family = self.compile_family or ("dit" if "dit" in self.families else self.families[0])
        pipe = self.wrapped(family)
        steps = (3, 4, 3)
        eager = [self.run(pipe, family, num_inference_steps=count) for count in steps]
        torch._dynamo.reset()
        compile_wrapped(pipe, how)
        counters.clear()
        compiled = []
        for index, count in enumerate(steps):
            compiled.append(self.run(pipe, family, num_inference_steps=count))
            if index == 0:
                after_first = compilations()
        assert after_first["graphs"] > 0, f"nothing was compiled on {family}"
        assert compilations() == after_first, f"compiled again after the first call on {family}"
        # a second instance reuses every graph: dynamo guards on no hook, decision or other per-instance state
        second = compile_wrapped(self.wrapped(family), how)
        self.run(second, family, num_inference_steps=steps[0])
        assert compilations() == after_first, f"a second instance compiled again on {family}"
        for count, got, expected in zip(steps, compiled, eager):
            np.testing.assert_allclose(got, expected, atol=1e-3, err_msg=f"{count} steps on {family}")
