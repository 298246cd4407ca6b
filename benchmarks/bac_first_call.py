"""The line users copy, measured: ``accel.wrap(reference.load("digits-dit"), "bac")`` against the plain pipeline.

    python benchmarks/bac_first_call.py                       # digits-dit, 20 steps, 16 samples, 7 rounds
    python benchmarks/bac_first_call.py --presets bac,bac-paper --rounds 9

For each preset a fresh pipeline is wrapped with no schedule and an empty schedule cache (a temporary
``ACCEL_CACHE_DIR``), so its first call calibrates on that call's inputs; the first call's time is reported on its
own. Then the plain pipeline and every wrapped one are timed on the same call (same labels, same seed) in
interleaved rounds after one untimed warm-up round (``accel.eval.timing``): the speedup is the median of the
per-round ratios with their min–max (IQR from 8 rounds). PSNR (dB, over all pixels) and class accuracy are of that
same call's output against the plain pipeline's. Prints a Markdown table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import accel
from accel.eval.allocator import retain_freed_memory
from accel.eval.metrics import output_array, psnr
from accel.eval.timing import Speedup, interleaved_timings
from accel.io import atomic_write
from accel.pipelines import reference


def measure(presets: list[str], *, steps: int, samples: int, rounds: int, seed: int) -> dict:
    labels = [i % 10 for i in range(samples)]
    plain = reference.load("digits-dit")
    classifier = reference.classifier()

    def call(pipe):
        return lambda: output_array(pipe(**reference.call_kwargs("digits-dit", pipe, labels, seed=seed,
                                                                  num_inference_steps=steps)))

    pipes, first_call_s = {"baseline": plain}, {}
    for preset in presets:
        pipe = accel.wrap(reference.load("digits-dit"), preset)
        started = time.perf_counter()
        call(pipe)()  # calibrates on this call's inputs, then runs it
        first_call_s[preset] = time.perf_counter() - started
        if accel.summary(pipe).extras["bac"].get("schedule") != "calibrated":
            raise RuntimeError(f"{preset}: the first call did not calibrate")
        pipes[preset] = pipe
    outputs = {}
    times = interleaved_timings({label: call(pipe) for label, pipe in pipes.items()}, rounds, warmup=1,
                                keep=outputs.__setitem__,
                                on_round=lambda done, total: print(f"round {done}/{total}", file=sys.stderr))
    rows = []
    for label, pipe in pipes.items():
        speedup = Speedup.from_times(times["baseline"], times[label])
        rows.append({
            "method": label,
            "first_call_s": first_call_s.get(label),
            "median_s": sorted(times[label])[len(times[label]) // 2],
            "speedup": speedup.to_dict(),
            "psnr_db": psnr(outputs["baseline"], outputs[label]),
            "class_accuracy": classifier.accuracy(outputs[label], labels),
            "branches_computed": accel.summary(pipe).branches_computed_share if label != "baseline" else 1.0,
        })
    return {"model": "digits-dit", "steps": steps, "samples": samples, "rounds": rounds, "seed": seed,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(), "rows": rows}


def table(result: dict) -> str:
    lines = [f"digits-dit, {result['steps']} steps, {result['samples']} samples per call, {result['rounds']} "
             f"interleaved rounds after a warm-up, {result['threads']} threads",
             "", "| method | first call s | s per call | speedup (spread) | PSNR dB | class acc | branches run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        speedup = Speedup(**{k: row["speedup"][k] for k in ("median", "low", "high")},
                          kind=row["speedup"]["spread"], count=row["speedup"]["n"])
        first = "-" if row["first_call_s"] is None else f"{row['first_call_s']:.2f}"
        described = "reference" if row["method"] == "baseline" else speedup.describe()
        value = "inf" if math.isinf(row["psnr_db"]) else f"{row['psnr_db']:.2f}"
        lines.append(f"| {row['method']} | {first} | {row['median_s']:.3f} | {described} | {value} | "
                     f"{row['class_accuracy']:.1%} | {row['branches_computed']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="bac,bac-fast,bac-quality,bac-paper")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    retain_freed_memory()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["ACCEL_CACHE_DIR"] = folder  # every preset calibrates on its first call
        result = measure(args.presets.split(","), steps=args.steps, samples=args.samples, rounds=args.rounds,
                         seed=args.seed)
    print(table(result))
    if args.json is not None:
        for row in result["rows"]:
            row["psnr_db"] = None if math.isinf(row["psnr_db"]) else row["psnr_db"]
        atomic_write(args.json, json.dumps(result, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
