"""ILF: the tester mixin on every DiT family, exactness at initialisation, the loop's wiring, training (the
target pairs, resumable checkpoints, seeds on the card), the module on disk, and the refusals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from accelerator_tester import AcceleratorTesterMixin, run

import accel
from accel.methods.ilf import FeedbackModule, FeedbackSettings, ILFConfig
from accel.methods.ilf.method import FAMILIES
from accel.methods.ilf.training import training_pairs
from accel.pipelines import tiny
from accel.pipelines.adapters import adapter_for

DIT_FAMILIES = tuple(family for family in tiny.FAMILIES if adapter_for(tiny.build(family)).name in FAMILIES)
QUICK = FeedbackSettings(steps=4, warmup_steps=1, checkpoint_every=2)  # plumbing, not quality
_MODULES: dict[tuple, FeedbackModule] = {}


def inputs_for(family: str, calls: int = 2) -> list[dict]:
    inputs = [tiny.example_inputs(family, seed=100 + i) for i in range(calls)]
    for kwargs in inputs:
        del kwargs["num_inference_steps"], kwargs["output_type"]
    return inputs


def trained(family: str, **options) -> FeedbackModule:
    """A feedback module trained briefly on the tiny ``family`` pipeline (cached: tiny builds are deterministic)."""
    key = (family, tuple(sorted(options.items())))
    if key not in _MODULES:
        settings = options.pop("settings", QUICK)
        _MODULES[key] = accel.train_feedback(tiny.build(family), inputs_for(family), num_inference_steps=4,
                                             settings=settings, progress=False, **options)
    return _MODULES[key]


class TestILF(AcceleratorTesterMixin):
    families = DIT_FAMILIES
    saves = None  # ILF saves steps, not computations within a step: the caller halves num_inference_steps

    def make_config(self):
        return ILFConfig()

    def config_for(self, family):
        return ILFConfig(module=trained(family))

    def test_the_feedback_changes_the_output(self, family):
        module = trained(family)
        assert float(module.hidden_scales.abs().sum()) > 0, "training left every scale at zero"
        assert not np.array_equal(run(self.wrapped(family), family), run(self.build(family), family))


def untrained(family: str = "dit") -> FeedbackModule:
    pipe = tiny.build(family)
    return accel.train_feedback(pipe, inputs_for(family, 1), num_inference_steps=2, progress=False,
                                settings=FeedbackSettings(steps=1, lr=1e-30, warmup_steps=0))


def test_zero_scales_give_exactly_the_backbone():
    module = untrained()
    with torch.no_grad():
        module.hidden_scales.zero_()
    plain = run(tiny.build("dit"), "dit")
    np.testing.assert_array_equal(run(accel.wrap(tiny.build("dit"), ILFConfig(module=module)), "dit"), plain)


def test_the_region_runs_twice_and_the_feedback_block_once_per_forward():
    module = trained("dit")
    pipe = accel.wrap(tiny.build("dit"), ILFConfig(module=module))
    blocks = pipe.transformer.transformer_blocks
    counts = {"region": 0, "other": 0, "feedback": 0}
    first, last = module.region
    assert first == last == 1
    handles = [blocks[1].register_forward_pre_hook(lambda *_: counts.__setitem__("region", counts["region"] + 1)),
               blocks[0].register_forward_pre_hook(lambda *_: counts.__setitem__("other", counts["other"] + 1)),
               module.block.register_forward_pre_hook(lambda *_: counts.__setitem__("feedback",
                                                                                       counts["feedback"] + 1))]
    run(pipe, "dit", num_inference_steps=2)
    for handle in handles:
        handle.remove()
    assert counts == {"region": 4, "other": 2, "feedback": 2}


def test_a_longer_region_adds_feedback_to_each_block_input():
    module = trained("pixart-alpha", region=(0, 1), scale="channel")
    assert module.region == (0, 1) and module.hidden_scales.shape[0] == 2 and module.hidden_scales.shape[1] > 1
    plain = run(tiny.build("pixart-alpha"), "pixart-alpha")
    assert not np.array_equal(run(accel.wrap(tiny.build("pixart-alpha"), ILFConfig(module=module)), "pixart-alpha"),
                              plain)


def test_training_pairs_target_the_next_step_of_the_same_branch():
    def call(tag):
        return ((torch.tensor([tag]),), {}, torch.tensor([tag * 10.0]))

    trajectory = [[call(1), call(2)], [call(3), call(4)], [call(5), call(6)]]  # 3 steps, 2 CFG calls each
    pairs = training_pairs([trajectory])
    targets = [float(target) for _, target in pairs]
    assert targets == [30.0, 40.0, 50.0, 60.0, 50.0, 60.0]  # the last step keeps its own output


def test_save_load_gives_the_same_output(tmp_path):
    module = trained("dit")
    in_memory = run(accel.wrap(tiny.build("dit"), ILFConfig(module=module)), "dit")
    module.save(tmp_path / "ilf")
    card = json.loads((tmp_path / "ilf" / "feedback.json").read_text())
    assert card == json.loads(json.dumps(module.card, default=str))  # the card in memory is the one on disk
    assert card["num_inference_steps"] == 4 and card["ilf_steps"] == 2 and card["region"] == [1, 1]
    assert card["scheduler"] == "DDIMScheduler" and card["model"]["class"] == "DiTTransformer2DModel"
    assert card["training"]["call_arguments"]["seeds"] == [100, 101]
    assert not list((tmp_path / "ilf").glob(".*tmp"))
    loaded = run(accel.wrap(tiny.build("dit"), "ilf", module=str(tmp_path / "ilf")), "dit")
    np.testing.assert_array_equal(loaded, in_memory)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    pipe = tiny.build("dit")
    accel.train_feedback(pipe, inputs_for("dit"), num_inference_steps=4, settings=QUICK, progress=False,
                         checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 4
    with pytest.raises(ValueError, match="another model or other settings"):
        accel.train_feedback(pipe, inputs_for("dit"), num_inference_steps=4, progress=False,
                             settings=FeedbackSettings(steps=6, warmup_steps=1), checkpoint_dir=tmp_path)


def test_an_interrupted_training_continues_where_it_stopped(tmp_path):
    pipe = tiny.build("dit")
    settings = FeedbackSettings(steps=4, warmup_steps=1, checkpoint_every=2)
    straight = accel.train_feedback(pipe, inputs_for("dit"), num_inference_steps=4, settings=settings,
                                    progress=False)

    class Stop(Exception):
        pass

    module_steps = []
    original = torch.optim.AdamW.step

    def stopping_step(self, *args, **kwargs):
        if len(module_steps) == 3:  # the checkpoint holds 2 steps; the 3rd is lost with the interruption
            raise Stop
        module_steps.append(1)
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = stopping_step
    try:
        with pytest.raises(Stop):
            accel.train_feedback(pipe, inputs_for("dit"), num_inference_steps=4, settings=settings, progress=False,
                                 checkpoint_dir=tmp_path)
    finally:
        torch.optim.AdamW.step = original
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 2
    resumed = accel.train_feedback(pipe, inputs_for("dit"), num_inference_steps=4, settings=settings,
                                   progress=False, checkpoint_dir=tmp_path)
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, straight.state_dict()[name], rtol=0, atol=0)
    assert run(pipe, "dit") is not None and not accel.is_wrapped(pipe)


def test_training_leaves_the_pipeline_as_it_was():
    pipe = tiny.build("dit")
    before = run(pipe, "dit")
    grads = [p.requires_grad for p in pipe.transformer.parameters()]
    trained_module = accel.train_feedback(pipe, inputs_for("dit"), num_inference_steps=4, settings=QUICK,
                                          progress=False)
    assert trained_module is not None
    np.testing.assert_array_equal(run(pipe, "dit"), before)
    assert [p.requires_grad for p in pipe.transformer.parameters()] == grads
    assert not hasattr(pipe.scheduler, "__dict__") or "step" not in pipe.scheduler.__dict__


def test_another_model_is_refused(tmp_path):
    trained("dit").save(tmp_path / "ilf")
    with pytest.raises(ValueError, match="other weights"):
        accel.wrap(tiny.build("dit", seed=1), "ilf", module=str(tmp_path / "ilf"))
    with pytest.raises(ValueError, match="another configuration|trained on a"):
        accel.wrap(tiny.build("pixart-alpha"), "ilf", module=str(tmp_path / "ilf"))


def test_another_step_count_is_warned_about(caplog):
    pipe = accel.wrap(tiny.build("dit"), ILFConfig(module=trained("dit")))
    with caplog.at_level(logging.WARNING, logger="accel.ilf"):
        run(pipe, "dit", num_inference_steps=2)
        assert not caplog.records
        run(pipe, "dit", num_inference_steps=3)
    assert "trained for 2 steps" in caplog.text


@pytest.mark.parametrize("call, match", [
    (lambda pipe: accel.train_feedback(pipe, inputs_for("dit"), num_inference_steps=3), "even integer"),
    (lambda pipe: accel.train_feedback(pipe, inputs_for("dit"), region=(1, 5)), "range of block positions"),
    (lambda pipe: accel.train_feedback(pipe, inputs_for("dit"), region="middle"), "first block, last block"),
    (lambda pipe: accel.train_feedback(pipe, inputs_for("dit"), scale="token"), "scale must be one of"),
    (lambda pipe: accel.train_feedback(pipe, [], num_inference_steps=4), "non-empty list"),
    (lambda pipe: accel.train_feedback(pipe, inputs_for("dit"), settings=FeedbackSettings(steps=0)), "positive"),
    (lambda pipe: accel.wrap(pipe, "ilf"), "needs a trained feedback module"),
    (lambda pipe: accel.wrap(pipe, "ilf", module="/nonexistent/ilf"), "holds no ILF feedback module"),
    (lambda pipe: accel.wrap(pipe, "ilf", module=3), "is not accepted"),
])
def test_bad_input_is_refused_clearly(call, match):
    pipe = tiny.build("dit")
    with pytest.raises(ValueError, match=match):
        call(pipe)
    assert not accel.is_wrapped(pipe)


def test_a_unet_is_refused():
    with pytest.raises(ValueError, match="DiT-family"):
        accel.train_feedback(tiny.build("sd15"), inputs_for("sd15"), num_inference_steps=4)


def test_a_wrapped_pipeline_is_refused():
    pipe = accel.wrap(tiny.build("dit"), "delta-dit")
    with pytest.raises(ValueError, match="unwrap"):
        accel.train_feedback(pipe, inputs_for("dit"), num_inference_steps=4)


def test_runners_that_apply_every_method_leave_ilf_out(capsys):
    from accel.demo.app import default_stack
    from accel.eval.quick import model_handle, runnable_methods

    rows = runnable_methods(model_handle("tiny:dit"), "all")
    assert "ilf" not in [label for label, _ in rows] and "delta-dit" in [label for label, _ in rows]
    assert "accel.train_feedback" in capsys.readouterr().err
    (entry,) = [entry for entry in accel.available() if entry["name"] == "ilf"]
    assert entry["trained_with"] == "accel.train_feedback"
    assert default_stack()[0] != "ilf"


def test_another_scheduler_is_refused(tmp_path):
    from diffusers import DDPMScheduler

    trained("dit").save(tmp_path / "ilf")
    pipe = tiny.build("dit")
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="trained with DDIMScheduler"):
        accel.wrap(pipe, "ilf", module=str(tmp_path / "ilf"))
    assert not accel.is_wrapped(pipe)
