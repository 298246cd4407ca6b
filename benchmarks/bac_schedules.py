"""BAC schedule quality: the PSNR each calibration metric reaches at the same budget, on the shipped digits-dit.

    python benchmarks/bac_schedules.py --steps 50 --budgets 0.28 0.3
    python benchmarks/bac_schedules.py --steps 20 --budgets 0.25 0.3 --metrics l2 sensitivity

Every row is BAC with ``forecast=1``, ``per_block``, ``share_budget`` and no Bubbling Union (the ``"bac-forecast"``
setting), calibrated as the caching benchmark does (2 calls of 10 labels, seeds disjoint from the measured ones),
differing only in ``metric``. PSNR is against the uncached output for the same 100 samples (one batch, seed 1000).
Quality only: this prints no timings (the caching benchmark measures speed, interleaved with its baselines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import accel  # noqa: E402
from accel.eval.metrics import output_array, psnr  # noqa: E402
from accel.methods.bac import BACConfig  # noqa: E402
from accel.pipelines import reference  # noqa: E402

MODEL = "digits-dit"
CALIBRATION_SEED = 90_000  # as benchmarks/caching.py


def images(pipe, steps: int, samples: int) -> np.ndarray:
    kwargs = reference.call_kwargs(MODEL, pipe, [i % 10 for i in range(samples)], seed=1000, num_inference_steps=steps)
    return output_array(pipe(**kwargs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.28, 0.3])
    parser.add_argument("--metrics", nargs="+", default=["l2", "sensitivity"], choices=["cosine", "l2", "sensitivity"])
    parser.add_argument("--projections", type=int, default=16)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args(argv)
    baseline = images(reference.load(MODEL), args.steps, args.samples)
    print(f"{MODEL}, {args.steps} steps, {args.samples} samples; PSNR against the uncached output\n")
    print("| budget | " + " | ".join(args.metrics) + " |\n|---:|" + "---:|" * len(args.metrics))
    for budget in args.budgets:
        cells = []
        for metric in args.metrics:
            pipe = reference.load(MODEL)
            calibration = [{key: value for key, value in reference.call_kwargs(
                MODEL, pipe, [(3 * i + 1) % 10 for i in range(10)], seed=CALIBRATION_SEED + call).items()
                if key != "num_inference_steps"} for call in range(2)]
            config = BACConfig(budget=budget, forecast=1, metric=metric, per_block=True,
                               share_budget=metric != "cosine", top_k=0, projections=args.projections)
            accel.wrap_calibrated(pipe, config, calibration, num_inference_steps=args.steps)
            cells.append(f"{psnr(baseline, images(pipe, args.steps, args.samples)):.2f} dB")
        print(f"| {budget} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
