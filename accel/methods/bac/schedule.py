"""The BAC schedule: which steps each branch is recomputed on, for one model, scheduler and step count; saved as
JSON with what it was calibrated on, and refused (``ValueError``) on another model or scheduler."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from accel.io import atomic_write

if TYPE_CHECKING:
    from accel.hooks import MethodScope


SCHEDULE_FORMAT = "accel.bac.schedule/1"


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
        missing = [key for key in ("num_inference_steps", "updates") if key not in data]
        if missing:
            raise ValueError(f"Corrupt BAC schedule: no {' or '.join(map(repr, missing))} field.")
        for key, kind in (("updates", "a mapping of branch names to lists of update steps"),
                          ("metadata", "a mapping")):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"Corrupt BAC schedule: {key!r} must be {kind}, got {data[key]!r:.60}.")
        return cls(data["num_inference_steps"], dict(data["updates"]), dict(data.get("metadata", {})))

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


    def check_scheduler(self, scheduler) -> None:
        """Raise ``ValueError`` unless ``scheduler`` is the class and config this schedule was calibrated with (it
        can be swapped on a wrapped pipeline; BAC checks at the start of every call)."""
        expected = self.metadata.get("models", {}).get("scheduler")
        actual = describe_models({}, scheduler)["scheduler"]
        if expected is not None and expected != actual:
            raise ValueError(
                f"The pipeline's scheduler ({actual['class']}, config {actual['config_hash']}) is not the one this "
                f"BAC schedule was calibrated with ({expected['class']}, config {expected['config_hash']}): it was "
                "swapped after accel.wrap. Recalibrate for it with accel.calibrate, or restore the scheduler."
            )


def branch_names(scope: MethodScope) -> dict[str, tuple[str, int, str, torch.nn.Module]]:
    """Qualified branch name -> (denoiser, block index, branch kind, module), in execution order."""
    names = {}
    for denoiser, blocks in scope.blocks.items():
        for block in blocks:
            for kind, (name, module) in block.branches.items():
                names[f"{denoiser}.{name}"] = (denoiser, block.index, kind, module)
    return names
