"""HierarchicalPrune: a smaller, faster denoiser from contribution analysis, position-aware block removal and
sensitivity-guided distillation.

Paper: Kwon et al., "HierarchicalPrune: Position-Aware Compression for Large-Scale Diffusion Models", arXiv
2508.04663 (AAAI 2026).

``report = accel.analyze_contributions(pipe, inputs)`` removes each block, and each residual branch of each block
(attention, cross-attention, feed-forward, context feed-forward), one at a time, and scores the samples against the
full model's (PSNR, MSE, and whatever a ``scorer`` adds, class accuracy say); ``report.plot(path)`` draws the
ranking (``analysis``). ``pruned = accel.prune(pipe, report, target, inputs=...)`` removes the least essential
*later* blocks (never the first quarter nor the last ``keep_last``; hierarchical position pruning) from a copy of
the denoiser, freezes everything before the first removed block (positional weight preservation) and distils the
rest from the full model (``distillation``): output MSE + per-block feature MSE, each trainable block's learning
rate scaled by the inverse of its sensitivity. Whole blocks leave the block list and the config's layer count, so
``pruned.save_pretrained(dir)`` writes a plain diffusers folder; removed branches need ``accel.load_pruned``
(``surgery``). ``accel.wrap(pruned, "quest-w4a8", ...)`` adds the paper's 4-bit step.

Departures from the paper (measurements: ``docs/methods/hierarchical_prune.md``):
* Contributions are scored by PSNR against the full model's samples (and class accuracy where a scorer is given),
  not HPSv2 / GenEval; the position prior is explicit (``keep_first``, default a quarter of the blocks).
* The distillation data are the states the full model's own sampling trajectories visit (data-free: no images,
  no task loss), recorded from the pipeline; the paper re-noises teacher samples at random timesteps.
* Sensitivity-guided distillation scales learning rates (the paper's "minimal updates for sensitive blocks");
  ``weighting="binary"`` is the release's frozen / trained split. Feature MSE is relative to the teacher feature's
  mean square, so one weight serves every model scale.
* The 4-bit step is QuEST W4A8 (``accel.wrap``), not bitsandbytes NF4 (that peer is in the quantization benchmark).
"""

from .analysis import ContributionReport, analyze_contributions
from .distillation import DistillationSettings
from .pruning import prune
from .surgery import FAMILIES, ZeroBranch, load_pruned

__all__ = ["FAMILIES", "ContributionReport", "DistillationSettings", "ZeroBranch", "analyze_contributions",
           "load_pruned", "prune"]
