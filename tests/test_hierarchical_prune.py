"""HierarchicalPrune: contribution analysis, block and branch removal on every DiT family, saving and loading the
pruned model (plain diffusers for whole blocks), positional freezing, sensitivity scales, resumable distillation,
stacking with QuEST, and the refusals. Random tiny weights: plumbing, not quality (the benchmark measures that)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import accel
from accel.eval.metrics import output_array
from accel.methods.hierarchical_prune import ContributionReport, DistillationSettings, ZeroBranch
from accel.methods.hierarchical_prune.analysis import removed
from accel.methods.hierarchical_prune.pruning import lr_scales
from accel.methods.hierarchical_prune.surgery import ZEROED_KEY, Unit, blocks_of, denoiser_of, remove_units
from accel.methods.quest import QuESTConfig
from accel.pipelines import reference, tiny

DIT_FAMILIES = [family for family in tiny.FAMILIES if family not in ("sd15", "sdxl")]
_REPORTS: dict[str, ContributionReport] = {}


def inputs_for(family: str, seed: int = 0, steps: int = 2) -> dict:
    return tiny.example_inputs(family, num_inference_steps=steps, seed=seed)


def report_for(family: str) -> ContributionReport:
    if family not in _REPORTS:
        _REPORTS[family] = accel.analyze_contributions(tiny.build(family), [inputs_for(family)], progress=False)
    return _REPORTS[family]


def run(pipe, family: str, seed: int = 0) -> np.ndarray:
    return output_array(pipe(**inputs_for(family, seed)))


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_analysis_scores_every_block_and_branch(family, tmp_path):
    pipe = tiny.build(family)
    model, adapter = denoiser_of(pipe)
    blocks = blocks_of(model, adapter)
    report = report_for(family)
    names = [unit["name"] for unit in report.units]
    assert [n for n in names if n.count(" ") == 1] == [f"block {b.index}" for b in blocks]
    assert len(names) > len(blocks) or family in ()  # every family has removable branches in its first block
    for unit in report.units:
        assert np.isfinite(unit["mse"]) and unit["mse"] > 0, unit  # removing anything changes random-weight output
    again = ContributionReport.load(report.save(tmp_path / "report.json"))
    assert again.to_dict() == json.loads(json.dumps(report.to_dict()))
    assert report.plot(tmp_path / "plot.png").stat().st_size > 1000
    # the analysis leaves the pipeline as it found it
    assert np.array_equal(run(pipe, family), run(tiny.build(family), family))


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_prune_removes_blocks_saves_and_reloads(family, tmp_path):
    pipe = tiny.build(family)
    before = run(pipe, family)
    pruned = accel.prune(pipe, report_for(family), 1, inputs=[inputs_for(family, seed=5)], distill_steps=2,
                         keep_first=0, progress=False)
    model, adapter = denoiser_of(pipe)
    student, _ = denoiser_of(pruned)
    assert len(blocks_of(student, adapter)) == len(blocks_of(model, adapter)) - 1
    assert np.array_equal(run(pipe, family), before), "the original pipeline must stay the teacher, untouched"
    out = run(pruned, family)
    assert out.shape == before.shape and np.isfinite(out).all()
    assert ZEROED_KEY not in student.config
    student.save_pretrained(tmp_path / "transformer")
    loaded = type(student).from_pretrained(tmp_path / "transformer").eval()
    for name, tensor in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert pruned.accel_pruning["distillation"]["steps"] == 2


def test_removed_block_passes_its_input_through():
    pipe = tiny.build("sd3")
    model, adapter = denoiser_of(pipe)
    blocks = blocks_of(model, adapter)
    seen: dict[str, torch.Tensor] = {}

    def keep(key):
        def hook(module, args, kwargs):
            seen.setdefault(key, kwargs.get("hidden_states", args[0] if args else None))
        return hook

    handles = [blocks[0].module.register_forward_pre_hook(keep("in"), with_kwargs=True),
               blocks[1].module.register_forward_pre_hook(keep("next"), with_kwargs=True)]
    with removed(model, adapter, Unit(0)):
        run(pipe, "sd3")
    for handle in handles:
        handle.remove()
    assert torch.equal(seen["next"], seen["in"])
    assert "forward" not in blocks[0].module.__dict__


def test_zeroed_branch_equals_the_block_without_it_and_needs_load_pruned(tmp_path):
    pipe = tiny.build("pixart-alpha")
    model, adapter = denoiser_of(pipe)
    with removed(model, adapter, Unit(1, "ff")):
        expected = run(pipe, "pixart-alpha")
    report = report_for("pixart-alpha")
    params = sum(p.numel() for p in model.parameters())
    ff = next(u for u in report.units if u["name"] == "block 1 ff")["params"]
    # a budget just under the full size removes one branch; analysis ranks which, so pin the report's choice
    pinned = ContributionReport(report.family, report.model_class, report.num_blocks,
                                [{**u, "psnr_db": 99.0 if u["name"] == "block 1 ff" else u["psnr_db"]}
                                 for u in report.units])
    pruned = accel.prune(pipe, pinned, (params - ff // 2) / params, granularity="hybrid", keep_first=1,
                         keep_last=0, distill_steps=0, progress=False)
    assert pruned.accel_pruning["removed"] == ["block 1 ff"]
    student = pruned.transformer
    assert isinstance(student.transformer_blocks[1].ff, ZeroBranch)
    assert np.array_equal(run(pruned, "pixart-alpha"), expected)
    assert student.config[ZEROED_KEY] == {"transformer_blocks.1.ff": "ff"}
    student.save_pretrained(tmp_path / "transformer")
    loaded = accel.load_pruned(tmp_path / "transformer")
    assert isinstance(loaded.transformer_blocks[1].ff, ZeroBranch)
    pruned.register_modules(transformer=loaded)
    assert np.array_equal(run(pruned, "pixart-alpha"), expected)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in student.parameters())
    # plain diffusers builds the full architecture; the saved zeros make the removed branch output exact zeros
    plain = type(student).from_pretrained(tmp_path / "transformer").eval()
    assert not isinstance(plain.transformer_blocks[1].ff, ZeroBranch)
    assert sum(p.numel() for p in plain.parameters()) > sum(p.numel() for p in student.parameters())
    pruned.register_modules(transformer=plain)
    assert np.array_equal(run(pruned, "pixart-alpha"), expected)


def four_block_dit():
    from diffusers import DiTTransformer2DModel

    pipe = tiny.build("dit")
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel.from_config({**pipe.transformer.config, "num_layers": 4}).eval()
    pipe.register_modules(transformer=transformer)
    return pipe


def test_distillation_freezes_the_prefix_and_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from accel.methods.hierarchical_prune import distillation

    pipe = four_block_dit()
    model = pipe.transformer
    report = ContributionReport("dit", type(model).__name__, 4,
                                [{"name": f"block {i}", "block": i, "component": None, "params": 1,
                                  "psnr_db": 30.0 + i, "mse": 0.1} for i in range(4)])
    settings = DistillationSettings(steps=6, lr=1e-2, checkpoint_every=2, feature_weight=0.5)
    inputs = [inputs_for("dit", seed=3)]

    def cut(**extra):
        return accel.prune(pipe, report, 1, inputs=inputs, keep_first=1, keep_last=1, distill_steps=None,
                           settings=settings, progress=False, **extra)

    uninterrupted = cut()
    assert uninterrupted.accel_pruning["removed"] == ["block 2"]  # the least essential candidate (highest PSNR)
    student = uninterrupted.transformer
    assert len(student.transformer_blocks) == 3
    # positional weight preservation: everything before the first removed block is unchanged
    for name, tensor in student.state_dict().items():
        if name.startswith(("pos_embed", "transformer_blocks.0.", "transformer_blocks.1.")):
            assert torch.equal(tensor, model.state_dict()[name]), name
    moved = student.transformer_blocks[2].ff.net[2].weight  # the teacher's block 3, after the cut: trained
    assert not torch.equal(moved, model.transformer_blocks[3].ff.net[2].weight)
    assert not torch.equal(student.proj_out_2.weight, model.proj_out_2.weight)
    info = uninterrupted.accel_pruning["distillation"]
    assert info["resumed_from"] == 0 and info["final_loss"] < info["first_loss"]

    real_collate, calls = distillation.collate, []

    def interrupted_collate(records):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_collate(records)

    monkeypatch.setattr(distillation, "collate", interrupted_collate)
    with pytest.raises(KeyboardInterrupt):
        cut(checkpoint_dir=tmp_path)
    monkeypatch.setattr(distillation, "collate", real_collate)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 4
    resumed = cut(checkpoint_dir=tmp_path)
    assert resumed.accel_pruning["distillation"]["resumed_from"] == 4
    for name, tensor in resumed.transformer.state_dict().items():
        assert torch.allclose(tensor, student.state_dict()[name], atol=1e-6), name
    with pytest.raises(ValueError, match="another cut or other settings"):
        accel.prune(pipe, report, 1, inputs=inputs, keep_first=1, keep_last=1, distill_steps=8, settings=settings,
                    checkpoint_dir=tmp_path, progress=False)


def test_inverse_weighting_slows_the_sensitive_blocks():
    report = ContributionReport("dit", "X", 6, [{"name": f"block {i}", "block": i, "component": None, "params": 1,
                                                 "psnr_db": 0.0, "mse": mse}
                                                for i, mse in enumerate([1, 1, 0.01, 0.1, 1.0, 10.0])])
    kept = [0, 1, 3, 4, 5]
    scales = lr_scales(report, kept, 2, "inverse")
    assert set(scales) == {2, 3, 4}
    assert scales[2] > scales[3] > scales[4]  # block 3 (mse 0.1) least sensitive, block 5 (mse 10) most
    assert abs(np.mean([min(max(s, 0.2), 5.0) for s in scales.values()]) - 1) < 0.35
    assert lr_scales(report, kept, 2, "binary") == {2: 1.0, 3: 1.0, 4: 1.0}


def test_pruned_reference_model_loads_with_plain_diffusers(tmp_path):
    pipe = reference.load("digits-dit")
    model, adapter = denoiser_of(pipe)
    report = ContributionReport("dit", type(model).__name__, 12,
                                [{"name": f"block {i}", "block": i, "component": None, "params": 1,
                                  "psnr_db": float(i % 5), "mse": 0.1} for i in range(12)])
    pruned = accel.prune(pipe, report, 5, distill_steps=0, progress=False)
    assert pruned.transformer.config.num_layers == 7
    pruned.save_pretrained(tmp_path / "pruned")
    probe = {"hidden": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
             "t": torch.tensor([500, 20]), "labels": torch.tensor([3, 10])}
    with torch.no_grad():
        expected = pruned.transformer(probe["hidden"], timestep=probe["t"], class_labels=probe["labels"]).sample
    from safetensors.torch import save_file
    save_file(probe, str(tmp_path / "probe.safetensors"))
    script = (
        "import sys, torch\n"
        "from diffusers import DiTTransformer2DModel\n"
        "from safetensors.torch import load_file, save_file\n"
        "assert not any(name == 'accel' or name.startswith('accel.') for name in sys.modules)\n"
        f"m = DiTTransformer2DModel.from_pretrained({str(tmp_path / 'pruned' / 'transformer')!r}).eval()\n"
        f"p = load_file({str(tmp_path / 'probe.safetensors')!r})\n"
        "with torch.no_grad():\n"
        "    out = m(p['hidden'], timestep=p['t'], class_labels=p['labels']).sample\n"
        f"save_file({{'out': out.contiguous()}}, {str(tmp_path / 'out.safetensors')!r})\n"
        "print(len(m.transformer_blocks))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "7"
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["out"], expected)
    again = reference.load(tmp_path / "pruned")  # the reference loader reads it too
    assert len(again.transformer.transformer_blocks) == 7


def test_pruned_pipeline_stacks_with_quest():
    pipe = tiny.build("dit")
    pruned = accel.prune(pipe, report_for("dit"), 1, distill_steps=0, keep_first=0, progress=False)
    config = QuESTConfig(weight_bits=4, activation_bits=8, stage_a_iterations=1, stage_b_epochs=1,
                         stage_b_iterations=1)
    artifact = accel.calibrate(pruned, config, [inputs_for("dit", seed=9)], num_inference_steps=2, progress=False)
    accel.wrap(pruned, config.replace(artifact=artifact))
    out = run(pruned, "dit")
    assert np.isfinite(out).all()
    accel.unwrap(pruned)


def test_refusals(tmp_path):
    pipe = tiny.build("dit")
    report = report_for("dit")
    for target in (0, True, 1.5, 0.0, "12 parsecs", None):
        with pytest.raises(ValueError, match="target|block"):
            accel.prune(pipe, report, target, distill_steps=0)
    with pytest.raises(ValueError, match="only 1 of 2 are candidates"):
        accel.prune(pipe, report, 2, distill_steps=0, keep_first=0)
    with pytest.raises(ValueError, match="needs inputs"):
        accel.prune(pipe, report, 1, keep_first=0)
    with pytest.raises(ValueError, match="seeded generator"):
        accel.prune(pipe, report, 1, keep_first=0, inputs=[{"class_labels": [1]}])
    with pytest.raises(ValueError, match="granularity"):
        accel.prune(pipe, report, 1, granularity="heads", distill_steps=0)
    with pytest.raises(ValueError, match="Analyse this pipeline"):
        accel.prune(pipe, report_for("pixart-alpha"), 1, distill_steps=0)
    with pytest.raises(ValueError, match="ContributionReport"):
        accel.prune(pipe, {"units": []}, 1, distill_steps=0)
    with pytest.raises(ValueError, match="U-Net"):
        accel.analyze_contributions(tiny.build("sd15"), [inputs_for("sd15")], progress=False)
    with pytest.raises(ValueError, match="not a contribution report"):
        (tmp_path / "x.json").write_text("{}")
        ContributionReport.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="every block|Every kept block|candidates"):
        accel.prune(pipe, report, 1, keep_first=0, keep_last=0, selection="last", inputs=[inputs_for("dit")])
    with pytest.raises(ValueError, match="config.json"):
        accel.load_pruned(tmp_path)
    wrapped = accel.wrap(tiny.build("dit"), "delta-dit")
    with pytest.raises(ValueError, match="unwrap"):
        accel.analyze_contributions(wrapped, [inputs_for("dit")], progress=False)
    with pytest.raises(ValueError, match="unwrap"):
        accel.prune(wrapped, report, 1, distill_steps=0)


def test_a_block_list_whose_count_key_the_config_lacks_is_refused():
    model, adapter = denoiser_of(tiny.build("flux"))
    groups = tuple(dataclasses.replace(group, count_key="num_mystery_layers") for group in adapter.block_groups)
    with pytest.raises(ValueError, match="count key 'num_mystery_layers' is not in the model's config"):
        remove_units(model, dataclasses.replace(adapter, block_groups=groups), [Unit(0)])
