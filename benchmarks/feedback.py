"""Feedback benchmark: ILF at half the steps side by side with the full step count, plain half steps and the
caching methods at ILF's compute, on the trained reference models.

    python benchmarks/feedback.py                          # digits-dit (500 samples) and moving-digits (40)
    python benchmarks/feedback.py --model digits-dit --samples 100 --train-steps 50 --out /tmp/quick

Rows (every row samples the same labels and seeds, ``MEASURE_SEED`` + batch):

* ``baseline, N steps``: the reference model as shipped (N = its default, 20).
* ``plain, N/2 steps``: the same model called with half the steps.
* ``ILF, N/2 steps``: a feedback module trained here (``accel.train_feedback``, data: the model's own N-step
  trajectories on labels and seeds no measured call uses) or loaded with ``--module``.
* ``Δ-DiT, ILF's compute`` and ``BAC + forecast, ILF's compute``: at N steps, set to run the share of block
  computations ILF runs ((depth + loop blocks + 1) / (2 depth)): Δ-DiT on alternate steps reusing the rear blocks
  but the loop's worth, BAC (forecast, L2 shared schedule) calibrated at that budget on calibration seeds. Both
  run slower than ILF at that share (their hooks and unskipped parts cost), so where ``SETUP`` has settings that
  run at ILF's measured speed, ``..., ILF's latency`` rows use them too.

Columns: FID (digit-classifier features vs the held-out digits, torchmetrics), class accuracy (per frame for
video), PSNR against the baseline's output for the same seeds, seconds per sample and the speed ratio to the
baseline (batches interleaved, row order rotating, the baseline timed before and after each batch; median and
spread over batches), training seconds. Writes ``feedback.json`` and ``feedback.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from quantization import machine_description  # noqa: E402

import accel  # noqa: E402
from accel.eval.allocator import timing_allocator  # noqa: E402
from accel.eval.metrics import digit_fid, output_array, psnr  # noqa: E402
from accel.eval.timing import Speedup  # noqa: E402
from accel.io import atomic_write  # noqa: E402
from accel.methods.bac import BACConfig  # noqa: E402
from accel.methods.ilf import FeedbackModule, FeedbackSettings, ILFConfig  # noqa: E402
from accel.pipelines import reference  # noqa: E402
from accel.pipelines.adapters import adapter_for  # noqa: E402
from accel.pipelines.digits import split  # noqa: E402

TRAIN_SEED, CALIBRATION_SEED, MEASURE_SEED = 70_000, 90_000, 1_000
SETUP = {  # training calls x labels per call, training steps, loop region, batch of measured calls
    # at_latency: caching settings that run at ILF's measured speed on this machine (Δ-DiT reusing 11 of 12 blocks
    # every other step ran 1.70x in the caching benchmark; BAC's budget read off its speed curve there)
    "digits-dit": {"train_calls": (16, 32), "train_steps": 1500, "region": (6, 6), "scale": "block", "batch": 50,
                   "at_latency": {"delta_reused": 11, "bac_budget": 0.5}},
    "moving-digits": {"train_calls": (16, 4), "train_steps": 1500, "region": (4, 4), "scale": "block", "batch": 10,
                      "at_latency": None},
}


@dataclass
class Row:
    name: str
    kind: str  # "baseline", "plain", "ours", "caching"
    pipe: object
    steps: int
    seconds: list[float] = field(default_factory=list)
    base_seconds: list[float] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)


def call_inputs(model: str, pipe, calls: int, per_call: int, seed: int) -> list[dict]:
    inputs = [reference.call_kwargs(model, pipe, [(per_call * i + j) % 10 for j in range(per_call)], seed=seed + i)
              for i in range(calls)]
    return [{k: v for k, v in kwargs.items() if k != "num_inference_steps"} for kwargs in inputs]


def feedback_module(model: str, pipe, steps: int, train_steps: int, module_dir: Path | None):
    setup = SETUP[model]
    if module_dir is not None:
        card = FeedbackModule.read_card(module_dir)
        return str(module_dir), card["training"]["seconds"], card
    inputs = call_inputs(model, pipe, *setup["train_calls"], TRAIN_SEED)
    module = accel.train_feedback(pipe, inputs, steps, region=setup["region"], scale=setup["scale"],
                                  settings=FeedbackSettings(steps=train_steps))
    folder = ROOT / "runs" / f"feedback-module-{model}"  # runs/ is not committed; --module reuses it
    module.save(folder)
    card = FeedbackModule.read_card(folder)  # the card as saved: region and scale included
    return str(folder), card["training"]["seconds"], card


def bac_wrapped(model: str, budget: float, steps: int):
    """BAC with the forecast and the L2 shared schedule (the caching benchmark's best), calibrated on seeds no
    measured call uses."""
    pipe = reference.load(model)
    config = BACConfig(budget=budget, forecast=1, metric="l2", per_block=True, share_budget=True, top_k=0)
    inputs = call_inputs(model, pipe, 2, 10 if model == "digits-dit" else 2, CALIBRATION_SEED)
    return accel.wrap_calibrated(pipe, config, inputs, num_inference_steps=steps)


def build_rows(model: str, steps: int, train_steps: int, module_dir: Path | None):
    base = reference.load(model)
    module, train_s, card = feedback_module(model, base, steps, train_steps, module_dir)
    depth = len(adapter_for(base).blocks(base.transformer))
    loop = card["region"][1] - card["region"][0] + 1
    share = (depth + loop + 1) / (2 * depth)  # ILF's block computations per N-step baseline's
    reused = depth - loop - 1  # Δ-DiT: blocks reused on alternate steps for the same share
    rows = [Row(f"baseline, {steps} steps", "baseline", base, steps),
            Row(f"plain, {steps // 2} steps", "plain", reference.load(model), steps // 2),
            Row(f"ILF, {steps // 2} steps", "ours", accel.wrap(reference.load(model), ILFConfig(module=module)),
                steps // 2)]
    delta = accel.DeltaDiTConfig(interval=2, cached_fraction=reused / depth, boundary=1.0)
    rows.append(Row(f"Δ-DiT, ILF's compute ({reused} of {depth} blocks reused every other step)", "caching",
                    accel.wrap(reference.load(model), delta), steps))
    rows.append(Row(f"BAC + forecast, ILF's compute (budget {share:.3f})", "caching",
                    bac_wrapped(model, round(share, 3), steps), steps))
    matched = SETUP[model]["at_latency"]
    if matched:
        reused_more = matched["delta_reused"]
        delta = accel.DeltaDiTConfig(interval=2, cached_fraction=reused_more / depth, boundary=1.0)
        rows.append(Row(f"Δ-DiT, ILF's latency ({reused_more} of {depth} blocks reused every other step)",
                        "caching", accel.wrap(reference.load(model), delta), steps))
        rows.append(Row(f"BAC + forecast, ILF's latency (budget {matched['bac_budget']})", "caching",
                        bac_wrapped(model, matched["bac_budget"], steps), steps))
    for row in rows:
        row.pipe.set_progress_bar_config(disable=True)
    return rows, {"train_s": train_s, "card": card, "compute_share": share, "module": module}


def measure(model: str, rows: list[Row], samples: int) -> list[int]:
    labels = [i % 10 for i in range(samples)]
    batch = SETUP[model]["batch"]
    batches = [labels[start:start + batch] for start in range(0, samples, batch)]
    base, others = rows[0], rows[1:]
    for row in rows:  # warm-up, untimed
        row.pipe(**reference.call_kwargs(model, row.pipe, [0, 1], seed=MEASURE_SEED - 1,
                                         num_inference_steps=row.steps))
    progress = tqdm(total=len(batches) * (len(rows) + 1), desc=f"{model}: generate")
    for index, batch_labels in enumerate(batches):
        shift = index % len(others)
        order = [base] + others[shift:] + others[:shift] + [base]
        base_times = []
        for position, row in enumerate(order):
            kwargs = reference.call_kwargs(model, row.pipe, batch_labels, seed=MEASURE_SEED + index,
                                           num_inference_steps=row.steps)
            started = time.perf_counter()
            output = output_array(row.pipe(**kwargs))
            seconds = time.perf_counter() - started
            if row is base:
                base_times.append(seconds)
                if position == 0:
                    row.outputs.append(output)
                elif not np.array_equal(output, row.outputs[-1]):
                    raise RuntimeError("The baseline is not deterministic: the same seeds gave other outputs.")
            else:
                row.seconds.append(seconds)
                row.outputs.append(output)
            progress.update()
        mean = sum(base_times) / 2
        base.seconds.append(mean)
        for row in others:
            row.base_seconds.append(mean)
    base.base_seconds = list(base.seconds)
    progress.close()
    return labels


def run_model(model: str, samples: int, train_steps: int, module_dir: Path | None) -> dict:
    steps = reference.DEFAULT_CALL[model]["num_inference_steps"]
    rows, extra = build_rows(model, steps, train_steps, module_dir)
    labels = measure(model, rows, samples)
    classifier = reference.classifier()
    held_out = split()["held_out"].images
    reference_images = np.concatenate(rows[0].outputs)
    results = []
    for row in rows:
        images = np.concatenate(row.outputs)
        speed = Speedup.from_times(row.base_seconds, row.seconds)
        results.append({
            "name": row.name, "kind": row.kind, "steps": row.steps,
            "fid": digit_fid(classifier, images, held_out), "class_accuracy": classifier.accuracy(images, labels),
            "psnr_db": psnr(reference_images, images) if row.kind != "baseline" else None,
            "seconds_per_sample": sum(row.seconds) / samples, "speed": speed.to_dict(),
            "speedup": float(np.median(np.array(row.base_seconds) / np.array(row.seconds))),
            "speed_text": speed.describe() if row.kind != "baseline" else "1.00×",
            "train_s": extra["train_s"] if row.kind == "ours" else None,
        })
    card = extra["card"]
    return {"model": model, "steps": steps, "guidance_scale": reference.DEFAULT_CALL[model]["guidance_scale"],
            "samples": samples, "region": card["region"], "scale": card["scale"],
            "module_loaded_from": str(module_dir) if module_dir is not None else None,
            "training": card["training"], "compute_share": extra["compute_share"], "module": extra["module"],
            "rows": results}


def bars(setting: dict) -> list[str]:
    """The issue's bars, checked against the measured rows (nothing here is a result)."""
    rows = [row for row in setting["rows"]]
    base, plain, ours = rows[0], rows[1], rows[2]
    lines = []

    def check(label: str, ok: bool, detail: str) -> None:
        lines.append(f"- {'met' if ok else '**not met**'}: {label} ({detail})")

    if setting["model"] == "digits-dit":
        check("≥ 1.7× speedup", ours["speedup"] >= 1.7, ours["speed_text"])
        check("FID within +5% of the 20-step baseline", ours["fid"] <= 1.05 * base["fid"],
              f"{ours['fid']:.2f} vs {base['fid']:.2f}")
        for row in rows[1:]:
            if row["kind"] in ("plain", "caching"):
                check(f"better FID than '{row['name']}'", ours["fid"] < row["fid"],
                      f"{ours['fid']:.2f} vs {row['fid']:.2f}; PSNR {ours['psnr_db']:.2f} vs {row['psnr_db']:.2f} dB, "
                      f"speed {ours['speed_text']} vs {row['speed_text']}")
        minutes = (ours["train_s"] or 0) / 60
        check("training ≤ 30 minutes on 2 CPU cores", minutes <= 30, f"{minutes:.1f} min incl. sampling")
    else:
        check("≥ 1.7× speedup", ours["speedup"] >= 1.7, ours["speed_text"])
        check("per-frame class accuracy within 2 points", ours["class_accuracy"] >= base["class_accuracy"] - 0.02,
              f"{100 * ours['class_accuracy']:.1f}% vs {100 * base['class_accuracy']:.1f}%; plain half steps "
              f"{100 * plain['class_accuracy']:.1f}%")
    return lines


READING = (
    "Reading the table: PSNR against the baseline's output for the same seeds is the fidelity figure; the digit FID "
    "falls as sample diversity rises, so read it with PSNR and accuracy: a row that approximates the baseline "
    "and reads a lower FID than it has shifted the sample statistics, which is no gain unless its PSNR is high too "
    "(docs/methods/ilf.md). Speed is the median over batches of the "
    "baseline's seconds (mean of the calls before and after the batch) over the row's; the spread is over batches.")


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(settings: list[dict], machine: dict) -> str:
    lines = ["# Feedback: ILF at half the steps vs the baseline, plain half steps and caching at the same compute", "",
             "Generated by `python benchmarks/feedback.py` (module docstring: rows, columns, protocol). "
             f"Machine: {machine['processor']}, {machine['threads']} threads, torch {machine['torch']}; measured "
             f"{machine['date']}. Every figure is a trained reference model's.", ""]
    for setting in settings:
        training = setting["training"]
        lines += [f"## {setting['model']}, {setting['steps']} → {setting['steps'] // 2} steps, guidance "
                  f"{setting['guidance_scale']}, {setting['samples']} samples", "",
                  f"Feedback module: loop region blocks {setting['region'][0]}–{setting['region'][1]}, scale per "
                  f"{setting['scale']}; trained {training['steps']} steps on {training['pairs']} recorded denoiser "
                  f"calls of {training['pipeline_calls']} sampling calls in {training['seconds']:.0f} s (recording "
                  f"{training['recording_s']:.0f} s"
                  + (f"; loaded from `{setting['module_loaded_from']}`, its card's training time" if
                     setting.get("module_loaded_from") else "; trained in this run")
                  + f"). ILF runs {100 * setting['compute_share']:.1f}% of the baseline's block computations; the "
                  "caching rows are set to the same share.", "",
                  "| row | steps | FID | class acc. | PSNR vs baseline | s / sample | speed vs baseline | "
                  "training s |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in setting["rows"]:
            lines.append(f"| {row['name']} | {row['steps']} | {row['fid']:.2f} | {100 * row['class_accuracy']:.1f}% | "
                         f"{_fmt(row['psnr_db'], '.2f')} | {row['seconds_per_sample']:.3f} | {row['speed_text']} | "
                         f"{_fmt(row['train_s'], '.0f')} |")
        lines += ["", READING, "", "Bars:"] + bars(setting) + [""]
    return "\n".join(lines)


def write(out: Path, settings: list[dict], allocator: str) -> None:
    """Write the results, keeping the other models' sections already in ``out/feedback.json``."""
    machine = machine_description(allocator)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "feedback.json").is_file():
        earlier = json.loads((out / "feedback.json").read_text())["settings"]
        measured = {setting["model"] for setting in settings}
        settings = [s for s in earlier if s["model"] not in measured] + settings
        settings.sort(key=lambda setting: list(reference.MODELS).index(setting["model"]))
    atomic_write(out / "feedback.json", json.dumps({"machine": machine, "settings": settings}, indent=1))
    atomic_write(out / "feedback.md", markdown(settings, machine))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=list(reference.MODELS))
    parser.add_argument("--samples", type=int, default=None, help="default 500 (digits-dit), 40 (moving-digits)")
    parser.add_argument("--train-steps", type=int, default=None, help="default: SETUP")
    parser.add_argument("--module", type=Path, default=None, help="a trained feedback module's folder (skips "
                        "training; its card's training time is reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="one short training call (checks the script runs; "
                        "its figures mean nothing)")
    args = parser.parse_args(argv)
    if args.smoke:
        for setup in SETUP.values():
            setup.update(train_calls=(1, 2))
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)  # training turns gradients on where it needs them
    allocator = timing_allocator()
    settings = []
    for model in args.model or ["digits-dit", "moving-digits"]:
        samples = args.samples or (500 if model == "digits-dit" else 40)
        train_steps = args.train_steps or SETUP[model]["train_steps"]
        settings.append(run_model(model, samples, train_steps, args.module))
        write(args.out, settings, allocator)  # after each model: a later failure keeps what was measured
    print(markdown(settings, machine_description(allocator)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
