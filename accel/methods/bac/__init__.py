"""BAC: cache each block's branches before their AdaLN gate, on a calibrated per-branch update schedule.

Paper: Ji et al., "BAC: Block-wise Adaptive Caching for Accelerating Diffusion Policy", arXiv 2506.13456.

Every branch of every block (self/joint attention, cross-attention, feed-forward, context feed-forward) is
recomputed only on its own update steps; on the others the branch module returns its last update's output and the
block applies the current step's gate, shift and residual to it. ``accel.calibrate(pipe, "bac", inputs,
num_inference_steps=T)`` picks the update steps from the uncached run (``calibration``: dynamic programming over
each branch's T x T similarity, then the Bubbling Union; ``solvers``: the programs; ``schedule``: the saved file).

Departures from the paper (why, and the measurements: ``docs/methods/bac.md``):
* The cache unit is the branch module; a block whose branches are all reused does not run (its output is rebuilt
  bit-identically from the reused outputs, ``skip_reused_blocks``); the final step always computes
  (``compute_final_step``); similarity is averaged over samples and CFG branches, one schedule serves them all.
* Ours, off by default (the ``"bac-forecast"`` preset turns them on): ``forecast=1`` extrapolates a reused branch
  from its last two updates (TaylorSeer's first-order forecast, arXiv 2503.06923); ``metric="l2"`` /
  ``"sensitivity"`` place the updates by the error of what each reused step returns (in its own units, or by its
  first-order effect on the final sample); ``per_block`` gives a block's branches one schedule; ``share_budget``
  lets the blocks share the updates.
* Without a schedule for the call's step count, the first such call calibrates on its own inputs (``auto``) and
  the schedule is cached on disk per model, weights, scheduler and steps (``cache``); ``calibrate=False`` runs
  evenly spaced updates instead, with a warning.

Measured on the shipped ``digits-dit`` (20 steps, guidance 1.5, 500 samples, 2 CPU threads;
``python benchmarks/caching.py --model digits-dit --steps 20``, ``docs/benchmarks/caching.md``): the paper's
schedule at budget 0.35 runs 2.20x at 30.1 dB PSNR against the uncached output; ``"bac-forecast"`` at budget 0.35
2.60x at 37.2 dB (digit FID 17.3 against the baseline's 18.5), at its preset budget 0.3 2.96x at 33.0 dB.
"""

from accel.registry import register_accelerator

from .auto import apply_bac
from .calibration import calibrate_bac
from .method import METRICS, BACConfig
from .schedule import BACSchedule, branch_names, describe_models

__all__ = ["METRICS", "BACConfig", "BACSchedule", "apply_bac", "branch_names", "calibrate_bac", "describe_models"]

register_accelerator(
    BACConfig,
    apply_bac,
    description="BAC: recompute each block branch only on its calibrated update steps, reuse it before the gate",
    presets={
        "bac-quality": lambda: BACConfig(budget=0.5),
        "bac-fast": lambda: BACConfig(budget=0.3),
        # ours: the forecast, on one schedule per block placed by the forecast's own L2 error (docs/methods/bac.md)
        "bac-forecast": lambda: BACConfig(budget=0.3, forecast=1, metric="l2", per_block=True, share_budget=True,
                                          top_k=0),
    },
    calibrate=calibrate_bac,
)
