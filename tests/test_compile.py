"""torch.compile on wrapped pipelines (``accel.compiling``): what is compiled where, the counts, the hand-back.

The per-accelerator check (compiled outputs equal the eager ones, nothing compiles after the first call) is the
tester mixin's ``test_compiled_stays_compiled``; here the machinery around it, on the tiny DiT.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch._dynamo.utils import counters

import accel
from accel import compiling
from accel.eval.metrics import output_array
from accel.hooks import context_of
from accel.methods.bac import BACConfig
from accel.methods.delta_dit import DeltaDiTConfig
from accel.methods.vmoba import VMoBAConfig
from accel.pipelines import tiny

DELTA = DeltaDiTConfig(interval=2, boundary=0.5, cached_fraction=0.5)
BAC = BACConfig(budget=0.5, calibrate=False)
SPARSE = VMoBAConfig(block_size=16, dense_above=1.0)  # tiny selections would run dense by default


def run(pipe, **kwargs) -> np.ndarray:
    return output_array(pipe(**tiny.example_inputs("dit", **kwargs)))


def hooks_on(module) -> list[str]:
    registry = getattr(module, "_diffusers_hook", None)
    return [] if registry is None else list(registry.hooks)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_a_hooked_forward_keeps_its_signature_and_the_model_its_hooks_out_of_graphs():
    pipe = accel.wrap(tiny.build("dit"), DELTA)
    transformer = pipe.transformer
    plain = inspect.signature(type(transformer).forward)
    assert list(inspect.signature(transformer.forward).parameters) == list(plain.parameters)[1:]
    transformer.compile(backend="aot_eager")
    run(pipe)
    # accel's hook frames are never handed to dynamo: no frame of diffusers' hook chain or of accel was compiled
    graph_breaks = " ".join(counters["graph_break"])
    assert "new_forward" not in graph_breaks and "accel/" not in graph_breaks


def test_the_counts_under_compile_equal_the_eager_counts():
    eager_pipe = accel.wrap(tiny.build("dit"), DELTA)
    run(eager_pipe, num_inference_steps=4)
    eager = accel.summary(eager_pipe)
    pipe = accel.wrap(tiny.build("dit"), DELTA)
    pipe.transformer.compile(backend="aot_eager")
    run(pipe, num_inference_steps=4)
    compiled = accel.summary(pipe)
    assert compiled.blocks_computed_share == eager.blocks_computed_share < 1
    assert compiled.branches_computed_share == eager.branches_computed_share
    assert [r.branches_computed for r in compiled.steps] == [r.branches_computed for r in eager.steps]


def test_branches_nothing_hooks_are_traced_inside_their_block_and_woken_when_a_method_hooks_them():
    pipe = accel.wrap(tiny.build("dit"), DELTA)
    block = context_of(pipe).blocks["transformer"][0]
    _, attention = block.branches["self_attn"]
    assert hooks_on(attention) == ["accel.counter"]
    pipe.transformer.compile(backend="aot_eager")
    assert hooks_on(attention) == []  # its block counts it
    expected = run(accel.wrap(tiny.build("dit"), [DELTA, SPARSE]))
    accel.wrap(pipe, SPARSE)  # VMoBA hooks every attention: it gets its own compute hook back, innermost
    assert hooks_on(attention)[0] == "accel.counter" and len(hooks_on(attention)) == 2
    np.testing.assert_allclose(run(pipe), expected, atol=1e-4)
    eager = accel.wrap(tiny.build("dit"), [DELTA, SPARSE])
    run(eager)
    assert accel.summary(pipe).branches_computed_share == accel.summary(eager).branches_computed_share < 1


def test_fullgraph_compiles_the_hook_free_parts():
    expected = run(accel.wrap(tiny.build("dit"), BAC))
    pipe = accel.wrap(tiny.build("dit"), BAC)
    pipe.transformer.compile(backend="aot_eager", fullgraph=True)  # a graph break would raise
    np.testing.assert_allclose(run(pipe), expected, atol=1e-4)
    assert counters["stats"]["unique_graphs"] > 0


def test_unwrap_hands_the_model_back_compiled_and_a_new_wrap_takes_it_over():
    pipe = tiny.build("dit")
    plain = run(pipe)
    accel.wrap(pipe, DELTA)
    pipe.transformer.compile(backend="aot_eager")
    assert pipe.transformer._compiled_call_impl is None  # accel compiles below its hooks instead
    accel.unwrap(pipe)
    assert pipe.transformer._compiled_call_impl is not None
    assert "compile" not in pipe.transformer.__dict__ and not hooks_on(pipe.transformer)
    np.testing.assert_allclose(run(pipe), plain, atol=1e-4)
    accel.wrap(pipe, DELTA)  # no refusal: accel knows how this module was compiled
    assert pipe.transformer._compiled_call_impl is None
    expected = run(accel.wrap(tiny.build("dit"), DELTA))
    np.testing.assert_allclose(run(pipe), expected, atol=1e-4)


def test_a_model_compiled_before_wrap_is_refused_and_left_as_it_was():
    pipe = tiny.build("dit")
    pipe.transformer.compile(backend="aot_eager")
    with pytest.raises(ValueError, match="compiled before accel.wrap.*compile afterwards"):
        accel.wrap(pipe, DELTA)
    assert not accel.is_wrapped(pipe) and not hooks_on(pipe.transformer)
    assert "forward" not in pipe.transformer.__dict__


def test_compile_takes_keyword_arguments_only():
    pipe = accel.wrap(tiny.build("dit"), DELTA)
    with pytest.raises(TypeError, match="keyword arguments only"):
        pipe.transformer.compile("aot_eager")


@pytest.mark.parametrize("how", ["whole", "blocks"])
def test_inductor_outputs_match_the_eager_ones(how):
    """The real backend (C++ on the CPU): outputs within inductor's usual tolerance, for a block- and a branch-level
    method (forecasting: its reused blocks combine in graphs of their own); the second reuses the first's graphs."""
    for method in (DELTA, BAC.replace(forecast=1)):
        eager = run(accel.wrap(tiny.build("dit"), method), num_inference_steps=4)
        pipe = accel.wrap(tiny.build("dit"), method)
        if how == "whole":
            pipe.transformer.compile()
        else:
            for block in pipe.transformer.transformer_blocks:
                block.compile()
        np.testing.assert_allclose(run(pipe, num_inference_steps=4), eager, atol=1e-4, rtol=1e-4)
        assert counters["stats"]["unique_graphs"] > 0


@pytest.fixture
def span_lengths(monkeypatch):
    """(member kind, length) of every block span a compiled denoiser runs (``compiling.BlockSpans``)."""
    lengths: list[tuple[str, int]] = []
    compiled_span = compiling._compiled_span

    def recording(key, settings):
        lengths.append(key)
        return compiled_span(key, settings)

    monkeypatch.setattr(compiling, "_compiled_span", recording)
    return lengths


@pytest.mark.parametrize("methods", [[], DELTA], ids=["no method", "delta-dit"])
def test_a_denoiser_compiled_whole_runs_the_blocks_it_computes_in_a_row_as_one_graph(methods, span_lengths):
    eager_pipe = accel.wrap(tiny.build("dit"), methods)
    expected = run(eager_pipe, num_inference_steps=4)
    pipe = accel.wrap(tiny.build("dit"), methods)
    pipe.transformer.compile(backend="aot_eager")
    np.testing.assert_array_equal(run(pipe, num_inference_steps=4), expected)
    depth = len(context_of(pipe).blocks["transformer"])
    computed = [record.blocks_computed for record in accel.summary(pipe).steps]
    assert computed == [record.blocks_computed for record in accel.summary(eager_pipe).steps]
    # one span per forward that computes every block; Δ-DiT's cached forwards compute one block, alone
    assert span_lengths == [("forward", depth)] * computed.count(depth) and computed.count(depth) >= 2


class _LookAheadLiar(ModelHook):
    """Says its block will compute, then skips it (returns its input) or feeds it its input halved."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def will_compute(self, module) -> bool:
        return True

    def new_forward(self, module, *args, **kwargs):
        if self.how == "skips":
            return args[0] if args else kwargs["hidden_states"]
        if args:
            return self.fn_ref.original_forward(args[0] * 0.5, *args[1:], **kwargs)
        return self.fn_ref.original_forward(*args, **{**kwargs, "hidden_states": kwargs["hidden_states"] * 0.5})


@pytest.mark.parametrize("how", ["skips", "changes its input"])
def test_a_span_that_guessed_wrong_costs_time_not_correctness(how, span_lengths):
    outputs = []
    for compiled in (False, True):
        pipe = accel.wrap(tiny.build("dit"), [])
        HookRegistry.check_if_exists_or_initialize(context_of(pipe).blocks["transformer"][1].module).register_hook(
            _LookAheadLiar(how), "test.liar")
        if compiled:
            pipe.transformer.compile(backend="aot_eager")
        outputs.append(run(pipe, num_inference_steps=3))
    assert span_lengths  # spans ran, starting at block 0 with block 1 in them
    np.testing.assert_array_equal(outputs[1], outputs[0])


def test_a_cache_s_reused_blocks_combine_in_one_graph_and_the_branches_a_span_computed_are_cached(span_lengths):
    config = BACConfig(budget=0.5, calibrate=False, forecast=1)
    eager_pipe = accel.wrap(tiny.build("dit"), config)
    expected = run(eager_pipe, num_inference_steps=6)
    pipe = accel.wrap(tiny.build("dit"), config)
    pipe.transformer.compile(backend="aot_eager")
    # the forecasts read the branch outputs the spans computed: had a span not booked them, BAC would recompute
    np.testing.assert_array_equal(run(pipe, num_inference_steps=6), expected)
    summary, eager = accel.summary(pipe), accel.summary(eager_pipe)
    assert [r.branches_computed for r in summary.steps] == [r.branches_computed for r in eager.steps]
    assert summary.branches_computed_share < 1
    assert {kind for kind, _ in span_lengths} == {"forward", "replaced"}
