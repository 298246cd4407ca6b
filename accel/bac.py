"""BAC: cache each block's branches before their AdaLN gate, on a calibrated per-branch update schedule.

Paper: Ji et al., "BAC: Block-wise Adaptive Caching for Accelerating Diffusion Policy", arXiv 2506.13456.
Spec: ../shared/design/METHODS.md ("BAC").

What it does, in three lines: every branch of every block (self/joint attention, cross-attention, feed-forward,
context feed-forward) is recomputed only on its own *update steps*; on the other steps the branch module returns
its output from its last update, and the block applies the current step's gate, shift and residual to it.
``accel.calibrate(pipe, "bac", inputs, num_inference_steps=T)`` chooses the update steps: it records every
branch output of the uncached run, builds each branch's T x T cosine-similarity matrix, picks the M update steps
that maximise the similarity between each cached feature and the features it stands in for (dynamic
programming), then applies the Bubbling Union to the k most volatile branches.

Where this implementation departs from the paper, and why:
* The cache unit is the branch *module* (``attn1``, ``attn2``, ``ff``, ``ff_context``; Flux's single-stream
  ``proj_mlp``). Every diffusers block multiplies a branch's output by its gate after the module returns, so
  caching the module's output is caching before the gate.
* A block all of whose branches are reused on a step does not run (``skip_reused_blocks=True``, the default): its
  output is its input plus each reused output under the step's gate, by the family's ``ResidualRule`` in
  ``accel.pipelines.adapters`` (DiT, PixArt, the U-Net's attentions, Wan; other families run the block). Its norms and
  input modulation only feed the branches, yet they are not cheap: on ``digits-dit`` (batch 100, 20 steps) a
  block's norms, modulation and residual adds take 11.7 of its 62.5 ms. The output is bit-identical to running
  the block; the paper's BAC runs it.
* Similarity is averaged over calibration samples (per-sample cosine of the flattened branch output) and over
  CFG branches; one schedule serves every CFG branch, each with its own cache.
* Volatility, for ranking branches in the Bubbling Union, is the *relative* mean L1 change between consecutive
  steps (mean |y_t+1 - y_t| / mean |y_t|), so branches of different scale compare; the paper uses the plain L1
  change of its (single-scale) policy network.
* The final step is always an update (``compute_final_step=True``, the default; ``False`` is the paper's
  schedule): its output is the sample itself, and no later step corrects an error made there. The dynamic program
  then places the other ``M - 1`` updates over steps ``0..T-2``. On the 2026-11 ``digits-dit`` (20 steps, guidance
  1.5, 200 samples, budget 0.35, ``top_k=2``, 36.5% of the branches computed either way) it took the PSNR against
  the uncached output from 31.14 to 33.57 dB with plain reuse and from 33.92 to 37.20 dB with ``forecast=1``.
* Budget ``M = max(1, round(budget * T))`` updates per branch, step 0 always one of them. The Bubbling Union then
  adds steps to the volatile branches, so the share of branches computed is a little above ``budget``;
  ``accel.summary(pipe)`` reports the share actually computed.
* Without a calibrated schedule for the call's step count, BAC uses M evenly spaced update steps and logs a
  warning naming ``accel.calibrate``; ``accel.summary(pipe).extras["bac"]["schedule"]`` says which was used.
* A branch whose input shape differs from that of its cached output (or that has none yet) computes.
* A store copies the new output into the tensor it drops, so the cache holds the same memory all call long; a
  reused output is that tensor, overwritten at the branch's next update. Holding each new output instead made the
  allocator map fresh pages on every step: on ``digits-dit`` (batch 100, 20 steps, budget 0.35; a throw-away
  probe of the same copy, 3 calls per row, one process) it halved the page faults and took BAC from 1.98x to 2.16x,
  and with ``forecast=1`` from 1.82x to 2.13x. The caching benchmark (22 rows in one process) did not repeat the
  gain: its BAC rows read 3-7% below the run before the copy, inside that benchmark's run-to-run noise.
* Calibration runs on copies of the inputs' generators, so the caller's are left as they were and the same inputs
  give the same schedule however often they are used.
* ``forecast=1`` (ours, off by default): a reused branch returns the first-order extrapolation of its last two
  update outputs, ``y_b + (t - b) / (b - a) * (y_b - y_a)``, instead of ``y_b`` (TaylorSeer's first-order
  forecast, Liu et al., arXiv 2503.06923, applied on BAC's per-branch schedule). The schedule is still the one
  the paper's reuse objective picks, unless ``metric="l2"``. Until a branch has two updates it reuses as the paper
  does.
* ``metric="l2"`` (ours, off by default): the dynamic program minimises the summed squared L2 error of what each
  reused step returns under the reuse rule in force, computed from the Gram matrix of the recorded outputs
  (centred on their mean over the steps, which leaves every error unchanged). With ``forecast=1`` its state is the
  last two updates, so it places them where the forecast is accurate, in O(M T^3) time and O(T^3) memory. The
  paper's cosine similarity ignores how much a branch's output grows or shrinks between steps, and its objective
  knows nothing of the forecast.
* ``metric="sensitivity"`` (ours, off by default): the same program, with each reused step's error measured by
  the first-order change it makes to the final sample instead of by its own size. The calibration calls run with
  gradients (through the pipeline's undecorated ``__call__``; the last ``scheduler.step`` output is the final
  sample), and ``projections`` random directions ``v`` of each call's final sample are differentiated back to every
  branch output. With ``g_k`` the gradient of ``<v, sample>`` at step k, an error ``d`` at step k costs
  ``<g_k, d>^2``, whose mean over ``v`` is the squared change ``||J_k d||^2``; the products ``<g_k, y_i>``, summed
  over a sample's CFG rows and a block's branches before squaring, give one Gram matrix per step
  (``sensitivity_gram``), and the program and ``share_budget`` run on it unchanged. Errors that later steps
  correct cost little; errors the sampler carries to the output cost what they do there. Cross terms between
  errors at different steps or blocks are left out. The calibration holds the autograd graph of a whole call: fine
  for the reference models, too much memory for a large model at full batch (calibrate it with small batches).
  On the 2026-11 ``digits-dit`` at 50 steps (``benchmarks/bac_schedules.py``: calibrated on 20 samples as the
  caching benchmark does, PSNR against the uncached output on 100 other samples; 2026-11-30), with ``forecast=1``,
  ``per_block`` and ``share_budget``: 34.54 dB at budget 0.28 and 35.69 dB at 0.3 with 16 projections, against
  33.05 and 33.55 dB for ``metric="l2"``; with 4 projections 33.22 and 34.44 dB (``--projections 4``; the
  estimate is noisy: another draw of 4, in a throw-away probe, gave 35.59 dB at 0.3), hence the default of 16
  (about 2 min of calibration per budget there). The caching
  benchmark (500 samples, 2026-11-30, two runs) read 35.85 dB at 0.3 (2.84x, then 2.81x), 34.80 dB at 0.28 (2.90x,
  3.04x) and 33.48 dB at 0.26 (3.23x, 3.02x), against 33.97 dB at 0.3 and 31.78 dB at 0.25 for the L2 schedule;
  the speeds move by a few percent from run to run. At 20 steps
  it is worse than L2 (the same script, 16 projections): 31.74 against 34.00 dB at 0.25 and 34.96 against 36.82 dB at
  0.3 (28.98 against 28.84 dB at 0.2), so the ``"bac-forecast"`` preset stays on L2. Why it helps at 50 steps and
  not at 20 is not established; a first-order estimate is the less faithful the larger each reused error is. Tried
  and not adopted: the errors of a segment summed before squaring, so a forecast's drift over the steps it
  covers adds up (-0.3 to -0.6 dB against the per-step errors), and a least-squares forecast coefficient per
  reused step instead of ``(t - b) / (b - a)`` (-0.3 to +0.1 dB, with L2 errors), and 50 calibration samples
  instead of 20 with L2 errors (+0.0 to +0.1 dB at 50 steps), and the exact ``J^T J`` in place of random
  projections (the 64 unit directions of ``digits-dit``'s 8x8 sample, every sample at once since samples do not
  interact: 33.80 dB at 0.26 and 34.30 dB at 0.28, against 34.54 dB at 0.28 for 16 random directions, for four
  times the calibration time), so the sampling noise of 16 projections is not what limits the schedule. Also tried
  (2026-12-01, reverted): building six schedules, from all 320 rows of (call, projection, sample) and from five
  bootstrap resamples of them, running BAC with each on the calibration inputs and keeping the one whose final
  samples came closest to the uncached ones. The draw matters (a throw-away probe: 33.67-35.75 dB at 0.28 over six
  draws on ``bac_schedules.py``'s 100 samples), and there the calibration error ranked the draws much as those
  samples did; but in the caching benchmark (500 samples) the kept schedules read 35.27, 34.40 and 33.02 dB at 0.3,
  0.28 and 0.26, against 35.85, 34.80 and 33.48 dB for the all-rows schedule, so choosing on the calibration inputs
  picks schedules that fit those inputs rather than better ones. With ``compute_final_step=False`` the program may
  leave the final step to a forecast: 33.00 and 34.43 dB at 0.26 and 0.28 (``bac_schedules.py``'s samples), below
  the forced final step (34.54 dB at 0.28). Calibrating on four calls of 10 labels instead of two: 33.60 and
  34.89 dB at 0.26 and 0.28 on the caching benchmark's 500 samples, against 33.48 and 34.80 dB.
* ``forecast_gain`` (ours, 1.0 by default): a reused branch takes that share of the forecast's extrapolation, ``y_b +
  gain * (t - b) / (b - a) * (y_b - y_a)``, and the L2 and sensitivity programs place the updates for the same gain.
  On the 2026-11 ``digits-dit`` at 50 steps the full forecast moves the samples away from the real digits in the
  digit classifier's features while it keeps them close to the uncached ones: at budget 0.28 (sensitivity, the
  caching benchmark's 500 samples) 34.80 dB but FID 48.03 against the baseline's 45.24, where plain reuse lowers the
  FID well below the baseline's (26.10-31.78 at 26.50-30.62 dB in the 2026-11-30 run). Damping trades the one for the
  other; on the same samples, with the gain-1 schedule (a throw-away probe, 2026-12-01): gain 0.8 read 33.75 dB and
  FID 40.65, 0.6 31.93 dB and 36.03 (at budget 0.3 with the L2 schedule: 33.97/45.63, 33.33/40.25, 32.22/36.51). The
  gain of the caching benchmark's damped rows, 0.95, was chosen on other seeds (2000-2004, 500 samples, budget 0.28,
  schedules calibrated for each gain): the highest PSNR among the gains whose FID stayed within 5% of that set's
  baseline (43.73, cap 45.91): gain 1.0 read 34.12 dB and FID 47.08, 0.95 34.23 dB and 44.41, 0.9 33.64 dB and 44.50,
  0.85 34.21 dB and 42.21. In the caching benchmark (2026-12-01, its own seeds) gain 0.95 read 35.12 dB, FID 45.28
  and 3.09x at budget 0.28 (gain 1.0: 34.80 dB, 48.03, 2.98x; 28% of the branches run either way, the speed
  difference is timing noise) and 36.08 dB, FID 44.44, 2.86x at 0.3 (gain 1.0: 35.85 dB, 46.00, 2.82x).
* A skipped block multiplies a forecast by its gate in place (the forecast is a tensor made for that step alone;
  a plainly reused output is the cache's own and is never written): the same bits, one pass over memory less per
  branch. On ``digits-dit`` (50 steps, batch 100, budget 0.28, L2 schedule; four calls each, interleaved in one
  process) BAC read 3.18x against 3.11x without it.
* ``per_block=True`` (ours, off by default): every branch of a block shares one schedule, chosen for the sum of
  their objectives, so a block whose branches are reused is skipped whole; per-branch schedules (the paper) leave
  a block running whenever any one of its branches updates.
* ``share_budget=True`` (ours, off by default; needs ``metric="l2"`` or ``"sensitivity"``): the blocks (or
  branches) share the ``M x groups`` updates instead of taking ``M`` each. The program gives every group its least
  error for each count of updates, and a second dynamic program over the groups picks the counts with the least
  summed error. With ``"l2"`` the errors are compared across blocks unweighted, in the units of the branch outputs
  before their gates; with ``"sensitivity"`` in their effect on the final sample.
* Measured on the 2026-11 ``digits-dit`` (200 samples at 20 steps, 100 at 50; calibrated as the caching benchmark
  does; PSNR against the uncached output; throw-away probe), ``forecast=1`` with ``top_k=0`` (the Bubbling Union
  only adds updates, and did not raise the PSNR here):

  - the paper's schedule (cosine, per branch, Bubbling Union k=4), from the caching benchmark's run before
    these (500 samples): 31.81 dB at 0.3 and 30.78 dB at 0.25, 20 steps, with 33.5% and 29.4% of the branches
    computed and more of the blocks (a block runs when any of its branches updates);
  - ``metric="l2"`` and ``per_block``: 35.06 dB at 0.3 and 32.56 dB at 0.25 (20 steps); 33.29 dB at 0.3 and
    30.06 dB at 0.25 (50 steps); the blocks computed are the budget (24% at 0.25 and 50 steps: M = 12 of 50);
  - the same with ``share_budget``: 36.97 and 34.41 dB (20 steps), 33.55 and 31.21 dB (50 steps), with the same
    share of the blocks computed.

  The preset ``"bac-forecast"`` is the last configuration at budget 0.3.
* Tried on the same model and not adopted (throw-away probes on an H200, 100 samples, 20 and 50 steps, budgets
  0.2-0.32): weighting each step's error by the AdaLN gate, in post-gate units (-2.1 to +1.2 dB, mostly lower);
  by the sampler's step in ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` or its square (-3.8 to -17.4 dB: an
  early error is mostly corrected by the later steps); a second-order forecast from the last three updates, on
  this schedule (-0.5 to -1.8 dB) or on its own O(M T^4) program (-1.3 to +1.5 dB, no consistent sign).
  Calibrating on 50 samples instead of 20 moved the PSNR by +0.1 to +1.2 dB.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.hooks import ModelHook

from accel.pipelines.adapters import BlockInfo

from ._io import atomic_write
from .config import AccelConfig, check_bool, check_choice, check_float, check_int
from .hooks import MethodScope
from .registry import register_accelerator

logger = logging.getLogger(__name__)

_BAC_HOOK = "branch"
_BLOCK_HOOK = "block"
_RECORD_HOOK = "record"
SCHEDULE_FORMAT = "accel.bac.schedule/1"
FFN_KINDS = ("ff", "ff_context")
METRICS = {
    "cosine": "cosine similarity of flattened branch outputs, mean over samples and CFG branches",
    "l2": "squared L2 error of each reused output under the reuse rule in force (last update, or the forecast from "
          "the last two), mean over samples, summed over CFG branches",
    "sensitivity": "squared first-order change of the final sample that each reused output's error makes under the "
                   "reuse rule in force, from random projections of the final sample's gradient, summed over "
                   "samples and projections",
}


@dataclasses.dataclass
class BACConfig(AccelConfig):
    """Configuration of BAC (arXiv 2506.13456).

    Args:
        budget: the share of the steps on which each branch is recomputed, ``M = max(1, round(budget * steps))``
            (1.0 computes everything). Used by ``accel.calibrate`` and by the uncalibrated fallback.
        top_k: how many of the most volatile branches get the Bubbling Union (0 turns it off).
        schedule: a calibrated schedule: the path of its JSON file, its ``to_dict()``, or a ``BACSchedule``
            (stored as its dict). ``None``: evenly spaced updates, with a warning.
        forecast: 0 reuses a branch's last update output (the paper); 1 extrapolates linearly from its last two
            updates (see the module docstring).
        forecast_gain: with ``forecast=1``, the share of the linear extrapolation a reused branch takes (ours):
            ``y_b + gain * (t - b) / (b - a) * (y_b - y_a)``. 1.0 is the plain first-order forecast; below 1 damps
            it toward the last update. Calibration places the updates for the forecast with this gain.
        compute_final_step: make the last step an update of every branch (see the module docstring); ``False``
            follows the paper.
        skip_reused_blocks: a block all of whose branches are reused on a step does not run; its output is its
            input plus the reused outputs under the step's gates (see the module docstring). ``False`` runs the
            block's norms and modulation anyway, as the paper does; the output is the same bit for bit.
        metric: what the calibration's dynamic program optimises. ``"cosine"`` (the paper): the summed cosine
            similarity between each update's output and the outputs of the steps that reuse it. ``"l2"`` (ours): the
            summed squared L2 error of what each reused step returns, under the reuse rule in force, so with
            ``forecast=1`` the program places the updates for the forecast (see the module docstring).
            ``"sensitivity"`` (ours): the same errors, each measured by the first-order change it makes to the final
            sample; calibration then runs with gradients, and holds the autograd graph of a whole call.
        per_block: every branch of a block shares one schedule, chosen for the sum of their objectives (ours), so a
            block whose branches are reused is skipped whole (``skip_reused_blocks``); ``False`` gives each branch
            its own, as the paper does.
        share_budget: the groups (blocks with ``per_block``, else branches) share ``M`` updates each among them,
            by least summed error (ours; needs ``metric="l2"`` or ``"sensitivity"``), instead of taking ``M`` each.
        projections: with ``metric="sensitivity"``, how many random projections of each calibration call's final
            sample are differentiated (one backward pass each through the whole sampling run).
    """

    method = "bac"
    budget: float = 0.4
    top_k: int = 4
    schedule: str | dict | None = None
    forecast: int = 0
    forecast_gain: float = 1.0
    compute_final_step: bool = True
    skip_reused_blocks: bool = True
    metric: str = "cosine"
    per_block: bool = False
    share_budget: bool = False
    projections: int = 16

    def validate(self) -> None:
        check_float("budget", self.budget, minimum=0.0, maximum=1.0, open_min=True)
        check_int("top_k", self.top_k, minimum=0)
        check_int("forecast", self.forecast, minimum=0, maximum=1)
        check_float("forecast_gain", self.forecast_gain, minimum=0.0, maximum=2.0, open_min=True)
        if self.forecast_gain != 1.0 and not self.forecast:
            raise ValueError(f"forecast_gain={self.forecast_gain!r} scales the forecast; it needs forecast=1 "
                             "(forecast=0 reuses the last update as it is).")
        check_bool("compute_final_step", self.compute_final_step)
        check_bool("skip_reused_blocks", self.skip_reused_blocks)
        check_bool("per_block", self.per_block)
        check_bool("share_budget", self.share_budget)
        check_choice("metric", self.metric, tuple(METRICS))
        check_int("projections", self.projections, minimum=1)
        if self.share_budget and self.metric == "cosine":
            raise ValueError("share_budget=True compares errors across blocks; it needs metric='l2' or 'sensitivity'.")
        if isinstance(self.schedule, BACSchedule):
            self.schedule = self.schedule.to_dict()
        if isinstance(self.schedule, os.PathLike):
            self.schedule = os.fspath(self.schedule)
        if self.schedule is not None and not isinstance(self.schedule, (str, dict)):
            raise ValueError(
                f"schedule={self.schedule!r} is not accepted; pass a BACSchedule, its to_dict(), the path of its JSON "
                "file, or None."
            )
        if self.schedule is not None:
            self.load_schedule()  # a missing or corrupt schedule fails here, before any pipeline is touched

    def load_schedule(self) -> BACSchedule | None:
        if self.schedule is None:
            return None
        if isinstance(self.schedule, dict):
            return BACSchedule.from_dict(self.schedule)
        return BACSchedule.load(self.schedule)


# --------------------------------------------------------------------------------------------- schedule


def _config_hash(config: Any) -> str:
    public = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    text = json.dumps(public, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_models(denoisers: dict[str, torch.nn.Module], scheduler) -> dict[str, Any]:
    """What a schedule is valid for: each denoiser's class and config hash, and the scheduler's."""
    return {
        "denoisers": {name: {"class": type(model).__name__, "config_hash": _config_hash(model.config)}
                      for name, model in denoisers.items()},
        "scheduler": {"class": type(scheduler).__name__, "config_hash": _config_hash(scheduler.config)},
    }


@dataclasses.dataclass
class BACSchedule:
    """Which steps each branch is recomputed on, for one model, scheduler and step count.

    ``updates`` maps a branch's qualified name (``"transformer.transformer_blocks.3.attn1"``) to its sorted update
    steps. ``metadata`` records what the schedule was calibrated on (see ``accel.calibrate``).
    """

    num_inference_steps: int
    updates: dict[str, list[int]]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int) \
                or self.num_inference_steps < 1:
            raise ValueError(f"A BAC schedule needs num_inference_steps >= 1, got {self.num_inference_steps!r}.")
        if not isinstance(self.updates, dict) or not self.updates:
            raise ValueError("A BAC schedule needs a non-empty mapping of branch names to update steps.")
        for name, steps in self.updates.items():
            if not isinstance(steps, list) or not steps or any(
                isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < self.num_inference_steps for s in steps
            ):
                last = self.num_inference_steps - 1
                raise ValueError(f"BAC schedule entry {name!r} must be a non-empty list of steps in 0..{last}, "
                                 f"got {steps!r}.")
            self.updates[name] = sorted(set(steps))

    @property
    def computed_share(self) -> float:
        """Share of (branch, step) pairs recomputed."""
        return sum(map(len, self.updates.values())) / (len(self.updates) * self.num_inference_steps)

    def to_dict(self) -> dict[str, Any]:
        return {"format": SCHEDULE_FORMAT, "num_inference_steps": self.num_inference_steps,
                "updates": {name: list(steps) for name, steps in self.updates.items()}, "metadata": self.metadata}

    @classmethod
    def from_dict(cls, data: Any) -> BACSchedule:
        if not isinstance(data, dict) or data.get("format") != SCHEDULE_FORMAT:
            raise ValueError(f"Not a BAC schedule: expected a dict with format {SCHEDULE_FORMAT!r}.")
        try:
            return cls(data["num_inference_steps"], dict(data["updates"]), dict(data.get("metadata", {})))
        except (KeyError, TypeError) as error:
            raise ValueError(f"Corrupt BAC schedule: {error!r}.") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the schedule as JSON, atomically (a temporary file renamed over ``path``)."""
        return atomic_write(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BACSchedule:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"No BAC schedule at {path}; make one with accel.calibrate(pipe, 'bac', ...).save(path).")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); recalibrate with accel.calibrate.") from None
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def check_matches(self, scope: MethodScope) -> None:
        """Raise ``ValueError`` unless this schedule was calibrated on this pipeline's model and scheduler."""
        expected = self.metadata.get("models")
        actual = describe_models(scope.denoisers, scope.pipe.scheduler)
        if expected is not None and expected != actual:
            raise ValueError(
                "This BAC schedule was calibrated on a different model or scheduler: "
                f"{json.dumps(expected, sort_keys=True)} vs this pipeline's {json.dumps(actual, sort_keys=True)}. "
                "Recalibrate with accel.calibrate(pipe, 'bac', inputs, num_inference_steps=...)."
            )
        names = set(branch_names(scope))
        missing, extra = sorted(names - set(self.updates)), sorted(set(self.updates) - names)
        if missing or extra:
            raise ValueError(
                f"This BAC schedule does not describe this pipeline's branches (missing {missing[:3]}, unknown "
                f"{extra[:3]}); recalibrate with accel.calibrate."
            )


def branch_names(scope: MethodScope) -> dict[str, tuple[str, int, str, torch.nn.Module]]:
    """Qualified branch name -> (denoiser, block index, branch kind, module), in execution order."""
    names = {}
    for denoiser, blocks in scope.blocks.items():
        for block in blocks:
            for kind, (name, module) in block.branches.items():
                names[f"{denoiser}.{name}"] = (denoiser, block.index, kind, module)
    return names


def update_count(num_steps: int, budget: float) -> int:
    """``M = max(1, round(budget * num_steps))``, at most ``num_steps``."""
    return max(1, min(num_steps, round(budget * num_steps)))


def uniform_updates(num_steps: int, budget: float, final_step: bool = False) -> list[int]:
    """``M`` evenly spaced update steps starting at step 0; with ``final_step`` (and ``M >= 2``) the last of them
    is the final step."""
    count = update_count(num_steps, budget)
    if final_step and count >= 2:
        return sorted({int(step) for step in np.round(np.linspace(0, num_steps - 1, count))})
    return sorted({int(step) for step in np.floor(np.arange(count) * num_steps / count)})


def optimal_updates(similarity: np.ndarray, count: int) -> list[int]:
    """The ``count`` update steps (step 0 among them) that maximise the summed similarity between each update's
    output and the outputs of the steps that reuse it, by dynamic programming in O(count * T^2).

    ``dp[m, j]``: best value with m updates, the last at step j, counting the steps before j;
    ``dp[m, j] = max_i dp[m-1, i] + phi(i, j)`` with ``phi(i, j) = sum_{i<k<j} S[i, k]``; the tail ``phi(j, T)``
    closes the last segment.
    """
    steps = similarity.shape[0]
    count = max(1, min(count, steps))
    prefix = np.cumsum(similarity, axis=1)
    diagonal = prefix[np.arange(steps), np.arange(steps)]

    def segment(j: int) -> np.ndarray:  # phi(i, j) for every i < j
        return prefix[:j, j - 1] - diagonal[:j]

    best = np.full((count + 1, steps), -np.inf)
    parent = np.zeros((count + 1, steps), dtype=int)
    best[1, 0] = 0.0
    for m in range(2, count + 1):
        for j in range(m - 1, steps):
            candidates = best[m - 1, :j] + segment(j)
            parent[m, j] = int(np.argmax(candidates))
            best[m, j] = candidates[parent[m, j]]
    tails = np.array([best[count, j] + (prefix[j, steps - 1] - diagonal[j]) for j in range(steps)])
    last = int(np.argmax(tails))
    chosen = [last]
    for m in range(count, 1, -1):
        chosen.append(int(parent[m, chosen[-1]]))
    return sorted(chosen)


def _inner(gram: np.ndarray, k: np.ndarray):
    """``g(i, j)``: the inner product of steps i and j, under step k's metric when ``gram`` is per step."""
    if gram.ndim == 2:
        return lambda i, j: gram[i, j]
    return lambda i, j: gram[k, i, j]


def reuse_errors(gram: np.ndarray) -> np.ndarray:
    """``E[b, k] = ||y_k - y_b||^2`` for every pair of steps, from the Gram matrix ``gram[i, j] = <y_i, y_j>``, or
    from one Gram matrix per step, ``gram[k, i, j]``, the error at step k measured in step k's metric."""
    b, k = np.meshgrid(*(np.arange(gram.shape[-1]),) * 2, indexing="ij")
    g = _inner(gram, k)
    return g(k, k) + g(b, b) - 2 * g(k, b)


def forecast_errors(gram: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """``F[a, b, k] = ||y_k - (y_b + r (y_b - y_a))||^2`` with ``r = gain * (k - b) / (b - a)`` for ``a < b < k``,
    else 0: the error of the first-order forecast from updates ``a`` and ``b`` at step ``k``, from the Gram matrix
    (or one per step, as in ``reuse_errors``)."""
    steps = gram.shape[-1]
    a, b, k = np.meshgrid(*(np.arange(steps),) * 3, indexing="ij")
    valid = (a < b) & (b < k)
    ratio = np.where(valid, gain * (k - b) / np.where(valid, b - a, 1), 0.0)
    g = _inner(gram, k)
    errors = (g(k, k) + (1 + ratio) ** 2 * g(b, b) + ratio**2 * g(a, a) - 2 * (1 + ratio) * g(k, b)
              + 2 * ratio * g(k, a) - 2 * ratio * (1 + ratio) * g(a, b))
    return np.where(valid, np.maximum(errors, 0.0), 0.0)


def schedule_error(gram: np.ndarray, updates: list[int], forecast: int = 0, gain: float = 1.0) -> float:
    """The summed squared L2 error of what the non-update steps return under ``updates``, from the Gram matrix (or
    one per step)."""
    total = 0.0
    for step in range(gram.shape[-1]):
        earlier = [update for update in updates if update <= step]
        if earlier[-1] == step:
            continue
        weights = {step: 1.0}
        if forecast and len(earlier) >= 2:
            a, b = earlier[-2:]
            ratio = gain * (step - b) / (b - a)
            weights[b], weights[a] = -(1 + ratio), ratio
        else:
            weights[earlier[-1]] = -1.0
        index, weight = list(weights), np.array(list(weights.values()))
        metric = gram if gram.ndim == 2 else gram[step]
        total += float(weight @ metric[np.ix_(index, index)] @ weight)
    return max(total, 0.0)


def sensitivity_gram(products: np.ndarray) -> np.ndarray:
    """One Gram matrix per step for ``metric="sensitivity"``: ``products[n, k, i] = <g_k, y_i>``, the output at step
    i projected on the gradient at step k of one random projection of one sample's final output, gives
    ``gram[k, i, j] = sum_n products[n, k, i] * products[n, k, j]``. An error ``d`` at step k then costs
    ``sum_n <g_k, d>^2``, an estimate of the squared first-order change it makes to the final sample. Centred on the
    mean over i, which leaves every reuse or forecast error unchanged (their weights sum to zero)."""
    centred = products - products.mean(axis=2, keepdims=True)
    return np.einsum("nki,nkj->kij", centred, centred)


def least_error_updates(gram: np.ndarray, count: int, forecast: int = 0, final_step: bool = False,
                        gain: float = 1.0) -> list[int]:
    """The ``count`` update steps (step 0 among them, and the last step with ``final_step``) that minimise the summed
    squared L2 error of what every other step reuses, under the reuse rule in force: the last update's output
    (``forecast=0``), or the first-order forecast from the last two updates (``forecast=1``; the steps before the
    second update reuse the first; ``gain`` scales the forecast's extrapolation). ``gram[i, j]`` is the inner product
    of the branch's outputs at steps i and j.
    """
    if not forecast:  # one program for this count, not one for every count up to it
        steps, count = gram.shape[-1], max(1, min(count, gram.shape[-1]))
        negated = -reuse_errors(gram)
        if final_step and count >= 2:
            return [*optimal_updates(negated[:-1, :-1], count - 1), steps - 1]
        return optimal_updates(negated, count)
    return least_error_schedules(gram, count, forecast, final_step, gain)[-1]


def least_error_schedules(gram: np.ndarray, max_count: int, forecast: int = 0, final_step: bool = False,
                          gain: float = 1.0) -> list[list[int]]:
    """``least_error_updates`` for every count from 1 to ``max_count``, in that order.

    ``forecast=0`` is ``optimal_updates`` on the negated error. ``forecast=1`` is one dynamic program over the last
    two updates, ``f[m+1][b, c] = min_a f[m][a, b] + sum_{b<k<c} F[a, b, k]``, in O(max_count * T^3) time and
    O(T^3) memory.
    """
    steps = gram.shape[-1]
    max_count = max(1, min(max_count, steps))
    if not forecast:
        return [least_error_updates(gram, count, 0, final_step) for count in range(1, max_count + 1)]
    reuse = reuse_errors(gram)
    # segment[a, b, c]: the forecast error of the steps strictly between updates b and c (c = steps: to the end)
    partial = np.cumsum(forecast_errors(gram, gain), axis=2)
    segment = np.concatenate([np.zeros((steps, steps, 1)), partial], axis=2)  # F is 0 for k <= b: sums b < k < c
    # cost[a, b]: the best total over the steps before b, with a and b the last two updates (a < b)
    cost = np.full((steps, steps), np.inf)
    cost[0, 1:] = [reuse[0, 1:b].sum() for b in range(1, steps)]
    schedules, parents = [[0]], []
    for count in range(2, max_count + 1):
        if count > 2:
            totals = cost[:, :, None] + segment[:, :, :steps]  # [a, b, c]
            totals[:, np.tril_indices(steps)[0], np.tril_indices(steps)[1]] = np.inf  # c must follow b
            parent = np.argmin(totals, axis=0)  # [b, c]
            cost = np.take_along_axis(totals, parent[None], axis=0)[0]
            parents.append(parent)
        if final_step:
            chosen = [int(np.argmin(cost[:, steps - 1])), steps - 1]
        else:
            closing = cost + segment[:, :, steps]
            chosen = [int(i) for i in np.unravel_index(np.argmin(closing), closing.shape)]
        for parent in reversed(parents):
            chosen.insert(0, int(parent[chosen[0], chosen[1]]))
        schedules.append(chosen)
    return schedules


def share_updates(errors: list[list[float]], total: int) -> list[int]:
    """How many updates each group gets, 1 to ``len(errors[g])`` each and ``total`` in all, to minimise the summed
    error; ``errors[g][m - 1]`` is group g's least error with m updates. Exact, by dynamic programming over groups."""
    best = {0: (0.0, [])}  # updates used so far -> (error, counts)
    for table in errors:
        step = {}
        for used, (error, counts) in best.items():
            for count, value in enumerate(table, start=1):
                if used + count <= total and (used + count not in step or error + value < step[used + count][0]):
                    step[used + count] = (error + value, [*counts, count])
        best = step
    if total not in best:
        raise ValueError(f"Cannot share {total} updates among {len(errors)} groups.")
    return best[total][1]


def bubbling_union(updates: dict[str, list[int]], volatility: dict[str, float],
                   branches: dict[str, tuple[str, int, str, Any]], top_k: int) -> list[str]:
    """For each of the ``top_k`` most volatile branches, add the update steps of every FFN branch of the same
    denoiser at the same or a deeper block, so it is fresh whenever a downstream FFN recomputes. In place;
    returns the branches it changed, most volatile first."""
    ranked = sorted(volatility, key=lambda name: -volatility[name])[:top_k]
    for name in ranked:
        denoiser, index, _, _ = branches[name]
        merged = set(updates[name])
        for other, (other_denoiser, other_index, kind, _) in branches.items():
            if other_denoiser == denoiser and kind in FFN_KINDS and other_index >= index:
                merged |= set(updates[other])
        updates[name] = sorted(merged)
    return ranked


# --------------------------------------------------------------------------------------------- caching


class BACState:
    """Per-call state: the update steps in force for this call and each branch's cached output."""

    def reset(self) -> None:
        self.updates: dict[str, frozenset[int]] | None = None
        self.stores: dict[str, frozenset[int]] = {}  # update steps whose output a later step reuses
        self.schedule_used: str | None = None
        # (denoiser, CFG branch, branch name) -> (input shape, [(step, output)]: the last one, or two to forecast)
        self.cache: dict[tuple, tuple] = {}


def _input_shape(args: tuple, kwargs: dict) -> tuple:
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    return tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else ()


class BACBranchHook(ModelHook):
    """On each branch module. The decision and the bookkeeping sit in ``torch.compiler.disable`` helpers."""

    def __init__(self, scope: MethodScope, state: BACState, plan: BACPlan, denoiser: str, name: str) -> None:
        super().__init__()
        self.scope, self.state, self.plan, self.denoiser, self.name = scope, state, plan, denoiser, name

    def new_forward(self, module, *args, **kwargs):
        shape = _input_shape(args, kwargs)
        key, reuse = self.lookup(shape)
        if reuse is not None:
            return self.reused_output(reuse)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if key is not None:
            self._store(key, shape, output)
        return output

    @torch.compiler.disable
    def lookup(self, shape: tuple):
        """(cache key or None, None or what ``reused_output`` makes the reused output from) for this forward."""
        info = self.scope.current if self.scope.is_active() else None
        if info is None or info.denoiser != self.denoiser:
            return None, None
        updates = self.plan.updates_for_call(self.state, info.num_steps)
        if updates is None:
            return None, None
        key = (self.denoiser, info.branch, self.name)
        if info.step in updates[self.name]:
            # Keep the output only if a later step reads it: holding tensors nobody reads costs memory and time.
            return (key if info.step in self.state.stores[self.name] else None), None
        stored = self.state.cache.get(key)
        if stored is None or stored[0] != shape:
            return key, None
        return key, (info.step, stored[1])

    def reused_output(self, reuse):
        """The last update's output, or with ``forecast=1`` the extrapolation of the last two."""
        step, history = reuse
        if _forecasts(reuse):
            (earlier, older), (last, newest) = history
            return _extrapolate(older, newest, self.plan.config.forecast_gain * (step - last) / (last - earlier))
        return history[-1][1]

    @torch.compiler.disable
    def _store(self, key, shape: tuple, output) -> None:
        stored = self.state.cache.get(key)
        history = stored[1] if stored is not None and stored[0] == shape else []
        keep = 2 if self.plan.config.forecast else 1
        if len(history) == keep and _same_layout(history[0][1], output):
            # Copy into the tensor this store drops instead of holding a new one: the cache then keeps the same
            # memory all call long. Holding each new output made the allocator map fresh pages step after step.
            output = history[0][1].copy_(output)
        self.state.cache[key] = (shape, [*history, (self.scope.current.step, output)][-keep:])


def _forecasts(reuse) -> bool:
    """Whether ``reused_output`` extrapolates for this reuse (a new tensor) rather than return the held output."""
    return len(reuse[1]) == 2


def _same_layout(held, output) -> bool:
    return (isinstance(held, torch.Tensor) and isinstance(output, torch.Tensor) and held.shape == output.shape
            and held.dtype == output.dtype and held.device == output.device and held.stride() == output.stride())


class BACBlockHook(ModelHook):
    """On each block with a residual rule (``accel.pipelines.adapters.ResidualRule``), when ``skip_reused_blocks``.

    When every branch of the block is reused this step, the block does not run: its output is its input plus each
    reused output under the current step's gate, bit-identical to what the block itself would return. Its norms and
    input modulation only feed the branches, and they are a fifth of a computed block's time on ``digits-dit``.
    """

    def __init__(self, scope: MethodScope, block: BlockInfo, branch_hooks: dict[str, BACBranchHook]) -> None:
        super().__init__()
        self.scope, self.block, self.branch_hooks = scope, block, branch_hooks
        self.rule = block.residual_rule

    def new_forward(self, module, *args, **kwargs):
        reuses = self._reuses(module, args, kwargs)
        if reuses is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        outputs = {kind: self.branch_hooks[kind].reused_output(reuse) for kind, reuse in reuses.items()}
        # a forecast is a tensor made for this step alone (the extrapolation of the last two updates); the rule may
        # gate it in place. A plainly reused output is the cache's own tensor.
        owned = frozenset(kind for kind, reuse in reuses.items() if _forecasts(reuse))
        return self.rule.combine(module, args, kwargs, outputs, owned)

    @torch.compiler.disable
    def _reuses(self, module, args, kwargs) -> dict[str, Any] | None:
        """Each branch's reuse, if every branch of the block is reused this forward and the rule covers it."""
        if not self.scope.is_active() or not self.rule.covers(module, args, kwargs):
            return None
        shape = _input_shape(args, kwargs)
        reuses = {}
        for kind, hook in self.branch_hooks.items():
            _, reuse = hook.lookup(shape)
            if reuse is None:
                return None
            reuses[kind] = reuse
        return reuses


def _extrapolate(older, newest, ratio: float):
    """``newest + ratio * (newest - older)`` for a tensor or each tensor of a tuple (other entries: newest's)."""
    if isinstance(newest, torch.Tensor):
        return torch.lerp(older, newest, 1 + ratio)
    return type(newest)(_extrapolate(a, b, ratio) if isinstance(b, torch.Tensor) else b for a, b in zip(older, newest))


class BACPlan:
    """The update steps of a wrapped pipeline: the calibrated schedule for its step count, else evenly spaced."""

    def __init__(self, scope: MethodScope, config: BACConfig, schedule: BACSchedule | None, names: list[str]) -> None:
        self.scope, self.config, self.schedule, self.names = scope, config, schedule, names

    @torch.compiler.disable
    def updates_for_call(self, state: BACState, num_steps: int | None) -> dict[str, frozenset[int]] | None:
        if state.updates is not None or num_steps is None:
            return state.updates
        if self.schedule is not None and self.schedule.num_inference_steps == num_steps:
            state.updates = {name: frozenset(steps) for name, steps in self.schedule.updates.items()}
            state.schedule_used = "calibrated"
        else:
            steps = frozenset(uniform_updates(num_steps, self.config.budget, self.config.compute_final_step))
            state.updates = {name: steps for name in self.names}
            state.schedule_used = "uniform"
            if self.schedule is not None:
                logger.warning(
                    "BAC: the schedule was calibrated for %d steps but this call runs %d; using %d evenly spaced "
                    "updates per branch instead. Calibrate for %d steps with accel.calibrate(pipe, 'bac', inputs, "
                    "num_inference_steps=%d).", self.schedule.num_inference_steps, num_steps, len(steps), num_steps,
                    num_steps,
                )
        # forecasting reads the last two updates before a reuse, so it keeps every update's output
        state.stores = {
            name: frozenset(steps if self.config.forecast else _steps_reused_after(sorted(steps), num_steps))
            for name, steps in state.updates.items()
        }
        self.scope.extras.update(
            schedule=state.schedule_used, num_inference_steps=num_steps,
            branch_steps_computed_share=sum(map(len, state.updates.values())) / (len(state.updates) * num_steps),
        )
        return state.updates


def _steps_reused_after(updates: list[int], num_steps: int) -> list[int]:
    """The update steps followed by at least one non-update step before the next update (or the end)."""
    following = [*updates[1:], num_steps]
    return [step for step, next_update in zip(updates, following) if next_update > step + 1]


def apply_bac(scope: MethodScope, config: BACConfig) -> None:
    """Install BAC on every branch of every block of the pipeline behind ``scope``."""
    schedule = config.load_schedule()
    branches = branch_names(scope)
    if schedule is not None:
        schedule.check_matches(scope)
        scope.extras.update(calibrated_for_steps=schedule.num_inference_steps, calibration=schedule.metadata)
    else:
        logger.warning(
            "BAC has no calibrated schedule: each branch updates on %.0f%% of the steps, evenly spaced. For the "
            "adaptive schedule run schedule = accel.calibrate(pipe, 'bac', inputs, num_inference_steps=...) and "
            "wrap with schedule=schedule.", 100 * config.budget,
        )
        scope.extras.update(schedule="uniform")
    state = scope.add_state(BACState())
    plan = BACPlan(scope, config, schedule, list(branches))
    hooks_by_block: dict[tuple[str, int], dict[str, BACBranchHook]] = {}
    for name, (denoiser, index, kind, module) in branches.items():
        hook = BACBranchHook(scope, state, plan, denoiser, name)
        scope.register_hook(module, hook, f"{_BAC_HOOK}.{name}")
        hooks_by_block.setdefault((denoiser, index), {})[kind] = hook
    if not config.skip_reused_blocks:
        return
    for denoiser, blocks in scope.blocks.items():
        for block in blocks:
            hooks = hooks_by_block.get((denoiser, block.index))
            # A block hook of a method wrapped before BAC would sit inside this one, and it must see every forward.
            if block.residual_rule is not None and hooks and scope.only_counted(block.module):
                scope.register_hook(block.module, BACBlockHook(scope, block, hooks),
                                    f"{_BLOCK_HOOK}.{denoiser}.{block.name}")


# --------------------------------------------------------------------------------------------- calibration


class _BranchRecorder:
    """Per (branch, CFG branch): each step's output, one flattened fp16 row per sample."""

    def __init__(self) -> None:
        self.outputs: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        self.pending: dict[tuple[str, str], dict[int, torch.Tensor]] = {}

    def record(self, name: str, branch: str, step: int, output) -> None:
        tensors = [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]
        # kept on the CPU: the statistics are NumPy's, and a GPU's memory is the denoiser's
        rows = torch.cat([t.detach().reshape(t.shape[0], -1).to("cpu", torch.float16) for t in tensors], dim=1)
        self.pending.setdefault((name, branch), {})[step] = rows

    def end_call(self) -> None:
        """Append this call's samples (batch rows) to what earlier calls recorded."""
        for key, steps in self.pending.items():
            stored = self.outputs.setdefault(key, {})
            for step, rows in steps.items():
                stored[step] = torch.cat([stored[step], rows]) if step in stored else rows
        self.pending = {}

    def statistics(self, name: str) -> tuple[list[int], np.ndarray, np.ndarray, float]:
        """(steps the branch ran on, cosine-similarity matrix over them, Gram matrix of its outputs centred on their
        mean over the steps, relative L1 volatility), each a mean over samples, summed or averaged over CFG
        branches. Centring leaves every reuse or forecast error unchanged (their weights sum to zero) and keeps the
        errors computed from the Gram matrix clear of cancellation."""
        per_branch = [steps for (other, _), steps in self.outputs.items() if other == name]
        steps = sorted(set().union(*per_branch)) if per_branch else []
        similarity, gram, volatility = np.zeros((len(steps), len(steps))), np.zeros((len(steps), len(steps))), 0.0
        for recorded in per_branch:
            stack = torch.stack([recorded[s].float() for s in steps])  # [T, N, D]
            unit = torch.nn.functional.normalize(stack, dim=2)
            similarity += torch.einsum("ind,jnd->ij", unit, unit).numpy() / unit.shape[1]
            centred = stack - stack.mean(dim=0, keepdim=True)
            gram += torch.einsum("ind,jnd->ij", centred, centred).double().numpy() / stack.shape[1]
            if len(steps) > 1:
                change = (stack[1:] - stack[:-1]).abs().mean(dim=(1, 2))
                volatility += float((change / stack[:-1].abs().mean(dim=(1, 2)).clamp_min(1e-12)).mean())
        count = max(1, len(per_branch))
        return steps, similarity / count, gram, volatility / count


def _tensors(output) -> list[torch.Tensor]:
    return [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]


def _sample_count(output) -> int:
    """How many samples a pipeline call returned (images, or videos)."""
    for attr in ("images", "frames", "videos"):
        value = getattr(output, attr, None)
        if value is not None:
            return len(value)
    raise ValueError(f"metric='sensitivity' cannot tell how many samples {type(output).__name__} holds.")


def _rows(tensors: list, like: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Tensors flattened per batch row and concatenated; a ``None`` (a gradient that does not reach the sample) is
    zeros shaped as its counterpart in ``like``."""
    like = like or tensors
    return torch.cat([(t if t is not None else torch.zeros_like(ref)).detach().reshape(ref.shape[0], -1)
                      for t, ref in zip(tensors, like)], dim=1)


class _SensitivityRecorder:
    """For ``metric="sensitivity"``: runs each calibration call with gradients and keeps, per branch, the outputs
    of every step projected on the gradients of random projections of the final sample (``sensitivity_gram``)."""

    def __init__(self, projections: int) -> None:
        self.projections = projections
        self.live: dict[tuple[str, str], dict[int, Any]] = {}  # (branch, CFG branch) -> step -> output in the graph
        self.products: dict[str, list[np.ndarray]] = {}  # branch -> [samples, T, T] per call and projection

    def record(self, name: str, branch: str, step: int, output) -> None:
        if any(t.requires_grad for t in _tensors(output)):
            self.live.setdefault((name, branch), {})[step] = output

    def run(self, pipe, scope: MethodScope, kwargs: dict, num_inference_steps: int, seed: int) -> None:
        """One calibration call with gradients; its projections are added to ``products``."""
        call = getattr(getattr(type(pipe), "_accel_base_class", type(pipe)).__call__, "__wrapped__", None)
        if call is None:
            raise ValueError(f"metric='sensitivity' runs the pipeline with gradients through the undecorated __call__ "
                             f"of a diffusers pipeline; {type(pipe).__name__}.__call__ wraps none.")
        scheduler, final = pipe.scheduler, []

        def keep_final_sample(output, steps_done: int):
            # the last step's sample is the output: keep it in the graph, hand the pipeline a detached copy
            if steps_done != len(scheduler.timesteps):
                return output
            sample = output[0] if isinstance(output, tuple) else output.prev_sample
            final.append(sample)
            torch.set_grad_enabled(False)  # decoding needs no graph; the enclosing enable_grad restores the mode
            if isinstance(output, tuple):
                return (sample.detach(), *output[1:])
            output.prev_sample = sample.detach()
            return output

        parameters = [p for model in scope.denoisers.values() for p in model.parameters()]
        flags = [p.requires_grad for p in parameters]
        scope.context.step_observers.append(keep_final_sample)
        try:
            for parameter in parameters:  # a frozen model would leave no graph from the branches to the sample
                parameter.requires_grad_(True)
            with torch.enable_grad(), scope.context.pipeline_call():
                output = call(pipe, **kwargs, num_inference_steps=num_inference_steps)
            if not final or not final[-1].requires_grad:
                raise ValueError("metric='sensitivity' found no final sample in the autograd graph: the pipeline's "
                                 "last scheduler.step output does not depend on the denoiser.")
            with torch.enable_grad():
                self._project(final[-1], _sample_count(output), seed)
        finally:
            scope.context.step_observers.remove(keep_final_sample)
            for parameter, flag in zip(parameters, flags):
                parameter.requires_grad_(flag)
            self.live = {}

    def _project(self, final: torch.Tensor, samples: int, seed: int) -> None:
        # key -> each step's output tensors, in step order; the gradients come back in this order
        held = {key: [_tensors(outputs[step]) for step in sorted(outputs)] for key, outputs in self.live.items()}
        tensors = [t for steps in held.values() for ts in steps for t in ts]
        flattened = {}  # key -> [T, rows, D]: every step's output, flattened per batch row
        for key, steps in held.items():
            flattened[key] = torch.stack([_rows(ts) for ts in steps]).cpu().double()
            if flattened[key].shape[1] % samples:
                raise ValueError(f"metric='sensitivity' cannot assign {flattened[key].shape[1]} batch rows to "
                                 f"{samples} samples.")
        for index in range(self.projections):
            generator = torch.Generator().manual_seed(seed * self.projections + index)
            direction = torch.randn(final.shape, generator=generator, dtype=final.dtype).to(final.device)
            grads = iter(torch.autograd.grad((final * direction).sum(), tensors, allow_unused=True,
                                             retain_graph=index < self.projections - 1))
            products: dict[str, np.ndarray] = {}
            for key, steps in held.items():
                g = torch.stack([_rows([next(grads) for _ in ts], like=ts) for ts in steps]).cpu().double()
                y, count = flattened[key], len(steps)
                # row r belongs to sample r % samples (CFG batches stack [uncond; cond] or [cond; uncond])
                product = torch.einsum("krd,ird->rki", g, y).reshape(-1, samples, count, count).sum(0).numpy()
                earlier = products.get(key[0])
                if earlier is not None and earlier.shape != product.shape:
                    raise ValueError(f"metric='sensitivity' needs every CFG branch of {key[0]} on the same steps.")
                products[key[0]] = product if earlier is None else earlier + product
            for name, product in products.items():
                self.products.setdefault(name, []).append(product)

    def gram(self, names: list[str]) -> np.ndarray:
        """``sensitivity_gram`` of a group of branches: their projected errors add up before they are squared.
        Rows of ``products[name]`` are (call, projection, sample) in the same order for every branch."""
        return sensitivity_gram(sum(np.concatenate(self.products[name]) for name in names))


class _RecordHook(ModelHook):
    def __init__(self, scope: MethodScope, recorders: list, denoiser: str, name: str) -> None:
        super().__init__()
        self.scope, self.recorders, self.denoiser, self.name = scope, recorders, denoiser, name

    def post_forward(self, module, output):
        info = self.scope.current if self.scope.is_active() else None
        if info is not None and info.denoiser == self.denoiser:
            for recorder in self.recorders:
                recorder.record(self.name, info.branch, info.step, output)
        return output


def _check_inputs(inputs, num_inference_steps) -> list[dict]:
    if isinstance(inputs, dict):
        inputs = [inputs]
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else None
    if not inputs or not all(isinstance(kwargs, dict) for kwargs in inputs):
        raise ValueError("inputs must be a dict of pipeline call arguments or a non-empty list of them.")
    if any("num_inference_steps" in kwargs for kwargs in inputs):
        raise ValueError("Pass num_inference_steps to calibrate itself, not inside inputs.")
    check_int("num_inference_steps", num_inference_steps, minimum=1)
    return inputs


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(generator.device)
    copy.set_state(generator.get_state())
    return copy


def _with_generator_copies(kwargs: dict) -> dict:
    """``kwargs`` with each ``generator`` replaced by a copy in the same state. Calibration leaves the caller's
    generators untouched, so the same inputs give the same schedule however often they are used."""
    generator = kwargs.get("generator")
    if isinstance(generator, torch.Generator):
        return {**kwargs, "generator": _copy_generator(generator)}
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        return {**kwargs, "generator": [_copy_generator(g) for g in generator]}
    return kwargs


def _schedule_groups(branches: dict[str, tuple], statistics: dict[str, tuple], per_block: bool) -> list[list[str]]:
    """The branches that share one schedule: each alone, or with ``per_block`` every branch of a block that ran on
    the same steps."""
    if not per_block:
        return [[name] for name in branches]
    groups: dict[tuple, list[str]] = {}
    for name, (denoiser, index, _, _) in branches.items():
        groups.setdefault((denoiser, index, tuple(statistics[name][0])), []).append(name)
    return list(groups.values())


def _shared_schedules(groups: list[list[str]], statistics: dict[str, tuple], count: int, config: BACConfig,
                      group_gram: Callable[[list[str]], np.ndarray]) -> list[list[int]]:
    """Each group's update steps (indices into the steps it ran on) under ``share_budget``: the counts with the least
    summed error for the same total as without sharing (``count`` per group, fewer for a group that ran on fewer
    steps), each group at most twice ``count``. ``group_gram(group)`` is the Gram matrix the errors come from."""
    tables, errors, total = [], [], 0
    for group in groups:
        steps = statistics[group[0]][0]
        gram = group_gram(group) if steps else np.zeros((1, 1))
        final_step = config.compute_final_step and len(steps) >= 2
        size = gram.shape[-1]
        tables.append(least_error_schedules(gram, min(size, 2 * count), config.forecast, final_step,
                                            config.forecast_gain))
        errors.append([schedule_error(gram, updates, config.forecast, config.forecast_gain)
                       for updates in tables[-1]])
        total += min(count, size)
    return [table[group_count - 1] for table, group_count in zip(tables, share_updates(errors, total))]


def calibrate_bac(pipe, config: BACConfig, inputs: Iterable[dict], *, num_inference_steps: int,
                  progress: bool = True) -> BACSchedule:
    """Run the pipeline uncached on ``inputs`` and build the BAC schedule (see ``accel.calibrate``)."""
    from tqdm.auto import tqdm

    from .api import temporary_scope

    inputs = _check_inputs(inputs, num_inference_steps)
    recorder = _BranchRecorder()
    sensitivity = _SensitivityRecorder(config.projections) if config.metric == "sensitivity" else None
    recorders = [recorder] if sensitivity is None else [recorder, sensitivity]
    branches: dict[str, tuple] = {}

    def install(scope: MethodScope) -> None:
        if any(other.name == BACConfig.method for other in scope.context.scopes):
            raise ValueError("This pipeline is already wrapped with BAC; calibrate it unwrapped (accel.unwrap).")
        branches.update(branch_names(scope))
        for name, (denoiser, _, _, module) in branches.items():
            scope.register_hook(module, _RecordHook(scope, recorders, denoiser, name), f"{_RECORD_HOOK}.{name}")

    with temporary_scope(pipe, "bac-calibration", install) as scope:
        models = describe_models(scope.denoisers, pipe.scheduler)
        for index, kwargs in enumerate(tqdm(inputs, desc="BAC calibration", disable=not progress)):
            if sensitivity is None:
                pipe(**_with_generator_copies(kwargs), num_inference_steps=num_inference_steps)
            else:
                sensitivity.run(pipe, scope, _with_generator_copies(kwargs), num_inference_steps, seed=index)
            recorder.end_call()

    count = update_count(num_inference_steps, config.budget)
    statistics = {name: recorder.statistics(name) for name in branches}
    volatility = {name: stats[3] for name, stats in statistics.items()}
    groups = _schedule_groups(branches, statistics, config.per_block)

    def group_gram(group: list[str]) -> np.ndarray:
        if sensitivity is not None:
            return sensitivity.gram(group)
        return sum(statistics[name][2] for name in group)

    # share_budget: each group's schedule comes out of the tables the sharing already computed
    shared = _shared_schedules(groups, statistics, count, config, group_gram) if config.share_budget else None
    updates = {}
    for index, group in enumerate(groups):
        steps = statistics[group[0]][0]
        if not steps:  # a branch that never ran (an expert outside its steps): never needed, keep step 0
            updates.update({name: [0] for name in group})
            continue
        final_step = config.compute_final_step and len(steps) >= 2
        if shared is not None:
            chosen = shared[index]
        elif config.metric in ("l2", "sensitivity"):
            chosen = least_error_updates(group_gram(group), count, config.forecast, final_step,
                                         config.forecast_gain)
        else:
            similarity = sum(statistics[name][1] for name in group)
            if final_step and count >= 2:
                # the final step is fixed: the program places the other updates over the steps before it
                chosen = [*optimal_updates(similarity[:-1, :-1], count - 1), len(steps) - 1]
            else:
                chosen = optimal_updates(similarity, count)
        updates.update({name: [steps[i] for i in chosen] for name in group})
    bubbled = bubbling_union(updates, volatility, branches, config.top_k)
    first = next(iter(recorder.outputs.values()), {})
    samples = next(iter(first.values())).shape[0] if first else 0
    metadata = {
        "models": models,
        "num_inference_steps": num_inference_steps,
        "budget": config.budget,
        "updates_per_branch": count,
        "final_step_computed": config.compute_final_step,
        "forecast": config.forecast,
        **({"forecast_gain": config.forecast_gain} if config.forecast else {}),
        "top_k": config.top_k,
        "per_block": config.per_block,
        "share_budget": config.share_budget,
        "metric": METRICS[config.metric],
        **({"projections": config.projections} if sensitivity is not None else {}),
        "volatility": "relative mean L1 change between consecutive steps",
        "bubbled_branches": bubbled,
        "calibration_calls": len(inputs),
        "samples_per_cfg_branch": samples,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return BACSchedule(num_inference_steps, updates, metadata)


register_accelerator(
    BACConfig,
    apply_bac,
    description="BAC: recompute each block branch only on its calibrated update steps, reuse it before the gate",
    presets={
        "bac-quality": lambda: BACConfig(budget=0.5),
        "bac-fast": lambda: BACConfig(budget=0.3),
        # ours: the forecast, on one schedule per block placed by the forecast's own L2 error (module docstring)
        "bac-forecast": lambda: BACConfig(budget=0.3, forecast=1, metric="l2", per_block=True, share_budget=True,
                                          top_k=0),
    },
    calibrate=calibrate_bac,
)
