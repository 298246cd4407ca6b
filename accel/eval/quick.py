"""The main job: baseline vs every registered accelerator on one model, as a table of latency, speedup, quality
(PSNR against the baseline's output; class accuracy of the 10 generated digits, one per class, on the reference
models) and the share of blocks computed.

    accel-run                                   # digits-dit, every registered method
    accel-run --model tiny:flux --methods a,b+c --steps 20 --repeats 5

Every method gets its own pipeline instance with the same weights and is called with the same seeds; the runs
are interleaved (baseline, method 1, method 2, baseline, ...) after one untimed warm-up round, so machine drift hits
every row alike (``accel.eval.timing``): latency is the median over rounds, speedup the median of the per-round
ratios with their spread, flagged "within noise" when the spread reaches 1.0x. Progress lines go to stderr.
Quality is PSNR against the baseline's output.
Methods with an offline calibration (BAC, QuEST) are calibrated on the same model with a seed no measured call uses.
``tiny:<family>`` models have random weights: their speed and PSNR figures say nothing about a real model.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import textwrap
import time

import numpy as np
import torch

import accel
from accel.eval.metrics import output_array, psnr
from accel.eval.models import ModelHandle, load_model
from accel.eval.timing import Speedup, interleaved_timings
from accel.registry import parse_method_list, registered, resolve, spec_for

DEFAULT_MODEL = "digits-dit"


def model_handle(name: str) -> ModelHandle:
    """The model ``accel-run`` runs: a reference model or ``tiny:<family>`` (``accel.eval.models.load_model``)."""
    from accel.pipelines import reference

    if name not in reference.MODELS and not name.startswith("tiny:"):
        raise ValueError(f"Unknown model {name!r}; use {', '.join(reference.MODELS)} or tiny:<family>.")
    return load_model(name)


CALIBRATION_SEED = 90_000


def build_wrapped(model: ModelHandle, names: list[str], steps: int | None):
    """A fresh pipeline with ``names`` applied; methods with an offline pass (BAC) are calibrated first, on a seed
    no measured call uses."""
    pipe = model.build()
    kwargs = model.example(pipe, CALIBRATION_SEED, steps)
    steps = kwargs.pop("num_inference_steps")
    return accel.wrap_calibrated(pipe, names, kwargs, num_inference_steps=steps)


def status(message: str) -> None:
    """A progress line on stderr (the table alone goes to stdout)."""
    print(f"accel-run: {message}", file=sys.stderr, flush=True)


def compare(model: ModelHandle, methods: list[tuple[str, list[str]]], repeats: int, seed: int = 0,
            steps: int | None = None) -> list[dict]:
    """One row per method and the baseline: latency, speedup with its spread (``accel.eval.timing``), PSNR against
    the baseline, the share of blocks run and, on the reference models, class accuracy."""
    pipes = {"baseline": accel.wrap(model.build(), [])}
    for label, names in methods:
        calibrating = [spec.name for spec in map(spec_for, resolve(names)) if spec.calibrate is not None]
        status(f"building {label}" + (f" (calibrating {', '.join(calibrating)} on a held-out seed)"
                                      if calibrating else ""))
        started = time.perf_counter()
        pipes[label] = build_wrapped(model, names, steps)
        status(f"{label} ready in {time.perf_counter() - started:.1f} s")

    def call(pipe):
        return lambda: pipe(**model.example(pipe, seed, steps))

    outputs: dict[str, np.ndarray] = {}
    status(f"timing {len(pipes)} pipelines: 1 warm-up round, then {repeats} interleaved")
    timings = interleaved_timings(
        {label: call(pipe) for label, pipe in pipes.items()}, repeats, warmup=1,
        keep=lambda label, output: outputs.__setitem__(label, output_array(output)),
        on_round=lambda done, total: status(f"round {done}/{total} done" + (" (warm-up)" if done == 1 else "")))
    classifier = None
    labels = model.example_labels
    if labels is not None:
        from accel.pipelines.reference import classifier as load_classifier

        classifier = load_classifier()
    rows = []
    for label, pipe in pipes.items():
        speedup = Speedup.from_times(timings["baseline"], timings[label])
        rows.append({
            "method": label,
            "latency_ms": 1000 * statistics.median(timings[label]),
            "speedup": speedup.median,
            "speedup_low": speedup.low,
            "speedup_high": speedup.high,
            "spread": speedup.kind,
            "within_noise": label != "baseline" and repeats > 1 and speedup.within_noise,
            "psnr_db": psnr(outputs["baseline"], outputs[label]),
            "blocks_computed": accel.summary(pipe).blocks_computed_share,
            "class_accuracy": classifier.accuracy(outputs[label], labels) if classifier else None,
        })
    return rows


def format_table(rows: list[dict], model: ModelHandle, repeats: int) -> str:
    spread = rows[0]["spread"] if rows else "min–max"
    lines = [
        f"model: {model.name} ({'random weights: plumbing only' if model.random_weights else 'trained reference'}), "
        f"{repeats} interleaved rounds after a warm-up",
        f"{'method':<24} {'latency ms':>11} {'speedup':>8} {spread:>13} {'PSNR dB':>8} {'blocks run':>11} "
        f"{'class acc':>10}",
    ]
    for row in rows:
        share = "-" if row["blocks_computed"] is None else f"{row['blocks_computed']:.1%}"
        value = "inf" if math.isinf(row["psnr_db"]) else f"{row['psnr_db']:.2f}"
        accuracy = "-" if row["class_accuracy"] is None else f"{row['class_accuracy']:.1%}"
        band = "-" if row["method"] == "baseline" else f"{row['speedup_low']:.2f}–{row['speedup_high']:.2f}x"
        note = "  (within noise)" if row["within_noise"] else ""
        lines.append(
            f"{row['method']:<24} {row['latency_ms']:>11.1f} {row['speedup']:>7.2f}x {band:>13} {value:>8} "
            f"{share:>11} {accuracy:>10}{note}"
        )
    if len(rows) == 1:
        lines.append("(no accelerator runs on this model: the table shows the baseline alone)")
    lines.append("")
    lines += textwrap.wrap(
        f"latency ms: median per call of the {repeats} timed rounds; speedup: median of the per-round ratios "
        f"baseline / method, with their {spread} (\"within noise\" when it reaches 1.0x); PSNR dB: the same seed's "
        "output against the baseline's (inf = identical); blocks run: share of transformer-block calls computed; "
        "class acc: the digit classifier's accuracy on the generated digits (reference models only).", 110)
    lines += textwrap.wrap(
        f"Next: accel-eval --model {model.name} --methods bac,delta-dit --out runs/eval  (FID, CLIP, LPIPS over many "
        "samples, plots and a report); accel-demo  (the side-by-side web demo).", 110)
    return "\n".join(lines)


def runnable_methods(model: ModelHandle, text: str) -> list[tuple[str, list[str]]]:
    """The rows ``--methods`` asks for, each checked by wrapping a fresh pipeline before anything is timed: ``all``
    keeps the registered methods that support the model's family (and says on stderr which it skips); an explicit
    method or stack the model cannot take raises ``ValueError``."""
    from accel.pipelines.adapters import adapter_for

    pipe = model.build()
    family = adapter_for(pipe).name
    if text.strip() == "all":
        skipped = [spec.name for spec in registered() if not spec.supports(family)]
        if skipped:
            print(f"accel-run: skipping {', '.join(skipped)}: not for the {family!r} family of {model.name}.",
                  file=sys.stderr)
        trained = [spec for spec in registered() if spec.supports(family) and spec.trained_with]
        for spec in trained:
            print(f"accel-run: skipping {spec.name}: it loads what {spec.trained_with} trains (minutes); "
                  f"benchmarks/ measure it.", file=sys.stderr)
        return [(spec.name, [spec.name]) for spec in registered() if spec.supports(family) and not spec.trained_with]
    rows = parse_method_list(text)
    quiet = logging.getLogger("accel")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the trial wrap's "no calibrated schedule" warnings
    try:
        for label, names in rows:
            try:
                accel.wrap(pipe, names)  # a stack's conflicts (two methods replacing one attention) show here
            except ValueError as error:
                raise ValueError(f"{label}: {error}") from None
            accel.unwrap(pipe)
    finally:
        quiet.setLevel(level)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accel-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model to run (default {DEFAULT_MODEL})")
    parser.add_argument("--methods", default="all", help="'all', or presets separated by ',' ('+' stacks)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up (default 3)")
    args = parser.parse_args(argv)
    try:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {args.repeats}.")
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}.")
        status(f"loading {args.model}")
        model = model_handle(args.model)
        methods = runnable_methods(model, args.methods)
    except ValueError as error:
        print(f"accel-run: {error}", file=sys.stderr)
        return 2
    status(f"loaded {model.name}; {len(methods)} method row(s) to build")
    with torch.no_grad():
        rows = compare(model, methods, args.repeats, steps=args.steps)
    print(format_table(rows, model, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
