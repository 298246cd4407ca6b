"""AFA: the tester mixin on every DiT family, exactness at initialisation, the lock-step wiring, training (a
resumable checkpoint, the aggregator on disk), stacking, the refusals, and the shipped members and aggregator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerator_tester import AcceleratorTesterMixin, run

import accel
from accel.methods.afa import AFAConfig, Aggregator, AggregatorSettings, validation_loss
from accel.methods.afa.method import FAMILIES
from accel.pipelines import reference, tiny
from accel.pipelines.adapters import adapter_for

AFA_FAMILIES = tuple(family for family in tiny.FAMILIES if adapter_for(tiny.build(family)).name in FAMILIES
                     and len(adapter_for(tiny.build(family)).denoisers(tiny.build(family))) == 1)
QUICK = AggregatorSettings(steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2, lr=1e-2)
_AGGREGATORS: dict[str, Aggregator] = {}


def recorded_batches(family: str):
    """``batches(generator, size)`` built from one real denoiser call of the tiny pipeline: its input as the clean
    sample (plumbing, not data) and its condition arguments, repeated to ``size``."""
    pipe = tiny.build(family)
    found = {}

    def record(module, args, kwargs):
        found.setdefault("kwargs", dict(kwargs, **({"hidden_states": args[0]} if args else {})))

    model = next(iter(adapter_for(pipe).denoisers(pipe).values()))
    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(pipe, family, guidance=False)
    finally:
        handle.remove()
    kwargs = {k: v for k, v in found["kwargs"].items() if k not in ("timestep", "return_dict")}
    clean = kwargs.pop("hidden_states")

    def batches(generator: torch.Generator, size: int) -> dict:
        def repeat(value):
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == clean.shape[0]:
                return value[:1].repeat(size, *([1] * (value.ndim - 1)))
            return value

        noise = torch.randn((size, *clean.shape[1:]), generator=generator)
        return {"latents": repeat(clean) + 0.1 * noise, **{k: repeat(v) for k, v in kwargs.items()}}

    return batches


def member(family: str, seed: int = 1):
    return tiny.build(family, seed=seed)


def trained(family: str) -> Aggregator:
    """An aggregator trained briefly for tiny ``family`` members built with seeds 0 and 1 (cached: deterministic)."""
    if family not in _AGGREGATORS:
        _AGGREGATORS[family] = accel.train_aggregator([tiny.build(family), member(family)], recorded_batches(family),
                                                      settings=QUICK, progress=False)
    return _AGGREGATORS[family]


class TestAFA(AcceleratorTesterMixin):
    families = AFA_FAMILIES
    saves = None  # AFA adds work (N members and the aggregator) for quality; it skips nothing

    def make_config(self):
        return AFAConfig()

    def config_for(self, family):
        return AFAConfig(members=[member(family)], aggregator=trained(family))

    def test_the_aggregator_changes_the_output(self, family):
        aggregator = trained(family)
        assert any(float(mixer.to_logits.weight.abs().sum()) > 0 for mixer in aggregator.mixers)
        untrained = run(accel.ensemble([tiny.build(family), member(family)]), family)
        assert not np.array_equal(run(self.wrapped(family), family), untrained)


@pytest.mark.parametrize("family", AFA_FAMILIES)
def test_an_ensemble_of_identical_members_is_exactly_the_member(family):
    plain = run(tiny.build(family), family)
    np.testing.assert_array_equal(run(accel.ensemble([tiny.build(family), tiny.build(family)]), family), plain)


def test_an_untrained_aggregator_is_exactly_the_members_mean():
    untrained = accel.train_aggregator([tiny.build("dit"), member("dit")], recorded_batches("dit"),
                                       settings=AggregatorSettings(steps=1, lr=1e-30, warmup_steps=0),
                                       progress=False)
    for mixer in untrained.mixers:
        torch.nn.init.zeros_(mixer.to_logits.weight)
    mean = run(accel.ensemble([tiny.build("dit"), member("dit")]), "dit")
    np.testing.assert_array_equal(run(accel.ensemble([tiny.build("dit"), member("dit")], aggregator=untrained),
                                      "dit"), mean)
    assert not np.array_equal(mean, run(tiny.build("dit"), "dit"))


def _recording_weights(monkeypatch) -> list[torch.Tensor]:
    """Every mixing-weight tensor the aggregators compute from here on, in order."""
    from accel.methods.afa.aggregator import BlockMixer

    seen, original = [], BlockMixer.mixing_weights

    def recording(self, *args, **kwargs):
        seen.append(original(self, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(BlockMixer, "mixing_weights", recording)
    return seen


def _ensemble(family: str, guidance_mix: str = "shared"):
    return accel.wrap(tiny.build(family), AFAConfig(members=[member(family)], aggregator=trained(family),
                                                    guidance_mix=guidance_mix))


@pytest.mark.parametrize("family", ["dit", "pixart-alpha", "sd15"])  # cond half first; uncond first; U-Net maps
def test_a_batched_guidance_call_mixes_both_halves_with_the_conditional_weights(family, monkeypatch):
    by_branch, ensemble = _ensemble(family, "per-branch"), _ensemble(family)
    seen = _recording_weights(monkeypatch)
    per_branch = run(by_branch, family)
    own = list(seen)
    seen.clear()
    shared = run(ensemble, family)
    assert len(seen) == len(own) and not np.array_equal(shared, per_branch)
    half = len(own[0]) // 2
    assert any(not torch.equal(w[:half], w[half:]) for w in own)  # the null condition routes otherwise
    for weights in seen:
        torch.testing.assert_close(weights[:half], weights[half:], rtol=0, atol=0)
    # The first mixing point of the first step sees the same features in both runs: its weights are the
    # per-branch run's conditional rows, whichever half the family puts them in.
    conditional = adapter_for(tiny.build(family)).cfg_batch_order.index("cond")
    rows = slice(conditional * half, (conditional + 1) * half)
    torch.testing.assert_close(seen[0], torch.cat([own[0][rows], own[0][rows]]))  # another batch size: fp32 noise


def test_a_separate_guidance_call_reuses_the_conditional_calls_weights(monkeypatch):
    by_branch, ensemble = _ensemble("wan", "per-branch"), _ensemble("wan")
    seen = _recording_weights(monkeypatch)
    per_branch = run(by_branch, "wan")
    computed_per_branch = len(seen)
    seen.clear()
    shared = run(ensemble, "wan")
    assert 2 * len(seen) == computed_per_branch  # the unconditional calls compute none
    assert not np.array_equal(shared, per_branch)


@pytest.mark.parametrize("family", ["dit", "wan"])
def test_without_guidance_the_guidance_mix_changes_nothing(family):
    np.testing.assert_array_equal(run(_ensemble(family), family, guidance=False),
                                  run(_ensemble(family, "per-branch"), family, guidance=False))


def test_a_bad_guidance_mix_is_refused():
    with pytest.raises(ValueError, match="guidance_mix='both' is not accepted; one of 'shared', 'per-branch'"):
        AFAConfig(guidance_mix="both")


def test_every_member_runs_every_block_once_per_forward():
    pipes = [tiny.build("dit"), member("dit"), member("dit", seed=2)]
    counts = []
    for pipe in pipes:
        blocks = pipe.transformer.transformer_blocks
        tally = [0] * len(blocks)
        counts.append(tally)
        for index, block in enumerate(blocks):
            # counted when the block returns: capturing a member's first-block inputs stops before it runs
            block.register_forward_hook(lambda *_, t=tally, i=index: t.__setitem__(i, t[i] + 1))
    forwards = []
    pipes[0].transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    run(accel.ensemble(pipes), "dit")
    assert counts == [[len(forwards)] * len(counts[0])] * 3


def test_a_saved_aggregator_loads_to_the_same_output(tmp_path):
    aggregator = trained("dit")
    aggregator.save(tmp_path / "agg")
    card = json.loads((tmp_path / "agg" / "aggregator.json").read_text())
    assert card["members"] == 2 and card["points"] == len(tiny.build("dit").transformer.transformer_blocks) + 1
    assert len(card["member_fingerprints"]) == 2 and card["training"]["steps"] == QUICK.steps
    in_memory = run(accel.ensemble([tiny.build("dit"), member("dit")], aggregator=aggregator), "dit")
    np.testing.assert_array_equal(
        run(accel.wrap(tiny.build("dit"), "afa", members=[member("dit")], aggregator=tmp_path / "agg"), "dit"),
        in_memory)


def test_an_interrupted_training_continues_where_it_stopped(tmp_path):
    pipes = [tiny.build("dit"), member("dit")]
    grads = [p.requires_grad for pipe in pipes for p in pipe.transformer.parameters()]
    straight = accel.train_aggregator(pipes, recorded_batches("dit"), settings=QUICK, progress=False)

    class Stop(Exception):
        pass

    calls = []
    batches = recorded_batches("dit")

    def stopping(generator, size):
        calls.append(1)
        if len(calls) == 4:  # the first call sizes the aggregator; steps 1-2 are checkpointed, step 3 is lost
            raise Stop
        return batches(generator, size)

    with pytest.raises(Stop):
        accel.train_aggregator(pipes, stopping, settings=QUICK, progress=False, checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 2
    resumed = accel.train_aggregator(pipes, batches, settings=QUICK, progress=False, checkpoint_dir=tmp_path)
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, straight.state_dict()[name], rtol=0, atol=0)
    assert resumed.card["training"]["resumed_from_step"] == 2
    assert [p.requires_grad for pipe in pipes for p in pipe.transformer.parameters()] == grads
    with pytest.raises(ValueError, match="another model or other settings"):
        accel.train_aggregator(pipes, batches, settings=AggregatorSettings(steps=6, batch_size=2), progress=False,
                               checkpoint_dir=tmp_path)


def test_other_accelerators_stack_on_the_ensemble():
    ensemble = accel.ensemble([tiny.build("dit"), member("dit")], aggregator=trained("dit"))
    alone = run(ensemble, "dit")
    accel.wrap(ensemble, "delta-dit")
    cached = run(ensemble, "dit")
    assert accel.summary(ensemble).blocks_computed_share < 1 and not np.array_equal(cached, alone)
    accel.unwrap(ensemble)
    np.testing.assert_array_equal(run(ensemble, "dit"), run(tiny.build("dit"), "dit"))


def test_refusals():
    with pytest.raises(ValueError, match="2 or more"):
        accel.ensemble([tiny.build("dit")])
    with pytest.raises(ValueError, match="members="):
        accel.wrap(tiny.build("dit"), "afa")
    with pytest.raises(ValueError, match="same-architecture"):
        accel.ensemble([tiny.build("dit"), tiny.build("pixart-alpha")])
    pipe = tiny.build("dit")
    with pytest.raises(ValueError, match="distinct"):
        accel.ensemble([pipe, pipe])
    with pytest.raises(ValueError, match="wrapped by accel"):
        accel.ensemble([tiny.build("dit"), accel.wrap(member("dit"), "delta-dit")])
    with pytest.raises(ValueError, match="first"):
        accel.wrap(accel.wrap(tiny.build("dit"), "delta-dit"), "afa", members=[member("dit")])
    with pytest.raises(ValueError, match="other member weights"):
        accel.ensemble([tiny.build("dit"), member("dit", seed=2)], aggregator=trained("dit"))
    with pytest.raises(ValueError, match="one denoiser"):
        accel.ensemble([tiny.build("wan2.2"), member("wan2.2")])
    with pytest.raises(ValueError, match="no saved aggregator"):
        AFAConfig(aggregator="/nonexistent")
    with pytest.raises(ValueError, match="batches must be a function"):
        accel.train_aggregator([tiny.build("dit"), member("dit")], [1, 2], settings=QUICK, progress=False)
    with pytest.raises(ValueError, match="positive integer"):
        AggregatorSettings(steps=0)
    refused = tiny.build("dit")
    before = run(refused, "dit")
    with pytest.raises(ValueError):
        accel.ensemble([refused, tiny.build("pixart-alpha")])
    assert not accel.is_wrapped(refused)
    np.testing.assert_array_equal(run(refused, "dit"), before)


def test_the_shipped_members_and_aggregator():
    members = [reference.load(name) for name in reference.ENSEMBLE_MEMBERS]
    folder = reference.MODELS_DIR / "digits-dit-ab-aggregator"
    card = Aggregator.read_card(folder)
    assert card["members"] == 2 and card["training"]["steps"] >= 100
    kwargs = reference.call_kwargs("digits-dit", members[0], [3, 7], seed=5, num_inference_steps=4)
    alone = members[0](**kwargs).images
    mixed = accel.ensemble(members, aggregator=folder)(**reference.call_kwargs(
        "digits-dit", members[0], [3, 7], seed=5, num_inference_steps=4)).images
    assert mixed.shape == alone.shape and not np.array_equal(mixed, alone)
    accel.unwrap(members[0])
    with pytest.raises(ValueError, match="other member weights"):
        accel.ensemble(members[::-1], aggregator=folder)


def test_the_validation_loss_of_identical_members_is_the_members():
    batches = recorded_batches("dit")
    alone = validation_loss([tiny.build("dit")], batches, count=2, batch_size=2)
    assert validation_loss([tiny.build("dit"), tiny.build("dit")], batches, count=2, batch_size=2) == alone
    assert validation_loss([tiny.build("dit"), member("dit")], batches, count=2, batch_size=2) != alone


def test_a_solver_sampling_a_flow_model_trains_with_flow_matching_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from accel.methods.afa.training import noised

    clean = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    solver = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    for scheduler in (solver, FlowMatchEulerDiscreteScheduler()):
        noisy, timesteps, target = noised(scheduler, clean, torch.Generator().manual_seed(1))
        sigmas = timesteps / 1000
        noise = target + clean  # flow matching: the target is the velocity noise - x0
        torch.testing.assert_close(noisy, (1 - sigmas.view(-1, 1, 1, 1)) * clean + sigmas.view(-1, 1, 1, 1) * noise)
        assert timesteps.dtype.is_floating_point and ((0 <= sigmas) & (sigmas <= 1)).all()


def test_bad_training_input_is_refused(tmp_path):
    pipes = [tiny.build("dit"), member("dit")]
    with pytest.raises(ValueError, match="'latents' tensor"):
        accel.train_aggregator(pipes, lambda generator, size: {"class_labels": torch.zeros(size)}, settings=QUICK,
                               progress=False)
    with pytest.raises(ValueError, match="neither"):
        from types import SimpleNamespace

        from accel.methods.afa.training import noised

        noised(SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)), torch.zeros(1, 1, 2, 2),
               torch.Generator())
    (tmp_path / "aggregator.json").write_text(json.dumps({"format": "other/1"}))
    (tmp_path / "aggregator.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not an accel AFA aggregator card"):
        AFAConfig(aggregator=str(tmp_path))
