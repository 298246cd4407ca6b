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

Presets: "bac" / "bac-fast" / "bac-quality" are ours at budget 0.35 / 0.3 / 0.5; "bac-paper" is the paper's.
Measured on the shipped ``digits-dit`` (20 steps, 16 samples, 2 CPU threads, calibrated on the first call;
``python benchmarks/bac_first_call.py``): "bac" 2.43x (2.32-2.45 over 7 rounds) at 37.7 dB PSNR against the plain
pipeline, "bac-fast" 2.74x at 33.6 dB, "bac-paper" 2.03x at 31.6 dB. With schedules calibrated on other seeds
(500 samples, ``benchmarks/caching.py``, ``docs/benchmarks/caching.md``): ours at 0.35 2.60x at 37.2 dB.
"""

from accel.registry import register_accelerator

from .auto import apply_bac
from .calibration import calibrate_bac
from .method import METRICS, BACConfig
from .schedule import BACSchedule, branch_names, describe_models

__all__ = ["METRICS", "BACConfig", "BACSchedule", "apply_bac", "branch_names", "calibrate_bac", "describe_models"]

def _ours(budget: float) -> BACConfig:
    return BACConfig(budget=budget, forecast=1, metric="l2", per_block=True, share_budget=True, top_k=0)


register_accelerator(
    BACConfig,
    apply_bac,
    description="BAC: recompute each block branch only on its calibrated update steps, reuse it before the gate",
    presets={
        # ours (package docstring): the forecast, on one schedule per block placed by the forecast's own L2 error,
        # the blocks sharing the budget; "bac" is the budget that keeps digits-dit at >= 33 dB (docs/methods/bac.md)
        "bac": lambda: _ours(0.35),
        "bac-fast": lambda: _ours(0.3),
        "bac-forecast": lambda: _ours(0.3),  # the name the 2026-11 benchmarks use for bac-fast
        "bac-quality": lambda: _ours(0.5),
        "bac-paper": lambda: BACConfig(),  # the paper's schedule: cosine similarity per branch, budget 0.4
    },
    calibrate=calibrate_bac,
    role="caching",
    structural=True,
)
