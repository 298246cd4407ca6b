"""Data-free distillation of a pruned denoiser from the full one, on the full pipeline's own sampling trajectories."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..trained import collate, detached, load_checkpoint, save_checkpoint
from .analysis import _generator_states, _with_generators
from .surgery import blocks_of

CHECKPOINT_FORMAT = "accel.prune-distillation/1"


@dataclasses.dataclass(frozen=True)
class DistillationSettings:
    """How ``accel.prune`` distils. ``weighting``: ``"inverse"`` scales each trainable block's learning rate by the
    inverse of its sensitivity (the MSE its removal caused in the contribution analysis, normalised to mean 1 and
    clipped to [0.2, 5]): the paper's minimal updates for sensitive blocks; ``"binary"`` trains every unfrozen block
    alike (the authors' release). ``feature_weight`` scales the per-block feature MSE (each block's relative to its
    teacher feature's mean square) against the output MSE."""

    steps: int = 2000
    calls_per_batch: int = 1  # recorded denoiser calls per optimiser step (each a whole CFG batch of one step)
    lr: float = 1e-3  # measured better than 3e-4 on digits-dit (docs/methods/hierarchical_prune.md)
    warmup_steps: int = 50
    feature_weight: float = 0.1
    weighting: str = "inverse"
    seed: int = 0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for name in ("steps", "calls_per_batch", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ValueError(f"distillation {name} must be an integer >= {0 if name == 'steps' else 1}, "
                                 f"got {value!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"distillation lr must be a positive number, got {self.lr!r}.")
        if not (isinstance(self.feature_weight, (int, float)) and self.feature_weight >= 0):
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight!r}.")
        if self.weighting not in ("inverse", "binary"):
            raise ValueError(f"weighting must be 'inverse' (the paper) or 'binary' (the release), "
                             f"got {self.weighting!r}.")


@torch.no_grad()
def record_calls(pipe, model: torch.nn.Module, inputs: list[dict], num_inference_steps: int | None,
                 progress: bool) -> list[tuple[tuple, dict]]:
    """Every call the pipeline makes to ``model`` while sampling ``inputs`` (arguments detached): the states the
    full model's own trajectories visit, which is all the data distillation sees."""
    records: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        records.append((detached(args), detached(kwargs)))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    extra = {"output_type": "np"} | ({} if num_inference_steps is None else
                                      {"num_inference_steps": num_inference_steps})
    try:
        for kwargs in tqdm(inputs, desc="HierarchicalPrune: sampling the full model", disable=not progress):
            pipe(**{**_with_generators(kwargs, _generator_states(kwargs)), **extra})
    finally:
        handle.remove()
    return records


def _sample(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


class _FeatureTap:
    """Keeps each listed block's image- and context-stream outputs of the last forward."""

    def __init__(self, blocks) -> None:
        self.features: dict[int, tuple] = {}
        self.handles = [block.module.register_forward_hook(self._hook(block)) for block in blocks]

    def _hook(self, block):
        def hook(module, args, output):
            self.features[block.index] = block.streams_out(output)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _feature_loss(student: tuple, teacher: tuple) -> torch.Tensor:
    terms = []
    for mine, theirs in zip(student, teacher):
        if mine is None or theirs is None or mine.shape != theirs.shape:
            continue
        scale = theirs.float().pow(2).mean().clamp_min(1e-8)
        terms.append(F.mse_loss(mine.float(), theirs.float()) / scale)
    return sum(terms) if terms else torch.zeros(())


def _fingerprint(settings: DistillationSettings, kept: list[int], zeroed: dict, records: int) -> str:
    text = json.dumps({"settings": dataclasses.asdict(settings), "kept": kept, "zeroed": zeroed,
                       "records": records}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trainable_parameters(student: torch.nn.Module, first_trainable_block: str) -> dict[str, torch.nn.Parameter]:
    """Positional weight preservation: parameters from ``first_trainable_block`` on, in module order; the rest
    stay frozen."""
    trainable, on = {}, False
    for name, param in student.named_parameters():
        on = on or name.startswith(first_trainable_block + ".")
        if on:
            trainable[name] = param
    return trainable


def distill(teacher: torch.nn.Module, student: torch.nn.Module, adapter, records: list[tuple[tuple, dict]],
            kept: list[int], first_trainable: int, lr_scales: dict[int, float], settings: DistillationSettings,
            *, zeroed: dict, checkpoint_dir: str | Path | None, progress: bool) -> dict[str, Any]:
    """Train ``student`` (the pruned copy: its block j is the teacher's block ``kept[j]``) to match ``teacher`` on
    ``records``: output MSE + ``feature_weight`` x relative feature MSE of every trainable block against the
    teacher block it came from. Blocks before position ``first_trainable`` and everything before them stay frozen.
    ``lr_scales`` maps a student block position to its learning-rate scale."""
    started = time.perf_counter()
    student_blocks = blocks_of(student, adapter)
    teacher_blocks = blocks_of(teacher, adapter)
    trainable_blocks = [b for b in student_blocks if b.index >= first_trainable]
    params = trainable_parameters(student, student_blocks[first_trainable].name) if trainable_blocks else \
        trainable_parameters(student, "")
    for p in student.parameters():
        p.requires_grad_(False)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in params.items():
        p.requires_grad_(True)
        block = next((b for b in trainable_blocks if name.startswith(b.name + ".")), None)
        scale = lr_scales.get(block.index, 1.0) if block is not None else 1.0
        groups.setdefault(scale, []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": settings.lr * s, "scale": s} for s, ps in groups.items()],
                                  lr=settings.lr, weight_decay=0.0)
    key = _fingerprint(settings, kept, zeroed, len(records))
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, losses = (0, [])
    if folder is not None:
        start, losses = load_checkpoint(folder, CHECKPOINT_FORMAT, key, params, optimizer, what="distillation",
                                        other="another cut or other settings")
    teacher_tap = _FeatureTap([teacher_blocks[kept[b.index]] for b in trainable_blocks])
    student_tap = _FeatureTap(trainable_blocks)
    # The student stays in eval mode: train mode switches on the models' own regularisers (DiT drops 10% of class
    # labels), which would ask it to match a conditional target from a dropped label.
    student.eval()
    try:
        bar = tqdm(total=settings.steps, initial=start, desc="HierarchicalPrune: distilling", disable=not progress)
        for step in range(start, settings.steps):
            rng = np.random.default_rng([settings.seed, step])
            chosen = rng.choice(len(records), size=min(settings.calls_per_batch, len(records)), replace=False)
            args, kwargs = collate([records[i] for i in chosen])
            factor = min(1.0, (step + 1) / max(1, settings.warmup_steps)) * \
                0.5 * (1 + math.cos(math.pi * step / max(1, settings.steps)))
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * group["scale"] * factor
            with torch.no_grad():
                target = _sample(teacher(*args, **{**kwargs, "return_dict": False}))
            with torch.enable_grad():
                output = _sample(student(*args, **{**kwargs, "return_dict": False}))
                loss = F.mse_loss(output.float(), target.float())
                if settings.feature_weight and trainable_blocks:
                    features = sum(_feature_loss(student_tap.features[b.index],
                                                 teacher_tap.features[kept[b.index]]) for b in trainable_blocks)
                    loss = loss + settings.feature_weight * features / len(trainable_blocks)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                optimizer.step()
            losses.append(round(float(loss.detach()), 6))
            bar.update()
            if folder is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
                save_checkpoint(folder, CHECKPOINT_FORMAT, key, step + 1, params, optimizer, losses)
        bar.close()
    finally:
        teacher_tap.remove()
        student_tap.remove()
        for p in student.parameters():  # as from_pretrained leaves them
            p.requires_grad_(True)
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {"steps": settings.steps, "resumed_from": start,
            "trainable_params": sum(p.numel() for p in params.values()),
            "final_loss": float(np.mean(tail)) if tail else None, "first_loss": losses[0] if losses else None,
            "seconds": round(time.perf_counter() - started, 2), "records": len(records),
            "lr_scales": {str(k): round(v, 4) for k, v in lr_scales.items()}}
