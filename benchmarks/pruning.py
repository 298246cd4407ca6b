"""Pruning benchmark: HierarchicalPrune side by side with its baselines, on the trained reference models.

    python benchmarks/pruning.py                                        # digits-dit (500 samples) and moving-digits
    python benchmarks/pruning.py --model digits-dit --samples 100 --distill-steps 100 --out /tmp/quick

Every pruned row removes the same number of blocks (``--blocks``; 5 of digits-dit's 12, 2 of moving-digits' 8) and
distils, where it distils, with the same settings, steps and data (the full model's trajectories on calibration
labels and seeds no measured call uses):

* ``full``: the reference model as shipped (float32 on the CPU).
* ``hierarchical-prune``: contribution analysis, the least essential later blocks removed, the prefix frozen,
  distillation with inverse-sensitivity learning-rate scales (``accel.prune`` defaults).
* ``+ quest-w4a8``: that model with QuEST W4A8 weights (calibrated on it, float weights released).
* ``last blocks, distilled``: no analysis: the blocks just before the final one removed, same distillation.
* ``last blocks, no distillation``: the naive cut.
* ``analysis, no distillation``: our cut, not distilled.
* ``uniform feature-KD``: our cut, every trainable block at the same learning rate (the release's binary weighting).

Columns: FID (digit-classifier features, torchmetrics) and class accuracy (per frame for video), PSNR against the
full model's output for the same seeds, parameters, transformer weight bytes held (tensor subclasses and hook state
included) and the saving against the full model's float32 and fp16 bytes, resident memory of a fresh process that
loads the saved model (VmRSS after load minus after imports, malloc_trim'd), seconds per sample with the speed
ratio to full (batches interleaved, row order rotating; median and spread over batches), analysis and distillation
seconds. Writes ``pruning.json``, ``pruning.md``, ``pruning.png`` (FID vs weight bytes) and the contribution
analysis of each model (``pruning-contributions-<model>.{json,png}``) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from quantization import _rss, fp16_bytes, machine_description, transformer_bytes  # noqa: E402

import accel  # noqa: E402
from accel.eval.allocator import timing_allocator  # noqa: E402
from accel.eval.metrics import digit_fid, output_array, psnr  # noqa: E402
from accel.eval.timing import Speedup  # noqa: E402
from accel.io import atomic_write  # noqa: E402
from accel.methods.hierarchical_prune import DistillationSettings  # noqa: E402
from accel.pipelines import reference  # noqa: E402
from accel.pipelines.digits import split  # noqa: E402

ANALYSIS_SEED, DISTILL_SEED, QUEST_SEED, MEASURE_SEED = 80_000, 70_000, 90_000, 1_000
SETUP = {  # blocks removed, distillation steps, analysis calls x per call, distillation calls x per call
    # 3000 steps on 32 recorded calls: 1500 on 16 read FID +10.9%, 3000 on 32 +9.7% (docs/methods/)
    "digits-dit": {"blocks": 5, "steps": 3000, "analysis": (2, 10), "distill": (32, 32), "batch": 50,
                   "distilled_baselines": True},
    # moving-digits reports the same figures with no bar: the distilled baselines are left out to keep the run short.
    # 2 blocks on 4000 steps over 32 calls: 3 blocks on 1500 / 16 read 79.1% per-frame accuracy (full 94.1%), 2 blocks
    # on 1500 / 16 86.8%, both outside the issue's 5 points (docs/methods/hierarchical_prune.md)
    "moving-digits": {"blocks": 2, "steps": 4000, "analysis": (2, 2), "distill": (32, 4), "batch": 10,
                      "distilled_baselines": False},
}


def call_inputs(model: str, pipe, calls: int, per_call: int, seed: int) -> list[dict]:
    return [reference.call_kwargs(model, pipe, [(per_call * i + j) % 10 for j in range(per_call)], seed=seed + i)
            for i in range(calls)]


@dataclass
class Row:
    name: str
    kind: str  # "full", "ours", "stack", "baseline"
    pipe: object
    distill_s: float | None = None
    seconds: list[float] = field(default_factory=list)
    full_seconds: list[float] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    folder: Path | None = None
    artifact: object = None


def build_rows(model: str, blocks: int, steps: int, out: Path, work: Path) -> tuple[list[Row], dict]:
    setup = SETUP[model]
    full = reference.load(model)
    classifier = reference.classifier()
    analysis_inputs = call_inputs(model, full, *setup["analysis"], ANALYSIS_SEED)
    analysis_labels = [label for i in range(setup["analysis"][0])
                       for label in [(setup["analysis"][1] * i + j) % 10 for j in range(setup["analysis"][1])]]

    def scorer(outputs):
        return {"class_accuracy": float(classifier.accuracy(np.concatenate(outputs), analysis_labels))}

    report = accel.analyze_contributions(full, analysis_inputs, scorer=scorer)
    report.save(out / f"pruning-contributions-{model}.json")
    report.plot(out / f"pruning-contributions-{model}.png", title=f"{model}: contribution analysis "
                f"({len(analysis_labels)} samples, PSNR vs the full model after removing one unit)")
    distill_inputs = call_inputs(model, full, *setup["distill"], DISTILL_SEED)
    settings = DistillationSettings(steps=steps)

    def pruned(name: str, kind: str, distill: bool = True, **options) -> Row:
        started = time.perf_counter()
        pipe = accel.prune(full, report, blocks, inputs=distill_inputs, distill_steps=None if distill else 0,
                           settings=options.pop("settings", settings), **options)
        return Row(name, kind, pipe, distill_s=time.perf_counter() - started if distill else None)

    rows = [Row("full", "full", full)]
    ours = pruned("hierarchical-prune", "ours")
    rows.append(ours)
    stacked = copy_pipe(ours.pipe)
    (config,) = accel.registry.resolve("quest-w4a8")
    quest_inputs = call_inputs(model, full, 4, 5 if model == "digits-dit" else 2, QUEST_SEED)
    for kwargs in quest_inputs:
        kwargs.pop("num_inference_steps")
    started = time.perf_counter()
    artifact = accel.calibrate(stacked, config, quest_inputs,
                               num_inference_steps=reference.DEFAULT_CALL[model]["num_inference_steps"])
    quest_s = time.perf_counter() - started
    accel.wrap(stacked, config.replace(artifact=artifact, release_originals=True))
    rows.append(Row("hierarchical-prune + quest-w4a8", "stack", stacked, distill_s=ours.distill_s, artifact=artifact))
    if setup["distilled_baselines"]:
        rows.append(pruned("last blocks, distilled", "baseline", selection="last"))
    rows.append(pruned("last blocks, no distillation", "baseline", selection="last", distill=False))
    rows.append(pruned("analysis, no distillation", "baseline", distill=False))
    if setup["distilled_baselines"]:
        rows.append(pruned("uniform feature-KD", "baseline",
                           settings=DistillationSettings(steps=steps, weighting="binary")))
    saved: dict[str, Path] = {}
    for row in rows:
        row.pipe.set_progress_bar_config(disable=True)
        if row.kind != "full":
            row.folder = save_model(model, row, work, saved)
    return rows, {"report": report.to_dict(), "quest_calibration_s": quest_s}


def copy_pipe(pipe):
    import copy

    clone = copy.copy(pipe)
    clone.register_modules(transformer=copy.deepcopy(pipe.transformer))
    return clone


def save_model(model: str, row: Row, work: Path, saved: dict[str, Path]) -> Path:
    """The reference folder with the pruned transformer (what ``reference.load``, plain diffusers underneath, reads);
    the stacked row's is the pruned row's folder with the QuEST artifact in ``quest/``."""
    folder = work / row.name.replace(" ", "_").replace(",", "").replace("+", "plus")
    if row.artifact is not None:
        shutil.copytree(saved["hierarchical-prune"], folder)
        row.artifact.save(folder / "quest")
    else:
        shutil.copytree(reference.model_dir(model), folder, ignore=shutil.ignore_patterns("transformer"))
        row.pipe.transformer.save_pretrained(folder / "transformer")
    saved[row.name] = folder
    return folder


def resident(folder: Path | None, model: str) -> dict | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--rss-child", model, str(folder or "")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    for line in result.stdout.splitlines():
        if line.startswith("RSS_MB "):
            before, after = map(float, line.split()[1:])
            return {"process_mb": after, "pipeline_mb": after - before}
    print(f"resident memory of {folder}: no figure ({result.stderr.strip()[-300:]})", file=sys.stderr)
    return None


def _rss_child(model: str, folder: str) -> None:
    torch.set_num_threads(2)
    import optimum.quanto  # noqa: F401  (the same imports as the quantization benchmark's children)
    import torchao  # noqa: F401

    before = _rss()
    pipe = reference.load(folder or model)
    if folder and (Path(folder) / "quest").is_dir():
        accel.wrap(pipe, "quest-w4a8", artifact=str(Path(folder) / "quest"), release_originals=True)
    print(f"RSS_MB {before:.1f} {_rss():.1f}")


def run_model(model: str, samples: int, blocks: int, steps: int, out: Path) -> dict:
    setup = SETUP[model]
    with tempfile.TemporaryDirectory() as work:
        rows, extra = build_rows(model, blocks, steps, out, Path(work))
        labels = [i % 10 for i in range(samples)]
        batch = setup["batch"]
        batches = [labels[start:start + batch] for start in range(0, samples, batch)]
        full_row, others = rows[0], rows[1:]
        for row in rows:  # warm-up, untimed
            row.pipe(**reference.call_kwargs(model, row.pipe, [0, 1], seed=MEASURE_SEED - 1))
        progress = tqdm(total=len(batches) * (len(rows) + 1), desc=f"{model}: generate")
        for index, batch_labels in enumerate(batches):
            shift = index % len(others)
            order = [full_row] + others[shift:] + others[:shift] + [full_row]
            times = {}
            for position, row in enumerate(order):
                kwargs = reference.call_kwargs(model, row.pipe, batch_labels, seed=MEASURE_SEED + index)
                started = time.perf_counter()
                output = output_array(row.pipe(**kwargs))
                seconds = time.perf_counter() - started
                if row is full_row:
                    times[position] = seconds
                    if position == 0:
                        row.outputs.append(output)
                    elif not np.array_equal(output, row.outputs[-1]):
                        raise RuntimeError("The full pipeline is not deterministic: the same seeds gave other "
                                           "outputs.")
                else:
                    row.seconds.append(seconds)
                    row.outputs.append(output)
                progress.update()
            full_seconds = (times[0] + times[len(order) - 1]) / 2
            full_row.seconds.append(full_seconds)
            for row in others:
                row.full_seconds.append(full_seconds)
        full_row.full_seconds = list(full_row.seconds)
        progress.close()

        classifier = reference.classifier()
        held_out = split()["held_out"].images
        reference_images = np.concatenate(full_row.outputs)
        full_bytes = transformer_bytes(full_row.pipe.transformer)
        full_fp16 = fp16_bytes(full_row.pipe.transformer)
        full_params = sum(p.numel() for p in full_row.pipe.transformer.parameters())
        results = []
        for row in tqdm(rows, desc=f"{model}: metrics and resident memory"):
            images = np.concatenate(row.outputs)
            speed = Speedup.from_times(row.full_seconds, row.seconds)
            held = transformer_bytes(row.pipe.transformer)
            params = sum(p.numel() for p in row.pipe.transformer.parameters()) if row.artifact is None else \
                sum(p.numel() for p in rows[1].pipe.transformer.parameters())
            info = getattr(row.pipe, "accel_pruning", {}) if row.artifact is None else rows[1].pipe.accel_pruning
            results.append({
                "name": row.name, "kind": row.kind,
                "removed": info.get("removed"), "kept_blocks": info.get("kept_blocks"),
                "fid": digit_fid(classifier, images, held_out),
                "class_accuracy": classifier.accuracy(images, labels),
                "psnr_db": psnr(reference_images, images) if row is not full_row else None,
                "params": params, "params_saving": 1 - params / full_params,
                "weight_bytes": held, "memory_saving": 1 - held / full_bytes,
                "memory_saving_vs_fp16": 1 - held / full_fp16,
                "seconds_per_sample": sum(row.seconds) / samples, "speed": speed.to_dict(),
                "latency_saving": 1 - float(np.median(np.array(row.seconds) / np.array(row.full_seconds))),
                "speed_text": speed.describe() if row is not full_row else "1.00×",
                "distill_s": row.distill_s,
                "distillation": info.get("distillation"),
                "resident": resident(row.folder, model),
            })
    return {"model": model, "steps": reference.DEFAULT_CALL[model]["num_inference_steps"],
            "guidance_scale": reference.DEFAULT_CALL[model]["guidance_scale"], "samples": samples,
            "blocks_removed": blocks, "distill_steps": steps, "full_weight_bytes": full_bytes,
            "full_fp16_bytes": full_fp16, "analysis_s": extra["report"]["metadata"]["seconds"],
            "quest_calibration_s": extra["quest_calibration_s"], "rows": results}


# ---------------------------------------------------------------------------------------------- report


def bars(setting: dict) -> list[str]:
    """The issue's bars, checked against the measured rows (nothing here is a result)."""
    rows = {row["name"]: row for row in setting["rows"]}
    full, ours, stacked = rows["full"], rows["hierarchical-prune"], rows["hierarchical-prune + quest-w4a8"]
    lines = []

    def check(label: str, ok: bool, detail: str) -> None:
        lines.append(f"- {'met' if ok else '**not met**'}: {label} ({detail})")

    if setting["model"] == "digits-dit":
        check("≥ 30% lower latency", ours["latency_saving"] >= 0.30, f"{100 * ours['latency_saving']:.1f}% "
              f"({ours['speed_text']})")
        check("≥ 40% less transformer memory", ours["memory_saving"] >= 0.40,
              f"{100 * ours['memory_saving']:.1f}% of the float32 bytes, {100 * ours['memory_saving_vs_fp16']:.1f}% "
              "against fp16")
        check("with 4-bit weights ≥ 75% less", stacked["memory_saving_vs_fp16"] >= 0.75,
              f"{100 * stacked['memory_saving_vs_fp16']:.1f}% against the full model's fp16 bytes, "
              f"{100 * stacked['memory_saving']:.1f}% against its float32 bytes")
        check("FID within +10% of the full model", ours["fid"] <= 1.10 * full["fid"],
              f"{ours['fid']:.2f} vs {full['fid']:.2f}")
        check("class accuracy within 3 points", ours["class_accuracy"] >= full["class_accuracy"] - 0.03,
              f"{100 * ours['class_accuracy']:.1f}% vs {100 * full['class_accuracy']:.1f}%")
        for row in setting["rows"]:
            if row["kind"] == "baseline":
                check(f"better FID than '{row['name']}'", ours["fid"] < row["fid"],
                      f"{ours['fid']:.2f} vs {row['fid']:.2f}; PSNR {ours['psnr_db']:.2f} vs {row['psnr_db']:.2f} dB")
        minutes = (ours["distill_s"] or 0) / 60
        check("distillation ≤ 20 minutes on 2 CPU cores", minutes <= 20, f"{minutes:.1f} min incl. sampling")
    else:
        check("per-frame class accuracy within 5 points", ours["class_accuracy"] >= full["class_accuracy"] - 0.05,
              f"{100 * ours['class_accuracy']:.1f}% vs {100 * full['class_accuracy']:.1f}%")
    return lines


READING = (
    "Reading the table: PSNR against the full model's output for the same seeds is the fidelity figure. The digit "
    "FID falls as sample diversity rises (guidance 1.5 → 1.0 takes the full model from 16.7 to 8.2, model card), so "
    "a cut that adds noise can read a lower FID while departing further from the full model: compare FID together "
    "with PSNR and accuracy. Savings are 1 − pruned / full; latency saving is the median over batches of 1 − "
    "pruned / full seconds, each batch timed next to the full model.")


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(settings: list[dict], machine: dict) -> str:
    lines = ["# Pruning: HierarchicalPrune vs its baselines", "",
             "Generated by `python benchmarks/pruning.py` (module docstring: rows, columns, protocol). "
             f"Machine: {machine['processor']}, {machine['threads']} threads, torch {machine['torch']}; measured "
             f"{machine['date']}. Every figure is a trained reference model's.", ""]
    for setting in settings:
        lines += [f"## {setting['model']}, {setting['steps']} steps, guidance {setting['guidance_scale']}, "
                  f"{setting['samples']} samples; {setting['blocks_removed']} blocks removed, "
                  f"{setting['distill_steps']} distillation steps", "",
                  f"Contribution analysis: {setting['analysis_s']:.0f} s "
                  f"(`pruning-contributions-{setting['model']}.png`); QuEST W4A8 calibration on the pruned model: "
                  f"{setting['quest_calibration_s']:.0f} s.", "",
                  "| row | removed | FID | class acc. | PSNR vs full | params | weight MiB | memory saving (fp32 / "
                  "fp16) | resident MiB: pipeline (process) | s / sample | speed vs full | latency saving | "
                  "distillation s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in setting["rows"]:
            removed = ", ".join(name.replace("block ", "") for name in row["removed"]) if row["removed"] else "–"
            res = row.get("resident")
            resident_text = "–" if not res else f"{res['pipeline_mb']:.1f} ({res['process_mb']:.0f})"
            lines.append(
                f"| {row['name']} | {removed} | {row['fid']:.2f} | {100 * row['class_accuracy']:.1f}% | "
                f"{_fmt(row['psnr_db'], '.2f')} | {row['params']:,} | {row['weight_bytes'] / 2**20:.2f} | "
                f"{100 * row['memory_saving']:.1f}% / {100 * row['memory_saving_vs_fp16']:.1f}% | "
                f"{resident_text} | {row['seconds_per_sample']:.3f} | {row['speed_text']} | "
                f"{100 * row['latency_saving']:.1f}% | "
                f"{_fmt(row['distill_s'], '.0f')} |")
        lines += ["", READING, "", "Bars:"] + bars(setting) + [""]
    return "\n".join(lines)


def plot(settings: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.5), squeeze=False)
    colours = {"full": "black", "ours": "tab:red", "stack": "tab:purple", "baseline": "tab:grey"}
    for axis, setting in zip(axes[0], settings):
        for row in setting["rows"]:
            axis.scatter(row["weight_bytes"] / 2**20, row["fid"], color=colours[row["kind"]])
            axis.annotate(row["name"], (row["weight_bytes"] / 2**20, row["fid"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
        axis.set_xlabel("transformer weight bytes held (MiB)")
        axis.set_ylabel("FID (digit-classifier features; lower is better)")
        axis.set_title(f"{setting['model']}: {setting['blocks_removed']} blocks removed, {setting['samples']} samples")
    figure.tight_layout()
    buffer = path.with_suffix(".partial.png")
    figure.savefig(buffer, dpi=110)
    buffer.replace(path)


def write(out: Path, settings: list[dict], allocator: str) -> None:
    """Write the results, keeping the other models' settings already in ``out/pruning.json`` (one model per run
    updates its own section)."""
    machine = machine_description(allocator)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "pruning.json").is_file():
        earlier = json.loads((out / "pruning.json").read_text())["settings"]
        measured = {setting["model"] for setting in settings}
        settings = [s for s in earlier if s["model"] not in measured] + settings
        settings.sort(key=lambda setting: list(reference.MODELS).index(setting["model"]))
    atomic_write(out / "pruning.json", json.dumps({"machine": machine, "settings": settings}, indent=1))
    atomic_write(out / "pruning.md", markdown(settings, machine))
    plot(settings, out / "pruning.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=list(reference.MODELS))
    parser.add_argument("--samples", type=int, default=None, help="default 500 (digits-dit), 40 (moving-digits)")
    parser.add_argument("--blocks", type=int, default=None, help="blocks removed (default: SETUP)")
    parser.add_argument("--distill-steps", type=int, default=None, help="default: SETUP")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="one short call for analysis and distillation data "
                        "(checks the script runs; its figures mean nothing)")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        _rss_child(*args.rss_child)
        return 0
    if args.smoke:
        for setup in SETUP.values():
            setup.update(analysis=(1, 2), distill=(1, 2))
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)  # distillation turns gradients on where it needs them
    allocator = timing_allocator()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = []
    for model in args.model or ["digits-dit", "moving-digits"]:
        samples = args.samples or (500 if model == "digits-dit" else 40)
        setup = SETUP[model]
        settings.append(run_model(model, samples, args.blocks or setup["blocks"],
                                  setup["steps"] if args.distill_steps is None else args.distill_steps, args.out))
        write(args.out, settings, allocator)  # after each model: a later failure keeps what was measured
    print(markdown(settings, machine_description(allocator)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
