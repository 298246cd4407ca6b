"""benchmarks.peers: every peer that can run here changes the output of a tiny pipeline, gives the same output on
every call, and leaves the pipeline bit-identical when removed; a peer that cannot run says why."""

import sys
from pathlib import Path

import numpy as np
import pytest

from accel.pipelines import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts, not a package

from benchmarks import peers  # noqa: E402

NAMES = list(peers.PEERS)
FAMILIES = ("dit", "wan")
STEPS = (4, 6)
# These skip work on a fixed schedule, so they must change every run. The others decide from the data (a threshold
# on a residual change, or calibrated magnitude ratios). Random weights change a lot from step to step, so those
# thresholds are not met on every run (dbcache-0.08 skips nothing at 6 steps on either model): they must change
# at least one run.
SCHEDULED = {"taylorseer-blocks", "taylorseer-attn-ff", "fastercache", "pab"}


def _inputs(family: str, steps: int) -> dict:
    return tiny.example_inputs(family, num_inference_steps=steps)


def _output(pipe, family: str, steps: int) -> np.ndarray:
    result = pipe(**_inputs(family, steps))
    return result.images if family == "dit" else result.frames


@pytest.fixture(scope="module")
def pipes():
    return {family: tiny.build(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def baselines(pipes):
    return {(family, steps): _output(pipes[family], family, steps) for family in FAMILIES for steps in STEPS}


def test_names():
    assert NAMES == [
        "fbc-0.1", "fbc-0.2", "taylorseer-blocks", "taylorseer-blocks-final", "taylorseer-attn-ff", "magcache",
        "fastercache", "pab", "dbcache-0.08", "dbcache-0.2",
    ]


def test_taylorseer_final_computes_the_last_step(pipes):
    pipe = pipes["dit"]
    first_linear = pipe.transformer.transformer_blocks[0].attn1.to_q  # a skipped block's hook never reaches it
    calls = {}
    for name in ("taylorseer-blocks", "taylorseer-blocks-final"):
        remove = peers.apply_peer(pipe, name, _inputs("dit", 8))
        def count(module, args, name=name):
            calls[name] = calls.get(name, 0) + 1

        handle = first_linear.register_forward_pre_hook(count)
        try:
            _output(pipe, "dit", 8)
        finally:
            handle.remove()
            remove()
    # Both compute the warm-up steps 0-2 and every 5th step from step 4 (4, and 9 would be next); steps 3 and 5-7
    # are forecast, but the final variant computes step 7.
    assert (calls["taylorseer-blocks"], calls["taylorseer-blocks-final"]) == (4, 5)


@pytest.mark.parametrize("name", NAMES)
def test_peer_changes_output_and_removes_cleanly(name, pipes, baselines):
    if peers.peer_status(name) is not None:
        with pytest.raises(ValueError, match="cannot run"):
            peers.apply_peer(pipes["dit"], name, _inputs("dit", 4))
        pytest.skip(peers.peer_status(name))
    changed = {}
    for family in FAMILIES:
        pipe = pipes[family]
        if peers.peer_status(name, pipe) is not None:
            continue
        for steps in STEPS:
            base, original_class = baselines[family, steps], type(pipe)
            remove = peers.apply_peer(pipe, name, _inputs(family, steps))
            try:
                first = _output(pipe, family, steps)
                second = _output(pipe, family, steps)
            finally:
                remove()
            np.testing.assert_array_equal(first, second, err_msg=f"{name} carries state between calls")
            assert np.array_equal(_output(pipe, family, steps), base), f"{name} left {family} changed"
            assert type(pipe) is original_class
            changed[family, steps] = not np.array_equal(first, base)
    assert ("dit", 4) in changed, f"{name} should run on DiT"
    assert all(changed.values()) if name in SCHEDULED else any(changed.values()), f"{name} changed only {changed}"


@pytest.mark.parametrize("name", [name for name in NAMES if peers.peer_status(name) is None])
def test_peer_is_per_instance(name):
    first, second = tiny.build("dit"), tiny.build("dit")
    base = _output(first, "dit", 6)
    remove_first = peers.apply_peer(first, name, _inputs("dit", 6))
    try:
        assert type(second) is not type(first)
        np.testing.assert_array_equal(_output(second, "dit", 6), base)
        remove_second = peers.apply_peer(second, name, _inputs("dit", 6))
        try:
            on_first, on_second = _output(first, "dit", 6), _output(second, "dit", 6)
            np.testing.assert_array_equal(on_first, on_second)
        finally:
            remove_second()
        np.testing.assert_array_equal(_output(second, "dit", 6), base)
        np.testing.assert_array_equal(_output(first, "dit", 6), on_first)
    finally:
        remove_first()
    np.testing.assert_array_equal(_output(first, "dit", 6), base)
    assert type(first) is type(second)


def test_unknown_name_lists_known_peers(pipes):
    with pytest.raises(ValueError, match=r"Did you mean 'fbc-0\.1'.*Known peers: fbc-0\.1, fbc-0\.2"):
        peers.apply_peer(pipes["dit"], "fbc-01")
    with pytest.raises(ValueError, match="Known peers"):
        peers.peer_status("teacache")


def test_fastercache_cannot_run_on_separate_cfg(pipes):
    reason = peers.peer_status("fastercache", pipes["wan"])
    assert reason is not None and "separate transformer calls" in reason
    with pytest.raises(ValueError, match="separate transformer calls"):
        peers.apply_peer(pipes["wan"], "fastercache", _inputs("wan", 4))
    assert peers.peer_status("fastercache", pipes["dit"]) is None


def test_missing_cache_dit_is_reported(monkeypatch, pipes):
    real_find_spec = peers.importlib.util.find_spec
    monkeypatch.setattr(
        peers.importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real_find_spec(name, *a)
    )
    reason = peers.peer_status("dbcache-0.08")
    assert reason is not None and "not installed" in reason
    with pytest.raises(ValueError, match="not installed"):
        peers.apply_peer(pipes["dit"], "dbcache-0.08", _inputs("dit", 4))
    assert peers.peer_status("fbc-0.1") is None


def test_magcache_calibrates_without_consuming_the_generator(pipes, baselines):
    pipe = pipes["dit"]
    with pytest.raises(ValueError, match="calibration_kwargs"):
        peers.apply_peer(pipe, "magcache")
    kwargs = _inputs("dit", 6)
    remove = peers.apply_peer(pipe, "magcache", kwargs)
    try:
        np.testing.assert_array_equal(pipe(**kwargs).images, _output(pipe, "dit", 6))
    finally:
        remove()


def test_second_peer_is_refused_and_first_keeps_working(pipes, baselines):
    pipe = pipes["dit"]
    remove = peers.apply_peer(pipe, "pab", _inputs("dit", 6))
    try:
        with_pab = _output(pipe, "dit", 6)
        with pytest.raises(ValueError, match="already has a cache applied"):
            peers.apply_peer(pipe, "taylorseer-blocks", _inputs("dit", 6))
        np.testing.assert_array_equal(_output(pipe, "dit", 6), with_pab)
    finally:
        remove()
    np.testing.assert_array_equal(_output(pipe, "dit", 6), baselines["dit", 6])
