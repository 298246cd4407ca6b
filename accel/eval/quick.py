"""The main job: baseline vs every registered accelerator on one model, as a table of latency, speedup, quality
(PSNR against the baseline's output; class accuracy of the 10 generated digits, one per class, on the reference
models) and the share of blocks computed.

    accel-run                                   # digits-dit, every registered method
    accel-run --model tiny:flux --methods a,b+c --steps 20 --repeats 5

Every method gets its own pipeline instance with the same weights and is called with the same seeds; the runs
are interleaved (baseline, method 1, method 2, baseline, ...) so machine drift hits every row alike, and the
latency is the median over repeats after one warm-up call. Quality is PSNR against the baseline's output.
Methods with an offline calibration (BAC) are calibrated on the same model with a seed no measured call uses.
``tiny:<family>`` models have random weights: their speed and PSNR figures say nothing about a real model.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import accel
from accel.eval.metrics import psnr
from accel.registry import available

DEFAULT_MODEL = "digits-dit"


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], Any]  # a fresh pipeline with the model's weights
    call_kwargs: Callable[[Any, int], dict[str, Any]]  # (pipe, seed) -> kwargs for one call
    trained: bool
    labels: list[int] | None = None  # requested classes, for class accuracy


def model_spec(name: str, steps: int | None) -> ModelSpec:
    if name.startswith("tiny:"):
        from accel.pipelines import tiny

        family = name.split(":", 1)[1]
        if family not in tiny.FAMILIES:
            raise ValueError(f"Unknown tiny family {family!r}; choose one of {', '.join(tiny.FAMILIES)}.")
        return ModelSpec(
            name,
            lambda: tiny.build(family),
            lambda pipe, seed: tiny.example_inputs(family, seed=seed, num_inference_steps=steps or 10),
            trained=False,
        )
    from accel.pipelines import reference

    if name in reference.MODELS:
        labels = list(range(10))
        overrides = {"num_inference_steps": steps} if steps else {}
        reference.model_dir(name)  # a clear error now if the weights are missing
        return ModelSpec(
            name,
            lambda: reference.load(name),
            lambda pipe, seed: reference.call_kwargs(name, pipe, labels, seed=seed, **overrides),
            trained=True,
            labels=labels,
        )
    raise ValueError(f"Unknown model {name!r}; use {', '.join(reference.MODELS)} or tiny:<family>.")


def parse_methods(text: str) -> list[tuple[str, list[str]]]:
    """``"all"`` or a comma-separated list of presets, ``+`` stacking several: ``"a,b+c"``."""
    if text == "all":
        return [(entry["name"], [entry["name"]]) for entry in available()]
    rows = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        rows.append((item, [name.strip() for name in item.split("+")]))
    return rows


def _output_array(output) -> np.ndarray:
    return np.asarray(output.images if hasattr(output, "images") else output.frames, dtype=np.float64)


CALIBRATION_SEED = 90_000


def build_wrapped(model: ModelSpec, names: list[str]):
    """A fresh pipeline with ``names`` applied; methods with an offline pass (BAC) are calibrated first, on a seed
    no measured call uses."""
    pipe = model.build()
    kwargs = model.call_kwargs(pipe, CALIBRATION_SEED)
    steps = kwargs.pop("num_inference_steps")
    return accel.wrap_calibrated(pipe, names, kwargs, num_inference_steps=steps)


def compare(model: ModelSpec, methods: list[tuple[str, list[str]]], repeats: int, seed: int = 0) -> list[dict]:
    pipes = {"baseline": accel.wrap(model.build(), [])}
    for label, names in methods:
        pipes[label] = build_wrapped(model, names)
    timings: dict[str, list[float]] = {label: [] for label in pipes}
    outputs: dict[str, np.ndarray] = {}
    for repeat in range(repeats + 1):  # the first round is a warm-up
        for label, pipe in pipes.items():
            kwargs = model.call_kwargs(pipe, seed)
            start = time.perf_counter()
            output = pipe(**kwargs)
            elapsed = time.perf_counter() - start
            if repeat == 0:
                outputs[label] = _output_array(output)
            else:
                timings[label].append(elapsed)
    baseline_latency = statistics.median(timings["baseline"])
    classifier = None
    if model.labels is not None:
        from accel.pipelines.reference import classifier as load_classifier

        classifier = load_classifier()
    rows = []
    for label, pipe in pipes.items():
        latency = statistics.median(timings[label])
        share = accel.summary(pipe).blocks_computed_share
        rows.append({
            "method": label,
            "latency_ms": 1000 * latency,
            "speedup": baseline_latency / latency,
            "psnr_db": psnr(outputs["baseline"], outputs[label]),
            "blocks_computed": share,
            "class_accuracy": classifier.accuracy(outputs[label], model.labels) if classifier else None,
        })
    return rows


def format_table(rows: list[dict], model: ModelSpec, repeats: int) -> str:
    lines = [
        f"model: {model.name} ({'trained reference' if model.trained else 'random weights: plumbing only'}), "
        f"median of {repeats} interleaved runs",
        f"{'method':<24} {'latency ms':>11} {'speedup':>8} {'PSNR dB':>8} {'blocks run':>11} {'class acc':>10}",
    ]
    for row in rows:
        share = "-" if row["blocks_computed"] is None else f"{row['blocks_computed']:.1%}"
        value = "inf" if math.isinf(row["psnr_db"]) else f"{row['psnr_db']:.2f}"
        accuracy = "-" if row["class_accuracy"] is None else f"{row['class_accuracy']:.1%}"
        lines.append(
            f"{row['method']:<24} {row['latency_ms']:>11.1f} {row['speedup']:>7.2f}x {value:>8} {share:>11} "
            f"{accuracy:>10}"
        )
    if len(rows) == 1:
        lines.append("(no accelerator is registered yet: the table shows the baseline alone)")
    return "\n".join(lines)


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
        model = model_spec(args.model, args.steps)
        methods = parse_methods(args.methods)
        for _, names in methods:  # fail before any run
            accel.registry.resolve(names)
    except ValueError as error:
        print(f"accel-run: {error}", file=sys.stderr)
        return 2
    with torch.no_grad():
        rows = compare(model, methods, args.repeats)
    print(format_table(rows, model, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
