"""BAC: the tester mixin on every family, exactness, the schedule (DP, Bubbling Union, JSON), calibration."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
import torch
from accelerator_tester import AcceleratorTesterMixin, run
from toy_accelerators import ProbeConfig

import accel
from accel.hooks import temporary_scope
from accel.methods.bac import BACConfig, BACSchedule, branch_names
from accel.methods.bac.calibration import BranchRecorder, RecordHook, SensitivityRecorder, with_generator_copies
from accel.methods.bac.method import BACBranchHook
from accel.methods.bac.solvers import (
    bubbling_union,
    forecast_errors,
    least_error_schedules,
    least_error_updates,
    optimal_updates,
    reuse_errors,
    schedule_error,
    sensitivity_gram,
    share_updates,
    uniform_updates,
)
from accel.pipelines import tiny

SINGLE_DENOISER = tuple(f for f in tiny.FAMILIES if f != "wan2.2")


def calibrated(family: str, steps: int = 6, **config):
    pipe = tiny.build(family)
    inputs = tiny.example_inputs(family, num_inference_steps=steps)
    del inputs["num_inference_steps"]
    return pipe, accel.calibrate(pipe, BACConfig(**config), [inputs], num_inference_steps=steps, progress=False)


class TestBAC(AcceleratorTesterMixin):
    families = tiny.FAMILIES
    saves = "branches"

    def make_config(self):
        return BACConfig(budget=0.5, calibrate=False)  # uncalibrated: of 3 steps, 0 and 2 update and 1 reuses

    def test_budget_one_is_bit_identical_to_the_baseline(self, family):
        baseline = run(tiny.build(family), family, num_inference_steps=4)
        pipe = accel.wrap(tiny.build(family), BACConfig(budget=1.0))
        np.testing.assert_array_equal(run(pipe, family, num_inference_steps=4), baseline)
        assert accel.summary(pipe).branches_computed_share == 1.0


@pytest.mark.parametrize("family", SINGLE_DENOISER)
def test_summary_counts_match_the_calibrated_schedule(family):
    pipe, schedule = calibrated(family)
    accel.wrap(pipe, "bac", schedule=schedule)
    output = run(pipe, family, num_inference_steps=6)
    summary = accel.summary(pipe)
    assert summary.extras["bac"]["schedule"] == "calibrated"
    for record in summary.steps:
        expected = sum(record.step in steps for steps in schedule.updates.values())
        assert record.branches_computed == record.forwards * expected, record
    assert summary.branches_computed_share < 1.0
    assert not np.array_equal(output, run(tiny.build(family), family, num_inference_steps=6))


def test_two_experts_each_get_their_own_steps():
    pipe, schedule = calibrated("wan2.2")
    experts = {name.split(".")[0]: steps for name, steps in schedule.updates.items()}
    assert set(experts) == {"transformer", "transformer_2"}
    # Each expert runs on its own part of the schedule, so its first active step is always an update.
    first = {name: min(steps) for name, steps in schedule.updates.items()}
    assert {v for k, v in first.items() if k.startswith("transformer.")} == {0}
    assert min(v for k, v in first.items() if k.startswith("transformer_2.")) > 0
    accel.wrap(pipe, "bac", schedule=schedule)
    run(pipe, "wan2.2", num_inference_steps=6)
    assert accel.summary(pipe).branches_computed_share < 1.0


def _segment_value(similarity: np.ndarray, updates: list[int]) -> float:
    bounds = [*updates, len(similarity)]
    return sum(similarity[start, k] for start, end in zip(bounds, bounds[1:]) for k in range(start + 1, end))


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_programming_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(8, 5)).cumsum(axis=0)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = unit @ unit.T
    for count in range(1, 9):
        chosen = optimal_updates(similarity, count)
        assert chosen[0] == 0 and len(chosen) == count
        best = max(_segment_value(similarity, [0, *rest]) for rest in itertools.combinations(range(1, 8), count - 1))
        assert _segment_value(similarity, chosen) == pytest.approx(best)


def _reuse_error(features: np.ndarray, updates: list[int], forecast: int, gain: float = 1.0) -> float:
    """What a schedule costs, step by step: the squared error of each reused step's output under the reuse rule."""
    total = 0.0
    for step in range(len(features)):
        earlier = [u for u in updates if u <= step]
        if earlier[-1] == step:
            continue
        if forecast and len(earlier) >= 2:
            a, b = earlier[-2:]
            guess = features[b] + gain * (step - b) / (b - a) * (features[b] - features[a])
        else:
            guess = features[earlier[-1]]
        total += float(((features[step] - guess) ** 2).sum())
    return total


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("forecast, gain", [(0, 1.0), (1, 1.0), (1, 0.7)])
@pytest.mark.parametrize("final_step", [False, True])
def test_least_error_program_matches_brute_force(seed, forecast, gain, final_step):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(8, 5)).cumsum(axis=0) + 0.3 * rng.normal(size=(8, 5))
    gram = features @ features.T
    for count in range(1, 9):
        chosen = least_error_updates(gram, count, forecast, final_step, gain)
        assert chosen[0] == 0 and len(chosen) == count == len(set(chosen))
        if final_step and count >= 2:
            assert chosen[-1] == 7
        candidates = [[0, *rest] for rest in itertools.combinations(range(1, 8), count - 1)
                      if not (final_step and count >= 2) or rest[-1] == 7]
        best = min(_reuse_error(features, updates, forecast, gain) for updates in candidates)
        assert _reuse_error(features, chosen, forecast, gain) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_least_error_program_places_updates_for_the_forecast():
    # A straight line is forecast exactly from any two of its points, so two updates suffice after a kink at 4;
    # reusing the last output instead wants its updates spread over the line.
    features = np.array([[0.0], [0.0], [0.0], [0.0], [1.0], [2.0], [3.0], [4.0]])
    gram = features @ features.T
    forecast = least_error_updates(gram, 3, forecast=1)
    assert _reuse_error(features, forecast, 1) == 0.0 and forecast[1:] in ([3, 4], [4, 5])
    assert _reuse_error(features, least_error_updates(gram, 3, forecast=0), 0) > 0


@pytest.mark.parametrize("forecast, gain", [(0, 1.0), (1, 1.0), (1, 0.6)])
def test_schedules_for_every_count_and_their_errors(forecast, gain):
    rng = np.random.default_rng(5)
    features = rng.normal(size=(9, 4)).cumsum(axis=0)
    gram = features @ features.T
    schedules = least_error_schedules(gram, 9, forecast, final_step=True, gain=gain)
    assert [len(updates) for updates in schedules] == list(range(1, 10))
    for updates in schedules:
        assert updates == least_error_updates(gram, len(updates), forecast, final_step=True, gain=gain)
        assert schedule_error(gram, updates, forecast, gain) == pytest.approx(
            _reuse_error(features, updates, forecast, gain))
    assert schedule_error(gram, schedules[-1], forecast, gain) == 0.0


def test_shared_updates_minimise_the_summed_error():
    rng = np.random.default_rng(2)
    errors = [sorted(rng.uniform(0, 10, size=4), reverse=True) for _ in range(4)]
    for total in range(4, 17):
        counts = share_updates(errors, total)
        assert sum(counts) == total and all(1 <= c <= 4 for c in counts)
        best = min(sum(e[c - 1] for e, c in zip(errors, combo))
                   for combo in itertools.product(range(1, 5), repeat=4) if sum(combo) == total)
        assert sum(e[c - 1] for e, c in zip(errors, counts)) == pytest.approx(best)
    with pytest.raises(ValueError, match="Cannot share 17 updates"):
        share_updates(errors, 17)


def test_shared_budget_keeps_the_total_and_moves_updates_between_blocks():
    _, schedule = calibrated("dit", steps=8, budget=0.5, top_k=0, metric="l2", forecast=1, per_block=True,
                             share_budget=True)
    per_block = {name.rsplit(".", 1)[0]: len(steps) for name, steps in schedule.updates.items()}
    assert sum(per_block.values()) == 4 * len(per_block)
    assert schedule.metadata["share_budget"]


def test_shared_budget_with_two_experts_keeps_each_within_its_steps():
    # Wan 2.2's experts each run on part of the steps: at budget 1.0 every group computes all of its own steps.
    _, schedule = calibrated("wan2.2", budget=1.0, top_k=0, metric="l2", per_block=True, share_budget=True)
    experts = {}
    for name, steps in schedule.updates.items():
        experts.setdefault(name.split(".")[0], set()).update(steps)
    assert experts["transformer"].isdisjoint(experts["transformer_2"])
    assert experts["transformer"] | experts["transformer_2"] == set(range(6))


def test_recorded_gram_gives_the_reuse_errors_of_the_outputs():
    recorder = BranchRecorder()
    rng = torch.Generator().manual_seed(0)
    outputs = [100 + torch.randn(3, 4, 5, generator=rng) for _ in range(6)]  # a large common offset
    for step, output in enumerate(outputs):
        recorder.record("b", "cond", step, output)
    recorder.end_call()
    steps, _, gram, _ = recorder.statistics("b")
    rows = torch.stack([o.reshape(3, -1).half().double() for o in outputs])  # what the recorder keeps, per sample
    for b, k in [(0, 5), (2, 3), (4, 1)]:
        direct = float(((rows[k] - rows[b]) ** 2).sum(dim=1).mean())
        from_gram = gram[k, k] + gram[b, b] - 2 * gram[b, k]
        assert from_gram == pytest.approx(direct, rel=1e-4)
    assert steps == list(range(6))


def test_l2_metric_and_one_schedule_per_block():
    _, schedule = calibrated("dit", budget=0.5, top_k=0, metric="l2", forecast=1, forecast_gain=0.9, per_block=True)
    blocks: dict[str, set] = {}
    for name, steps in schedule.updates.items():
        blocks.setdefault(name.rsplit(".", 1)[0], set()).add(tuple(steps))
    assert len(blocks) > 1 and all(len(schedules) == 1 for schedules in blocks.values())
    meta = schedule.metadata
    assert "L2" in meta["metric"] and meta["per_block"] and meta["forecast"] == 1 and meta["forecast_gain"] == 0.9
    _, per_branch = calibrated("dit", budget=0.5, top_k=0, metric="l2", forecast=1)
    assert not per_branch.metadata["per_block"]
    assert all(len(steps) == 3 and steps[0] == 0 and steps[-1] == 5 for steps in per_branch.updates.values())


def test_dynamic_programming_updates_where_features_change():
    # Steps 0-3 and 4-7 are two plateaus: with two updates, the second one goes where the change is.
    similarity = np.full((8, 8), 0.1)
    similarity[:4, :4] = similarity[4:, 4:] = 1.0
    assert optimal_updates(similarity, 2) == [0, 4]


def test_uniform_updates():
    assert uniform_updates(20, 0.4) == [0, 2, 5, 7, 10, 12, 15, 17]
    assert uniform_updates(3, 0.5) == [0, 1]
    assert uniform_updates(5, 1.0) == [0, 1, 2, 3, 4]
    assert uniform_updates(10, 0.01) == [0]
    assert uniform_updates(20, 0.3, final_step=True) == [0, 4, 8, 11, 15, 19]
    assert uniform_updates(10, 0.01, final_step=True) == [0]


def test_the_final_step_is_an_update_of_every_branch_by_default():
    _, ours = calibrated("dit", budget=0.5, top_k=0)
    _, paper = calibrated("dit", budget=0.5, top_k=0, compute_final_step=False)
    assert all(steps[0] == 0 and steps[-1] == 5 and len(steps) == 3 for steps in ours.updates.values())
    assert all(steps[0] == 0 and len(steps) == 3 for steps in paper.updates.values())
    assert ours.metadata["final_step_computed"] and not paper.metadata["final_step_computed"]
    assert any(5 not in steps for steps in paper.updates.values())  # the paper's objective rarely picks it


def test_bubbling_union_refreshes_volatile_branches_with_deeper_ffns():
    branches = {
        "t.b0.attn": ("t", 0, "self_attn", None), "t.b0.ff": ("t", 0, "ff", None),
        "t.b1.attn": ("t", 1, "self_attn", None), "t.b1.ff": ("t", 1, "ff", None),
        "u.b0.ff": ("u", 0, "ff", None),
    }
    updates = {"t.b0.attn": [0], "t.b0.ff": [0, 2], "t.b1.attn": [0, 3], "t.b1.ff": [0, 4], "u.b0.ff": [0, 5]}
    volatility = {"t.b0.attn": 0.1, "t.b0.ff": 0.0, "t.b1.attn": 0.9, "t.b1.ff": 0.0, "u.b0.ff": 0.0}
    assert bubbling_union(updates, volatility, branches, top_k=1) == ["t.b1.attn"]
    assert updates["t.b1.attn"] == [0, 3, 4]  # + the FFN of its own block, not the shallower one nor the other model
    bubbling_union(updates, volatility, branches, top_k=2)
    assert updates["t.b0.attn"] == [0, 2, 4]
    assert updates["t.b0.ff"] == [0, 2]  # not among the top k: untouched


def test_schedule_json_round_trip_and_metadata(tmp_path):
    pipe, schedule = calibrated("dit", budget=0.5, top_k=2)
    path = schedule.save(tmp_path / "dit.bac.json")
    loaded = BACSchedule.load(path)
    assert loaded == schedule
    meta = loaded.metadata
    assert meta["models"]["denoisers"]["transformer"]["class"] == "DiTTransformer2DModel"
    assert meta["models"]["scheduler"]["class"] == type(pipe.scheduler).__name__
    assert (meta["num_inference_steps"], meta["updates_per_branch"], meta["top_k"]) == (6, 3, 2)
    assert "cosine" in meta["metric"] and len(meta["bubbled_branches"]) == 2
    config = BACConfig(schedule=str(path))
    assert BACConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.schedule == schedule  # the file is read once, into the schedule object the hooks use
    held = BACConfig(schedule=schedule)
    assert held.schedule is schedule and BACConfig.from_dict(held.to_dict()) == held
    assert BACConfig(schedule=schedule.to_dict()).schedule == schedule
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_corrupt_or_mismatched_schedules_raise(tmp_path):
    _, schedule = calibrated("dit")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BACConfig(schedule=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="No BAC schedule"):
        BACConfig(schedule=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="format"):
        BACConfig(schedule={"updates": {}})
    broken = schedule.to_dict()
    broken["updates"]["transformer.transformer_blocks.0.attn1"] = [0, 99]
    with pytest.raises(ValueError, match="steps in 0..5"):
        BACConfig(schedule=broken)
    with pytest.raises(ValueError, match="not accepted"):
        BACConfig(schedule=3)
    other = tiny.build("dit")
    other.transformer.register_to_config(norm_eps=1e-3)  # a different model config
    with pytest.raises(ValueError, match="different model"):
        accel.wrap(other, "bac", schedule=schedule)
    assert not accel.is_wrapped(other)
    with pytest.raises(ValueError, match="different model"):
        accel.wrap(tiny.build("pixart-alpha"), "bac", schedule=schedule)


@pytest.mark.parametrize("family, gain", [("dit", 1.0), ("flux", 1.0), ("dit", 0.5)])
def test_forecast_extrapolates_the_last_two_updates(family, gain):
    """Updates on steps 0 and 1 only: a reused branch returns y1 + gain (t - 1) (y1 - y0), for tensors and tuples."""
    steps = 4
    pipe, schedule = calibrated(family, steps=steps)
    schedule.updates = {name: [0, 1] for name in schedule.updates}
    # The branch modules must run to be observed: a block whose branches are all reused would skip them.
    accel.wrap(pipe, BACConfig(schedule=schedule, forecast=1, forecast_gain=gain, skip_reused_blocks=False))
    block = pipe.transformer.transformer_blocks[0]
    seen = []
    (block.attn1 if family == "dit" else block.attn).register_forward_hook(lambda m, args, out: seen.append(out))
    run(pipe, family, num_inference_steps=steps)
    calls = len(seen) // steps  # denoiser calls per step: 1, or 2 for CFG as separate calls; each its own cache
    assert len(seen) == calls * steps and calls in (1, 2)
    for stream in range(calls):
        outputs = [o if isinstance(o, torch.Tensor) else o[0] for o in seen[stream::calls]]
        y0, y1 = outputs[0].double(), outputs[1].double()
        for t in (2, 3):
            torch.testing.assert_close(outputs[t].double(), y1 + gain * (t - 1) * (y1 - y0), rtol=1e-3, atol=1e-4)
        assert not torch.equal(outputs[2], outputs[1])


def test_forecast_with_every_step_computed_is_bit_identical():
    baseline = run(tiny.build("pixart-alpha"), "pixart-alpha", num_inference_steps=4)
    pipe = accel.wrap(tiny.build("pixart-alpha"), BACConfig(budget=1.0, forecast=1))
    np.testing.assert_array_equal(run(pipe, "pixart-alpha", num_inference_steps=4), baseline)


@pytest.mark.parametrize("changes, match", [({"budget": 0.0}, "greater than 0.0"), ({"budget": 1.5}, "at most 1.0"),
                                            ({"top_k": -1}, "at least 0"), ({"top_k": 1.5}, "integer"),
                                            ({"forecast": 2}, "at most 1"), ({"forecast": True}, "integer"),
                                            ({"forecast": 1, "forecast_gain": 0.0}, "greater than 0.0"),
                                            ({"forecast": 1, "forecast_gain": 2.5}, "at most 2.0"),
                                            ({"forecast": 1, "forecast_gain": "1"}, "finite number"),
                                            ({"forecast_gain": 0.9}, "it needs forecast=1"),
                                            ({"compute_final_step": "yes"}, "True or False"),
                                            ({"skip_reused_blocks": 1}, "True or False"),
                                            ({"per_block": "no"}, "True or False"),
                                            ({"metric": "l1"}, "metric='l1' is not accepted; choose one of 'cosine'"),
                                            ({"share_budget": True}, "needs metric='l2'"),
                                            ({"projections": 0}, "at least 1")])
def test_bad_config_values(changes, match):
    with pytest.raises(ValueError, match=match):
        BACConfig(**changes)


def test_uncalibrated_and_step_mismatch_are_visible(caplog):
    with caplog.at_level(logging.WARNING, logger="accel.methods.bac"):
        pipe = accel.wrap(tiny.build("dit"), "bac", calibrate=False)
    assert "no calibrated schedule" in caplog.text and "accel.calibrate" in caplog.text
    run(pipe, "dit", num_inference_steps=5)
    assert accel.summary(pipe).extras["bac"]["schedule"] == "uniform"

    plain, schedule = calibrated("dit", steps=6)
    accel.wrap(plain, "bac", schedule=schedule, calibrate=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="accel.methods.bac"):
        run(plain, "dit", num_inference_steps=4)
    assert "calibrated for 6 steps but this call runs 4" in caplog.text
    assert accel.summary(plain).extras["bac"]["schedule"] == "uniform"
    run(plain, "dit", num_inference_steps=6)
    assert accel.summary(plain).extras["bac"]["schedule"] == "calibrated"


def test_presets():
    names = {entry["name"]: entry for entry in accel.available()}["bac"]["presets"]
    assert set(names) == {"bac", "bac-fast", "bac-quality", "bac-forecast", "bac-paper"}
    from accel.registry import resolve

    presets = {name: resolve([name])[0] for name in names}
    assert {name: config.budget for name, config in presets.items()} == {
        "bac": 0.35, "bac-fast": 0.3, "bac-forecast": 0.3, "bac-quality": 0.5, "bac-paper": 0.4}
    for name in ("bac", "bac-fast", "bac-forecast", "bac-quality"):  # ours: the L2 schedule, one per block, shared
        config = presets[name]
        assert (config.metric, config.per_block, config.share_budget, config.forecast) == ("l2", True, True, 1)
        assert BACConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert presets["bac-paper"] == BACConfig()  # the paper's schedule


def test_calibrate_bad_input_and_cleanup():
    pipe = tiny.build("dit")
    inputs = tiny.example_inputs("dit")
    del inputs["num_inference_steps"]
    with pytest.raises(ValueError, match="non-empty list"):
        accel.calibrate(pipe, "bac", [], num_inference_steps=3)
    with pytest.raises(ValueError, match="non-empty list"):
        accel.calibrate(pipe, "bac", ["a cat"], num_inference_steps=3)
    with pytest.raises(ValueError, match="not inside inputs"):
        accel.calibrate(pipe, "bac", [{**inputs, "num_inference_steps": 3}], num_inference_steps=3)
    with pytest.raises(ValueError, match="has no calibration"):
        accel.calibrate(pipe, "delta-dit", [inputs], num_inference_steps=3)
    with pytest.raises(ValueError, match="Unknown accelerator"):
        accel.calibrate(pipe, "bak", [inputs], num_inference_steps=3)
    assert not accel.is_wrapped(pipe)
    # A pipeline wrapped with another method keeps it; one wrapped with BAC must be unwrapped first.
    accel.wrap(pipe, ProbeConfig())
    accel.calibrate(pipe, "bac", inputs, num_inference_steps=3, progress=False)
    assert accel.is_wrapped(pipe) and [m["method"] for m in accel.summary(pipe).methods] == ["test-probe"]
    accel.unwrap(pipe)
    accel.wrap(pipe, "bac")
    with pytest.raises(ValueError, match="already wrapped with BAC"):
        accel.calibrate(pipe, "bac", inputs, num_inference_steps=3)
    assert [m["method"] for m in accel.summary(pipe).methods] == ["bac"]


def test_torch_compile_still_runs():
    pipe, schedule = calibrated("dit", steps=4)
    accel.wrap(pipe, "bac", schedule=schedule)
    expected = run(pipe, "dit", num_inference_steps=4)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    np.testing.assert_allclose(run(pipe, "dit", num_inference_steps=4), expected, atol=1e-5)
    assert accel.summary(pipe).branches_computed_share < 1.0


@pytest.mark.parametrize("family", ["dit", "pixart-alpha", "pixart-sigma", "wan", "wan2.2", "sd15", "sdxl",
                                    "skyreels-v2", "ltx-video", "allegro"])
@pytest.mark.parametrize("forecast", [0, 1])
def test_blocks_whose_branches_are_all_reused_do_not_run_and_give_the_same_output(family, forecast):
    # Uncalibrated, every branch on one schedule. Without the forecast, budget 0.5 of 3 steps: steps 0 and 2 update,
    # step 1 reuses. With it, 0.6 of 5 steps: 0, 2 and 4 update; step 1 reuses, step 3 forecasts (gated in place).
    budget, steps = (0.6, 5) if forecast else (0.5, 3)
    outputs, summaries = {}, {}
    for skip in (True, False):
        config = BACConfig(budget=budget, forecast=forecast, forecast_gain=0.8 if forecast else 1.0,
                           skip_reused_blocks=skip, calibrate=False)
        pipe = accel.wrap(tiny.build(family), config)
        outputs[skip], summaries[skip] = run(pipe, family, num_inference_steps=steps), accel.summary(pipe)
    np.testing.assert_array_equal(outputs[True], outputs[False])
    for with_skip, without in zip(summaries[True].steps, summaries[False].steps):
        assert with_skip.branches_computed == without.branches_computed
        assert without.blocks_computed == without.blocks_total
        # one schedule for every branch: a step reuses all of them or none
        assert with_skip.blocks_computed == (0 if with_skip.branches_computed == 0 else with_skip.blocks_total)
    assert any(record.branches_computed == 0 for record in summaries[True].steps)


def _has_block_hook(pipe) -> bool:
    return any(name.startswith("accel.bac.block") for block in pipe.transformer.transformer_blocks
               for name in block._diffusers_hook.hooks)


def test_reused_blocks_run_when_another_method_hooks_them_first():
    # Δ-DiT wrapped first sits inside BAC on each block and must see every forward; wrapped after, it sits outside.
    assert not _has_block_hook(accel.wrap(tiny.build("dit"), [accel.DeltaDiTConfig(), BACConfig(budget=0.5)]))
    assert _has_block_hook(accel.wrap(tiny.build("dit"), [BACConfig(budget=0.5), accel.DeltaDiTConfig()]))
    assert not _has_block_hook(accel.wrap(tiny.build("dit"), BACConfig(budget=0.5, skip_reused_blocks=False)))


def test_stacks_with_delta_dit():
    # Δ-DiT skips one of the two blocks on odd steps; BAC reuses every branch on step 3 of 4.
    pipe = accel.wrap(tiny.build("dit"), [accel.DeltaDiTConfig(cached_fraction=0.5),
                                             BACConfig(budget=0.75, calibrate=False)])
    run(pipe, "dit", num_inference_steps=4)
    summary = accel.summary(pipe)
    assert summary.blocks_computed_share < 1.0 and summary.branches_computed_share < summary.blocks_computed_share
    accel.unwrap(pipe)
    np.testing.assert_array_equal(run(pipe, "dit"), run(tiny.build("dit"), "dit"))


def test_wrap_calibrated_calibrates_only_what_needs_it():
    inputs = tiny.example_inputs("dit", num_inference_steps=6, seed=9)
    del inputs["num_inference_steps"]
    pipe = accel.wrap_calibrated(tiny.build("dit"), ["delta-dit", "bac-fast"], inputs, num_inference_steps=6)
    run(pipe, "dit", num_inference_steps=6)
    summary = accel.summary(pipe)
    assert [m["method"] for m in summary.methods] == ["delta-dit", "bac"]
    assert summary.methods[1]["budget"] == 0.3 and summary.extras["bac"]["schedule"] == "calibrated"
    with pytest.raises(ValueError, match="Unknown accelerator"):
        accel.wrap_calibrated(tiny.build("dit"), ["bak"], inputs, num_inference_steps=6)


def test_calibration_leaves_the_callers_generators_as_it_found_them():
    inputs = tiny.example_inputs("dit", num_inference_steps=4, seed=3)
    del inputs["num_inference_steps"]
    generator = inputs["generator"]
    assert isinstance(generator, torch.Generator)
    state = generator.get_state()
    first = accel.calibrate(tiny.build("dit"), BACConfig(budget=0.5), [inputs], num_inference_steps=4,
                            progress=False)
    assert torch.equal(generator.get_state(), state)
    second = accel.calibrate(tiny.build("dit"), BACConfig(budget=0.5), [inputs], num_inference_steps=4,
                             progress=False)
    assert first.updates == second.updates


@pytest.mark.parametrize("forecast", [0, 1])
def test_the_cache_copies_into_the_tensors_it_drops(forecast):
    """Once a branch has stored as many updates as it keeps (1, or 2 to forecast), it holds the same tensors."""
    pipe = accel.wrap(tiny.build("dit"), BACConfig(budget=0.5, forecast=forecast))
    hook = next(h for h in pipe.transformer.transformer_blocks[0].ff._diffusers_hook.hooks.values()
                if isinstance(h, BACBranchHook))
    held, store = [], hook._store

    def watching_store(cache, shape, output):
        store(cache, shape, output)
        held.append([id(tensor) for _, tensor in cache[hook.name].history])

    hook._store = watching_store
    run(pipe, "dit", num_inference_steps=12, guidance=False)
    assert len(held) > 2 + forecast
    assert all(set(ids) == set(held[forecast]) for ids in held[forecast:])


# ------------------------------------------------------------------------------------ metric="sensitivity"


def test_per_step_gram_gives_the_projected_errors():
    # products[n, k, i] = <g_k, y_i>: an error y_k - guess at step k costs sum_n <g_k, y_k - guess>^2
    rng = np.random.default_rng(3)
    products = rng.normal(size=(5, 7, 7))
    gram = sensitivity_gram(products)
    reuse, forecast = reuse_errors(gram), forecast_errors(gram)
    for b, k in [(0, 3), (2, 6), (5, 6)]:
        assert reuse[b, k] == pytest.approx(((products[:, k, k] - products[:, k, b]) ** 2).sum())
    for a, b, k in [(0, 1, 2), (1, 4, 6), (0, 3, 5)]:
        r = (k - b) / (b - a)
        direct = ((products[:, k, k] - (1 + r) * products[:, k, b] + r * products[:, k, a]) ** 2).sum()
        assert forecast[a, b, k] == pytest.approx(direct)


@pytest.mark.parametrize("forecast", [0, 1])
def test_least_error_program_with_a_per_step_gram_matches_brute_force(forecast):
    rng = np.random.default_rng(11)
    gram = sensitivity_gram(rng.normal(size=(4, 7, 7)).cumsum(axis=2))
    for count in range(1, 8):
        chosen = least_error_updates(gram, count, forecast, final_step=True)
        candidates = [[0, *rest] for rest in itertools.combinations(range(1, 7), count - 1)
                      if count < 2 or rest[-1] == 6]
        best = min(schedule_error(gram, updates, forecast) for updates in candidates)
        assert schedule_error(gram, chosen, forecast) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_sensitivity_products_are_the_first_order_change_of_the_final_sample():
    """<g_k, y_i> from the recorder against a finite difference: add eps * y_i to one branch's output at step k."""
    family, steps, k, i, eps = "dit", 4, 1, 2, 1e-3
    pipe = tiny.build(family)
    inputs = tiny.example_inputs(family, num_inference_steps=steps, batch_size=2)
    del inputs["num_inference_steps"]
    recorder, names = SensitivityRecorder(projections=1), {}

    def install(scope):
        names.update(branch_names(scope))
        for name, (denoiser, _, _, module) in names.items():
            scope.register_hook(module, RecordHook(scope, [recorder], denoiser, name), f"record.{name}")

    with temporary_scope(pipe, "sensitivity-test", install) as scope:
        recorder.run(scope, with_generator_copies(inputs), steps, seed=0)
    name = next(iter(names))
    predicted = recorder.products[name][0][:, k, i].sum()  # projection 0 of call 0, summed over the samples

    module = names[name][3]
    outputs, finals = [], []

    def final_sample(original):
        def step(*args, **kwargs):
            output = original(*args, **kwargs)
            finals.append(output[0] if isinstance(output, tuple) else output.prev_sample)
            return output
        return step

    def sample(perturb: bool) -> torch.Tensor:
        calls = []

        def hook(mod, args, output):
            calls.append(None)
            if not perturb:
                outputs.append(output.clone())
                return output
            return output + eps * outputs[i] if len(calls) == k + 1 else output

        handle = module.register_forward_hook(hook)
        pipe.scheduler.step = final_sample(type(pipe.scheduler).step.__get__(pipe.scheduler))
        try:
            pipe(**with_generator_copies(inputs), num_inference_steps=steps)
        finally:
            handle.remove()
            del pipe.scheduler.step
        return finals[-1].double()

    plain, perturbed = sample(False), sample(True)
    direction = torch.randn(plain.shape, generator=torch.Generator().manual_seed(0)).double()
    measured = float((direction * (perturbed - plain)).sum() / eps)
    assert abs(predicted) > 1e-3
    assert predicted == pytest.approx(measured, rel=0.05)


def test_sensitivity_calibration_leaves_the_pipeline_as_it_was():
    pipe = tiny.build("dit")
    pipe.transformer.requires_grad_(False)  # frozen: calibration turns gradients on for its run only
    baseline = run(pipe, "dit", num_inference_steps=6)
    inputs = tiny.example_inputs("dit", num_inference_steps=6)
    del inputs["num_inference_steps"]
    config = BACConfig(budget=0.5, forecast=1, metric="sensitivity", per_block=True, share_budget=True, top_k=0,
                       projections=2)
    schedule = accel.calibrate(pipe, config, [inputs], num_inference_steps=6, progress=False)
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert "step" not in pipe.scheduler.__dict__ and not accel.is_wrapped(pipe)
    np.testing.assert_array_equal(run(pipe, "dit", num_inference_steps=6), baseline)
    per_block = {name.rsplit(".", 1)[0]: len(steps) for name, steps in schedule.updates.items()}
    assert sum(per_block.values()) == 3 * len(per_block)
    assert schedule.metadata["projections"] == 2 and "first-order" in schedule.metadata["metric"]
    wrapped = accel.wrap(pipe, config.replace(schedule=schedule))
    assert run(wrapped, "dit", num_inference_steps=6).shape == baseline.shape
    assert accel.summary(wrapped).blocks_computed_share == pytest.approx(0.5)


@pytest.mark.parametrize("family", ["pixart-alpha", "wan"])
def test_sensitivity_calibration_runs_on_other_families(family):
    _, schedule = calibrated(family, steps=4, budget=0.5, forecast=1, metric="sensitivity", per_block=True,
                             share_budget=True, top_k=0, projections=1)
    per_block = {name.rsplit(".", 1)[0]: steps for name, steps in schedule.updates.items()}
    assert all(steps[0] == 0 for steps in per_block.values())
    assert sum(map(len, per_block.values())) == 2 * len(per_block)  # budget 0.5 of 4 steps, shared


def test_sensitivity_needs_a_pipeline_it_can_run_with_gradients():
    pipe = tiny.build("dit")

    class Undecorated(type(pipe)):  # a __call__ of its own, without diffusers' no_grad wrapper to unwrap
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    pipe.__class__ = Undecorated
    inputs = tiny.example_inputs("dit", num_inference_steps=4)
    del inputs["num_inference_steps"]
    config = BACConfig(budget=0.5, forecast=1, metric="sensitivity", projections=1)
    with pytest.raises(ValueError, match="undecorated __call__"):
        accel.calibrate(pipe, config, [inputs], num_inference_steps=4, progress=False)
    assert not accel.is_wrapped(pipe) and "step" not in pipe.scheduler.__dict__


def test_sensitivity_needs_an_output_that_says_how_many_samples():
    from types import SimpleNamespace

    from accel.methods.bac.calibration import sample_count

    assert sample_count(SimpleNamespace(images=np.zeros((3, 4, 4, 1)))) == 3
    assert sample_count(SimpleNamespace(frames=np.zeros((2, 5, 4, 4, 3)))) == 2
    with pytest.raises(ValueError, match="cannot tell how many samples"):
        sample_count(SimpleNamespace(latents=None))
