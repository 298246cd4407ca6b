"""Contribution analysis: how much the pipeline's samples change when one block or one block branch is removed."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from accel.hooks import context_of
from accel.io import atomic_write

from .surgery import Unit, all_units, blocks_of, denoiser_of, zero_branch

REPORT_FORMAT = "accel.contributions/1"
Scorer = Callable[[list[np.ndarray]], dict[str, float]]


@dataclass
class ContributionReport:
    """Per-unit scores from ``analyze_contributions``: ``units`` holds one dict per unit (``name``, ``block``,
    ``component``, ``params``, ``psnr_db`` and ``mse`` against the full model's samples, and the scorer's figures);
    ``full`` the full model's own scorer figures. A higher PSNR after removal means a less essential unit."""

    family: str
    model_class: str
    num_blocks: int
    units: list[dict[str, Any]]
    full: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def scores(self, component: str | None = None, *, blocks_only: bool = True) -> dict[int, float]:
        """Block index -> PSNR after removing that block (``component=None``) or that block's ``component``."""
        return {unit["block"]: unit["psnr_db"] for unit in self.units
                if unit["component"] == component or (not blocks_only and component is None)}

    def ranking(self, *, components: bool = True) -> list[dict[str, Any]]:
        """Units from least to most essential (highest PSNR after removal first)."""
        units = [unit for unit in self.units if components or unit["component"] is None]
        return sorted(units, key=lambda unit: (-unit["psnr_db"], unit["block"], unit["component"] or ""))

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "family": self.family, "model_class": self.model_class,
                "num_blocks": self.num_blocks, "units": self.units, "full": self.full, "metadata": self.metadata}

    def save(self, path: str | Path) -> Path:
        return atomic_write(path, json.dumps(self.to_dict(), indent=1, default=float) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ContributionReport:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable contribution report ({error}).") from None
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            raise ValueError(f"{path} is not a contribution report (format {REPORT_FORMAT!r}).")
        return cls(data["family"], data["model_class"], data["num_blocks"], data["units"], data.get("full", {}),
                   data.get("metadata", {}))

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """A bar chart: PSNR after removing each block, and each branch kind per block, by position."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kinds = [None, *sorted({u["component"] for u in self.units if u["component"] is not None})]
        width = 0.8 / len(kinds)
        figure, axis = plt.subplots(figsize=(max(6.0, 0.55 * self.num_blocks + 2), 3.6))
        for offset, kind in enumerate(kinds):
            scores = self.scores(kind)
            blocks = sorted(scores)
            axis.bar([b + (offset - (len(kinds) - 1) / 2) * width for b in blocks], [scores[b] for b in blocks],
                     width=width, label="whole block" if kind is None else kind)
        axis.set_xlabel("block (execution order)")
        axis.set_ylabel("PSNR vs full model after removal (dB)\nhigher = less essential")
        axis.set_xticks(range(self.num_blocks))
        axis.legend(fontsize=8, ncol=len(kinds))
        axis.set_title(title or f"Contribution analysis: {self.model_class}")
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
        figure.savefig(temporary, dpi=110)
        plt.close(figure)
        temporary.replace(path)
        return path


def _generator_states(kwargs: dict) -> Any:
    generator = kwargs.get("generator")
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, (list, tuple)):
        return [g.get_state() for g in generator]
    return None


def _with_generators(kwargs: dict, state: Any) -> dict:
    """A copy of ``kwargs`` whose generators restart from ``state``: every run of one input sees the same noise."""
    kwargs = dict(kwargs)
    generator = kwargs.get("generator")
    if isinstance(generator, torch.Generator):
        kwargs["generator"] = torch.Generator(generator.device).set_state(state)
    elif isinstance(generator, (list, tuple)):
        kwargs["generator"] = [torch.Generator(g.device).set_state(s) for g, s in zip(generator, state)]
    return kwargs


def check_inputs(inputs, what: str) -> list[dict]:
    inputs = [inputs] if isinstance(inputs, dict) else list(inputs)
    if not inputs or not all(isinstance(kwargs, dict) for kwargs in inputs):
        raise ValueError(f"{what} inputs must be a dict of call arguments or a non-empty list of them.")
    for kwargs in inputs:
        if kwargs.get("generator") is None:
            raise ValueError(f"{what} inputs need a seeded generator in each call (generator=torch.Generator()"
                             ".manual_seed(...)), so that every pruned variant sees the same noise.")
    return inputs


class _Runner:
    """Runs the pipeline on the analysis inputs, each with its original noise."""

    def __init__(self, pipe, inputs: list[dict], num_inference_steps: int | None) -> None:
        self.pipe = pipe
        self.inputs = inputs
        self.states = [_generator_states(kwargs) for kwargs in inputs]
        self.extra = {"output_type": "np"}
        if num_inference_steps is not None:
            self.extra["num_inference_steps"] = num_inference_steps

    def __call__(self) -> list[np.ndarray]:
        outputs = [self.pipe(**{**_with_generators(kwargs, state), **self.extra})
                   for kwargs, state in zip(self.inputs, self.states)]
        # images [N, H, W, C] or videos [N, F, H, W, C], as the eval harness reads them
        return [np.asarray(out.images if hasattr(out, "images") else out.frames, dtype=np.float32) for out in outputs]


@contextlib.contextmanager
def removed(model: torch.nn.Module, adapter, unit: Unit) -> Iterator[None]:
    """``unit`` removed for the length of the block: the block passes its inputs through, or the branch outputs 0."""
    block = blocks_of(model, adapter)[unit.block]
    if unit.component is not None:
        parent, attr, original = zero_branch(model, block, unit.component)
        try:
            yield
        finally:
            setattr(parent, attr, original)
        return

    def passthrough(*args, **kwargs):
        hidden, context = block.streams_in(args, kwargs)
        return block.make_output(hidden, context)

    block.module.forward = passthrough
    try:
        yield
    finally:
        del block.module.forward


def unit_params(model: torch.nn.Module, adapter, unit: Unit) -> int:
    block = blocks_of(model, adapter)[unit.block]
    module = block.module if unit.component is None else block.branches[unit.component][1]
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def analyze_contributions(pipe, inputs, *, num_inference_steps: int | None = None, components: bool = True,
                          scorer: Scorer | None = None, denoiser: str = "transformer",
                          progress: bool = True) -> ContributionReport:
    """Score removing each block (and, with ``components``, each residual branch of each block) of ``pipe``'s
    denoiser: the pipeline runs on ``inputs`` (call kwargs with seeded generators) once in full and once per unit
    removed, and each unit gets the PSNR and MSE of its samples against the full model's. ``scorer(outputs)`` (the
    list of output arrays, one per input) adds figures such as class accuracy, for the full model and each unit."""
    if context_of(pipe) is not None:
        raise ValueError("analyze_contributions needs the plain pipeline; accel.unwrap(pipe) first.")
    inputs = check_inputs(inputs, "Contribution analysis")
    model, adapter = denoiser_of(pipe, denoiser)
    started = time.perf_counter()
    run = _Runner(pipe, inputs, num_inference_steps)
    full_outputs = run()
    reference = np.concatenate([o.reshape(o.shape[0], -1) for o in full_outputs])
    units = all_units(model, adapter, components)
    rows = []
    for unit in tqdm(units, desc="HierarchicalPrune: contribution analysis", disable=not progress):
        with removed(model, adapter, unit):
            outputs = run()
        flat = np.concatenate([o.reshape(o.shape[0], -1) for o in outputs])
        mse = float(np.mean((reference.astype(np.float64) - flat) ** 2))
        row = {"name": unit.name, "block": unit.block, "component": unit.component,
               "params": unit_params(model, adapter, unit),
               "psnr_db": math.inf if mse == 0 else 10 * math.log10(1.0 / mse), "mse": mse}
        if scorer is not None:
            row.update(scorer(outputs))
        rows.append(row)
    metadata = {
        "inputs": len(inputs), "num_inference_steps": num_inference_steps, "denoiser": denoiser,
        "pipeline": type(pipe).__name__, "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - started, 2),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return ContributionReport(adapter.name, type(model).__name__, len(blocks_of(model, adapter)), rows,
                              scorer(full_outputs) if scorer is not None else {}, metadata)
