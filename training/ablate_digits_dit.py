"""Score a digits-dit checkpoint over steps x guidance, optionally with its sampler changed: the measurements
behind the model card's "what caused the faults" section.

    python -m training.ablate_digits_dit FOLDER [--samples 300] [--grid 20:1.5,50:1.5,20:4,50:4]
                                         [--set clip_sample=false ...]

FOLDER is a checkpoint in diffusers layout (``training.train_digits_dit --out FOLDER``, or an older one from git:
``git archive <commit> accel/pipelines/reference_models/digits-dit | tar -x -C /tmp``). ``--set`` overrides fields
of the saved ``DDIMScheduler`` config. Prints one JSON line per cell: class accuracy, FID in the digit classifier's
feature space against the held-out digits, and the share of pixels within 0.02 of black or white (saturation).
Seeds 1000+ (batch index), as the model card's samples.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from diffusers import DDIMScheduler

from accel.eval.metrics import digit_fid, output_array
from accel.pipelines import reference
from accel.pipelines.digits import split


def parse_grid(text: str) -> list[tuple[int, float]]:
    cells = []
    for cell in text.split(","):
        steps, _, guidance = cell.partition(":")
        try:
            cells.append((int(steps), float(guidance)))
        except ValueError as error:
            raise ValueError(f"--grid takes STEPS:GUIDANCE pairs separated by commas, got {cell!r}") from error
    return cells


def parse_scheduler_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator:
            raise ValueError(f"--set takes NAME=VALUE, got {pair!r}")
        overrides[name] = json.loads(value.lower()) if value.lower() in ("true", "false") else json.loads(value)
    return overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--batch", type=int, default=150)
    parser.add_argument("--grid", default="20:1.5,50:1.5,20:4,50:4")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    try:
        grid, overrides = parse_grid(args.grid), parse_scheduler_overrides(args.overrides)
    except ValueError as error:
        parser.error(str(error))
    pipe, judge, held_out = reference.load(args.folder), reference.classifier(), split()["held_out"].images
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, **overrides})
    labels = [label for label in range(10) for _ in range(args.samples // 10)]
    for steps, guidance in grid:
        started, batches = time.time(), []
        for index, start in enumerate(range(0, len(labels), args.batch)):
            batches.append(output_array(pipe(class_labels=labels[start : start + args.batch],
                                             num_inference_steps=steps, guidance_scale=guidance,
                                             generator=torch.Generator().manual_seed(1000 + index),
                                             output_type="np")))
        images = np.concatenate(batches)
        print(json.dumps({
            "folder": str(args.folder), "scheduler": overrides, "steps": steps, "guidance": guidance,
            "samples": len(labels), "class_accuracy": round(judge.accuracy(images, labels), 3),
            "fid": round(digit_fid(judge, images, held_out), 2),
            "saturated": round(float(((images < 0.02) | (images > 0.98)).mean()), 3),
            "seconds": round(time.time() - started),
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
