"""What the training scripts share: seeding, EMA, a log that goes to the console and a file, atomic writes."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from accel.io import atomic_write


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def get_logger(name: str, log_file: Path | None) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.propagate = False
    return logger


class EMA:
    """Exponential moving average of a model's parameters, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_param, param in zip(self.model.parameters(), model.parameters()):
            ema_param.lerp_(param.detach(), 1 - decay)


@contextlib.contextmanager
def atomic_directory(target: Path):
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(staging, 0o755)
    try:
        yield staging
        for path in staging.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        backup = target.with_name(f".{target.name}-old")
        if backup.exists():
            shutil.rmtree(backup)
        if target.exists():
            os.replace(target, backup)
        os.replace(staging, target)
        if backup.exists():
            shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def parse_overrides(recipe_class: type, pairs: list[str]) -> dict:
    """``["lr=1e-3", "layers=12"]`` -> typed overrides of a recipe dataclass's fields; unknown names or bad values
    raise ValueError."""
    fields = {field.name: field.type for field in dataclasses.fields(recipe_class)}
    overrides = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or name not in fields:
            raise ValueError(f"Recipe overrides are NAME=VALUE with NAME one of {', '.join(fields)}; got {pair!r}.")
        try:
            if fields[name] == "bool":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                overrides[name] = value.lower() in ("true", "1")
            else:
                overrides[name] = {"int": int, "float": float, "str": str}[fields[name]](value)
        except ValueError as error:
            raise ValueError(f"{name} takes a {fields[name]}, got {value!r}") from error
    return overrides


def learning_rate_factor(recipe, step: int, steps: int) -> float:
    """Multiplier of ``recipe.lr`` at 1-based ``step`` of ``steps``: linear warm-up over ``recipe.warmup_steps``,
    constant, linear decay to 0 over the last ``recipe.decay_steps`` (ending at ``steps``, so a run stopped early by
    time never reaches it)."""
    warm = min(1.0, step / max(recipe.warmup_steps, 1))
    decay = min(1.0, (steps - step + 1) / recipe.decay_steps) if recipe.decay_steps else 1.0
    return max(0.0, min(warm, decay))
