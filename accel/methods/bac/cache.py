"""BAC's on-disk schedule cache: a schedule calibrated automatically on a call is kept per (model, weights,
scheduler, step count, calibration settings), so the next process with the same model reuses it.

The folder is ``$ACCEL_CACHE_DIR/bac``, else ``$XDG_CACHE_HOME/accel/bac``, else ``~/.cache/accel/bac``. Entries are
schedule JSON files written atomically; one that cannot be read, or that does not fit the pipeline, is recalibrated
and replaced. The weights enter the key as a fingerprint: per tensor its name, shape, dtype, float64 sum and an
evenly strided sample of its values, so a fine-tune or a LoRA fused into the weights gets its own schedule without
hashing every byte of a large model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from accel.io import atomic_write

from .schedule import BACSchedule, describe_models

if TYPE_CHECKING:
    from accel.hooks import MethodScope

    from .method import BACConfig

logger = logging.getLogger("accel.methods.bac")

CACHE_FORMAT = "accel.bac.cache/1"
SAMPLED_VALUES = 256
# the config fields that change a calibrated schedule (skip_reused_blocks changes only how a schedule is run)
SCHEDULE_FIELDS = ("budget", "top_k", "forecast", "forecast_gain", "compute_final_step", "metric", "per_block",
                   "share_budget", "projections")


def cache_dir() -> Path:
    """Where automatically calibrated schedules are kept (see the module docstring)."""
    root = os.environ.get("ACCEL_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "accel"
    return Path(root) / "bac"


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A digest of ``model``'s parameters and buffers (module docstring)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLED_VALUES)
        sample = flat[::stride][:SAMPLED_VALUES].to("cpu", torch.float64)
        total = float(flat.to(torch.float64).sum())
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total!r}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


def schedule_key(scope: MethodScope, config: BACConfig, num_inference_steps: int) -> str:
    """The cache key of the schedule ``config`` calibrates for this pipeline at ``num_inference_steps``."""
    description = {
        "format": CACHE_FORMAT,
        "pipeline": type(scope.pipe).__name__,
        "family": scope.family,
        "models": describe_models(scope.denoisers, scope.pipe.scheduler),
        "weights": {name: weights_fingerprint(model) for name, model in scope.denoisers.items()},
        "num_inference_steps": num_inference_steps,
        "config": {field: getattr(config, field) for field in SCHEDULE_FIELDS},
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(key: str, scope: MethodScope) -> BACSchedule | None:
    """The cached schedule under ``key`` if there is a readable one that fits this pipeline, else ``None``."""
    path = cache_dir() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        schedule = BACSchedule.load(path)
        schedule.check_matches(scope)
    except ValueError as error:
        logger.warning("BAC: ignoring the cached schedule %s (%s); recalibrating.", path, error)
        return None
    return schedule


def store(key: str, schedule: BACSchedule) -> Path | None:
    """Write ``schedule`` under ``key`` (atomically); a folder that cannot be written is reported, not fatal."""
    path = cache_dir() / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, json.dumps(schedule.to_dict(), indent=1))
    except OSError as error:
        logger.warning("BAC: could not cache the schedule in %s (%s); it is kept for this pipeline only.",
                       path.parent, error)
        return None
