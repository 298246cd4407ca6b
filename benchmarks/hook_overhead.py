"""Hook overhead: a reference model with accel applied but nothing skipped, against the plain pipeline.

    python benchmarks/hook_overhead.py [--model digits-dit|moving-digits] [--repeats 5] [--batch 50] [--steps 20]

Rows (each its own pipeline instance, same seeds, interleaved with the order rotating every repeat, one warm-up
call each): plain; ``accel.wrap(pipe, [])`` (step tracking and counters only); BAC with budget 1.0; Δ-DiT with
interval 1; both stacked. Prints the median over repeats of plain seconds / row seconds for the same repeat.
The process keeps the memory it frees, as in ``benchmarks/caching.py`` (``--default-allocator`` to leave glibc's
defaults).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accel  # noqa: E402
from accel.eval.allocator import timing_allocator  # noqa: E402
from accel.methods.bac import BACConfig  # noqa: E402
from accel.methods.delta_dit import DeltaDiTConfig  # noqa: E402
from accel.pipelines import reference  # noqa: E402

ROWS = {
    "plain": None,
    "accel.wrap(pipe, [])": [],
    "BAC budget 1.0": [BACConfig(budget=1.0)],
    "Δ-DiT interval 1": [DeltaDiTConfig(interval=1)],
    "BAC 1.0 + Δ-DiT interval 1": [BACConfig(budget=1.0), DeltaDiTConfig(interval=1)],
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not accepted; give a whole number of 1 or more")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=reference.MODELS, default="digits-dit")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--batch", type=positive_int, default=None, help="default 50 images / 5 clips")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--default-allocator", action="store_true", help="leave glibc's malloc thresholds alone")
    args = parser.parse_args(argv)
    allocator = timing_allocator(keep_defaults=args.default_allocator)
    batch = args.batch if args.batch is not None else (50 if args.model == "digits-dit" else 5)
    labels = [i % 10 for i in range(batch)]
    pipes = {}
    for name, configs in ROWS.items():
        pipe = reference.load(args.model)
        pipes[name] = pipe if configs is None else accel.wrap(pipe, configs)
    seconds: dict[str, list[float]] = {name: [] for name in ROWS}
    names = list(ROWS)
    with torch.no_grad():
        for repeat in range(args.repeats + 1):
            order = names[repeat % len(names):] + names[: repeat % len(names)]
            for name in order:
                kwargs = reference.call_kwargs(args.model, pipes[name], labels, seed=repeat,
                                               num_inference_steps=args.steps)
                started = time.perf_counter()
                pipes[name](**kwargs)
                if repeat:  # the first round warms up
                    seconds[name].append(time.perf_counter() - started)
    print(f"{args.model}, batch {batch}, {args.steps} steps, median of {args.repeats} interleaved repeats, "
          f"allocator: {allocator}")
    for name in names:
        ratio = statistics.median(p / r for p, r in zip(seconds["plain"], seconds[name]))
        print(f"{name:<28} {statistics.median(seconds[name]):7.3f} s   speed vs plain {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
