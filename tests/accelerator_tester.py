"""The tester mixin every accelerator passes.

Subclass it, set ``families`` and implement ``make_config()``:

    class TestBAC(AcceleratorTesterMixin):
        families = ("dit", "flux")
        def make_config(self):
            return BACConfig(...)

For every family it checks: unwrap restores bit-identical output; the same seed gives the same output; no state
leaks across calls that change batch size, steps, resolution, frame count or guidance (each call equals the same
call on a freshly wrapped pipeline); a wrapped and a plain instance coexist, also running in two threads at once.
"""

from __future__ import annotations

import threading

import numpy as np

import accel
from accel.pipelines import tiny

_LARGER_SIZE = {"wan": 32, "wan2.2": 32, "cogvideox": 48, "hunyuan-video": 32}
_MORE_FRAMES = {"wan": 9, "wan2.2": 9, "cogvideox": 13, "hunyuan-video": 9}


def run(pipe, family: str, **kwargs) -> np.ndarray:
    output = pipe(**tiny.example_inputs(family, **kwargs))
    return np.asarray(output.images if hasattr(output, "images") else output.frames)


def call_variations(family: str) -> list[dict]:
    """The base call, then calls that change one thing each, then the base call again."""
    variations = [{}, {"batch_size": 2}, {"num_inference_steps": 4}, {"size": _LARGER_SIZE.get(family, 16)},
                  {"guidance": False}]
    if family in tiny.VIDEO_FAMILIES:
        variations.append({"num_frames": _MORE_FRAMES[family]})
    return variations + [{}]


class AcceleratorTesterMixin:
    families: tuple[str, ...] = ()

    def make_config(self):
        raise NotImplementedError

    def wrapped(self, family: str):
        return accel.wrap(tiny.build(family), self.make_config())

    def test_unwrap_restores_bit_identical_output(self, family):
        pipe = tiny.build(family)
        before = run(pipe, family)
        accel.wrap(pipe, self.make_config())
        run(pipe, family)
        accel.unwrap(pipe)
        np.testing.assert_array_equal(run(pipe, family), before)
        np.testing.assert_array_equal(run(tiny.build(family), family), before)

    def test_same_seed_same_output(self, family):
        pipe = self.wrapped(family)
        np.testing.assert_array_equal(run(pipe, family), run(pipe, family))

    def test_no_state_leak_across_calls(self, family):
        pipe = self.wrapped(family)
        for kwargs in call_variations(family):
            fresh = run(self.wrapped(family), family, **kwargs)
            np.testing.assert_array_equal(run(pipe, family, **kwargs), fresh, err_msg=f"after call {kwargs}")

    def test_wrapped_and_plain_instances_coexist(self, family):
        plain, wrapped = tiny.build(family), self.wrapped(family)
        plain_reference = run(tiny.build(family), family)
        wrapped_reference = run(self.wrapped(family), family)
        np.testing.assert_array_equal(run(wrapped, family), wrapped_reference)
        np.testing.assert_array_equal(run(plain, family), plain_reference)
        assert type(plain) is not type(wrapped) and type(plain).__name__ == type(wrapped).__name__
        assert not accel.is_wrapped(plain)

    def test_wrapped_and_plain_instances_in_two_threads(self, family):
        plain, wrapped = tiny.build(family), self.wrapped(family)
        expected = {"plain": run(tiny.build(family), family), "wrapped": run(self.wrapped(family), family)}
        results: dict[str, list] = {"plain": [], "wrapped": []}
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def work(name, pipe):
            try:
                barrier.wait()
                for _ in range(3):
                    results[name].append(run(pipe, family))
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
