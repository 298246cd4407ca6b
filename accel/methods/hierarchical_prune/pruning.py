"""``accel.prune``: choose the cut from a contribution report, remove it from a copy of the denoiser, distil."""

from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np

from accel.hooks import context_of

from .analysis import ContributionReport, check_inputs
from .distillation import DistillationSettings, distill, record_calls
from .surgery import ZEROED_KEY, Unit, blocks_of, check_reloadable, denoiser_of, remove_units

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_target(target, params: int, bytes_per_param: float) -> tuple[str, float]:
    """("blocks", count) or ("params", the most parameters the pruned denoiser may keep)."""
    if isinstance(target, bool):
        raise ValueError(f"target must be a block count, a parameter share or a memory budget, got {target!r}.")
    if isinstance(target, int):
        if target < 1:
            raise ValueError(f"A block-count target removes >= 1 blocks, got {target}.")
        return "blocks", target
    if isinstance(target, float):
        if not 0 < target < 1:
            raise ValueError(f"A parameter-share target is the share of parameters to keep, in (0, 1); got {target}.")
        return "params", target * params
    if isinstance(target, str):
        match = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]i?b|b)\s*", target.lower())
        if match:
            return "params", float(match.group(1)) * _UNITS[match.group(2)] / bytes_per_param
    raise ValueError(f"target must be an int (blocks to remove), a float in (0, 1) (share of parameters to keep) "
                     f"or a memory budget for the denoiser's weights such as '12MB' / '11.5MiB'; got {target!r}.")


def choose_units(report: ContributionReport, model, adapter, target, *, granularity: str, keep_first: int | None,
                 keep_last: int, selection: str) -> list[Unit]:
    """The units to remove: candidate blocks are those after the first ``keep_first`` and before the last
    ``keep_last``; ``selection="analysis"`` takes them least essential first (highest PSNR after removal in the
    report), ``"last"`` from the end (the no-analysis baseline)."""
    blocks = blocks_of(model, adapter)
    n = len(blocks)
    if report.num_blocks != n or report.model_class != type(model).__name__:
        raise ValueError(f"The report describes a {report.model_class} with {report.num_blocks} blocks; this "
                         f"denoiser is a {type(model).__name__} with {n}. Analyse this pipeline first.")
    keep_first = n // 4 if keep_first is None else keep_first
    candidates = [i for i in range(keep_first, n - keep_last)]
    if selection == "analysis":
        scores = report.scores(None)
        candidates.sort(key=lambda i: (-scores[i], -i))
    elif selection == "last":
        candidates.sort(reverse=True)
    else:
        raise ValueError(f"selection must be 'analysis' or 'last', got {selection!r}.")
    params = sum(p.numel() for p in model.parameters())
    bytes_per_param = next(model.parameters()).element_size()
    kind, amount = _parse_target(target, params, bytes_per_param)
    if kind == "blocks":
        if amount > len(candidates):
            raise ValueError(f"Cannot remove {amount} blocks: only {len(candidates)} of {n} are candidates "
                             f"(keep_first={keep_first}, keep_last={keep_last}).")
        return [Unit(i) for i in candidates[:amount]]
    block_params = {unit["block"]: unit["params"] for unit in report.units if unit["component"] is None}
    chosen, left = [], params
    for index in candidates:
        if left <= amount:
            break
        if granularity == "hybrid" and left - block_params[index] < amount:
            break  # a whole block overshoots the budget: finish with branches
        chosen.append(Unit(index))
        left -= block_params[index]
    if left > amount and granularity == "hybrid":
        removed = {unit.block for unit in chosen}
        branches = [u for u in report.ranking() if u["component"] is not None and u["block"] in candidates
                    and u["block"] not in removed]
        for unit in branches:
            if left <= amount:
                break
            chosen.append(Unit(unit["block"], unit["component"]))
            left -= unit["params"]
    if left > amount:
        raise ValueError(f"Removing every candidate block leaves {left:,} parameters, over the target of "
                         f"{int(amount):,}; lower keep_first / keep_last, use granularity='hybrid' or a looser target."
                         )
    return chosen


def lr_scales(report: ContributionReport, kept: list[int], first_trainable: int, weighting: str) -> dict[int, float]:
    """Student block position -> learning-rate scale: the inverse of the MSE its removal caused, mean 1."""
    positions = range(first_trainable, len(kept))
    if weighting == "binary" or not positions:
        return {j: 1.0 for j in positions}
    mse = {unit["block"]: max(unit["mse"], 1e-12) for unit in report.units if unit["component"] is None}
    inverse = np.array([1.0 / mse[kept[j]] for j in positions])
    scales = np.clip(inverse / inverse.mean(), 0.2, 5.0)
    return {j: float(s) for j, s in zip(positions, scales)}


def prune(pipe, report: ContributionReport, target, *, inputs=None, num_inference_steps: int | None = None,
          granularity: str = "blocks", keep_first: int | None = None, keep_last: int = 1, selection: str = "analysis",
          distill_steps: int | None = 2000, settings: DistillationSettings | None = None,
          checkpoint_dir=None, denoiser: str = "transformer", progress: bool = True):
    """A pruned copy of ``pipe`` (the original is untouched and serves as the teacher). See the package docstring.

    ``target``: an int (blocks to remove), a float (share of the denoiser's parameters to keep) or a memory budget
    string (``"12MB"``, at the weights' current dtype). ``granularity``: ``"blocks"`` or ``"hybrid"`` (whole blocks,
    then branches of the remaining candidate blocks, least essential first, until a parameter budget is met).
    ``inputs``: call kwargs (seeded) whose sampling trajectories are the distillation data; ``distill_steps=0`` or
    ``None`` skips distillation. ``checkpoint_dir`` makes distillation resumable.
    """
    if context_of(pipe) is not None:
        raise ValueError("prune needs the plain pipeline; accel.unwrap(pipe) first.")
    if not isinstance(report, ContributionReport):
        raise ValueError(f"report must be the ContributionReport of accel.analyze_contributions, got "
                         f"{type(report).__name__}.")
    if granularity not in ("blocks", "hybrid"):
        raise ValueError(f"granularity must be 'blocks' or 'hybrid', got {granularity!r}.")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last must be an integer >= 0, got {keep_last!r}.")
    settings = settings or DistillationSettings()
    if distill_steps is not None:
        settings = DistillationSettings(**{**settings.__dict__, "steps": distill_steps})
    if settings.steps and inputs is None:
        raise ValueError("Distillation needs inputs (call kwargs with seeded generators, like calibration inputs); "
                         "pass inputs=... or distill_steps=0 to prune without distilling.")
    teacher, adapter = denoiser_of(pipe, denoiser)
    units = choose_units(report, teacher, adapter, target, granularity=granularity, keep_first=keep_first,
                         keep_last=keep_last, selection=selection)
    n = len(blocks_of(teacher, adapter))
    removed_blocks = sorted(u.block for u in units if u.component is None)
    kept = [i for i in range(n) if i not in removed_blocks]
    first_pruned = min(u.block for u in units)
    first_trainable = kept.index(first_pruned) if first_pruned in kept else \
        sum(1 for i in kept if i < first_pruned)

    student = copy.deepcopy(teacher)
    zeroed = remove_units(student, adapter, units)
    check_reloadable(student)
    if not zeroed and ZEROED_KEY in student.config:
        student._internal_dict = type(student._internal_dict)(
            {k: v for k, v in student.config.items() if k != ZEROED_KEY})
    info: dict[str, Any] = {
        "removed": [u.name for u in units], "kept_blocks": kept, "zeroed_branches": zeroed,
        "selection": selection, "granularity": granularity, "target": target,
        "params_before": sum(p.numel() for p in teacher.parameters()),
        "params_after": sum(p.numel() for p in student.parameters()),
    }
    if settings.steps:
        inputs = check_inputs(inputs, "Distillation")
        if first_trainable >= len(kept):
            raise ValueError("Every kept block precedes the cut, so nothing after it can be trained; keep_last >= 1.")
        records = record_calls(pipe, teacher, inputs, num_inference_steps, progress)
        scales = lr_scales(report, kept, first_trainable, settings.weighting)
        info["distillation"] = distill(teacher, student, adapter, records, kept, first_trainable, scales, settings,
                                       zeroed=zeroed, checkpoint_dir=checkpoint_dir, progress=progress)
        info["distillation"]["settings"] = dict(settings.__dict__)
    student.eval()
    pruned = copy.copy(pipe)
    pruned.register_modules(**{denoiser: student})
    pruned.accel_pruning = info
    return pruned
