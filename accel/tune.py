"""``accel.tune``: search presets, stacks and the compiled variant for the fastest one that meets a quality target.

    tuned = accel.tune(pipe, inputs, num_inference_steps=20, target={"psnr": 34}, budget_s=600)
    print(tuned.table())                  # every trial: speedup with its spread, fidelity, whether it met the target
    tuned.save("tuned.json")              # the chosen stack (calibrated schedules included) and the trials
    accel.wrap(pipe, tuned)               # or accel.wrap(pipe, accel.TuneResult.load("tuned.json"))

Every trial wraps ``pipe`` with a candidate (calibrating on ``inputs`` where the method calibrates), runs every
input once for fidelity against the plain pipeline's outputs of the same seeds (generators are rewound before each
call), then times the plain pipeline and the candidate in interleaved rounds (``accel.eval.timing``: warm-up
outside the timed part, the speedup the median of per-round ratios, with its spread), and unwraps. Ladders of one
method that grow more aggressive (BAC budgets, Δ-DiT intervals) stop at their first rung that misses the target.
Stacks pair each caching candidate that met the target with each sparse-attention preset the family supports; the
compiled variant (``module.compile()`` below accel's hooks) is tried for the fastest candidates that met it. The
search starts no trial it expects to end past ``budget_s``. Targets: ``{"psnr": dB}`` (against the plain output)
or ``{"fid_ratio": r}`` with ``fid=callable(images) -> float`` (the candidate's FID at most r times the plain one's).
Check the choice on other seeds: ``held_out=`` inputs are measured for the chosen stack and reported apart.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import AccelConfig
from .eval.metrics import output_array, psnr
from .eval.timing import Speedup, interleaved_timings
from .io import atomic_write
from .registry import config_class, registered, stacking_conflict

TARGETS = ("psnr", "fid_ratio")
PLOT_PSNR_CAP = 60.0


@dataclass
class Trial:
    """One candidate measured: its methods, whether compiled, its speedup and fidelity, and the target's verdict."""

    label: str
    configs: list[AccelConfig]
    compiled: bool
    speedup: Speedup
    psnr: float
    fid: float | None
    meets: bool
    seconds: float  # what the trial cost, calibration and compilation included

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "methods": [config.to_dict() for config in self.configs],
                "compiled": self.compiled, "speedup": self.speedup.to_dict(), "psnr": _json_float(self.psnr),
                "fid": self.fid, "meets": self.meets, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        speedup = data["speedup"]
        return cls(data["label"], [_config(item) for item in data["methods"]], data["compiled"],
                   Speedup(speedup["median"], speedup["low"], speedup["high"], speedup["spread"], speedup["n"]),
                   float(data["psnr"]), data["fid"], data["meets"], data["seconds"])


@dataclass
class TuneResult:
    """What ``accel.tune`` chose (``chosen``: a trial, or ``None`` if nothing met the target) and all it tried."""

    target: dict[str, float]
    num_inference_steps: int
    trials: list[Trial]
    chosen: Trial | None
    held_out: Trial | None = None
    baseline_fid: float | None = None
    compile_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def configs(self) -> list[AccelConfig]:
        if self.chosen is None:
            raise ValueError(f"No trial met the target {self.target}; loosen it or raise budget_s (see .table()).")
        return list(self.chosen.configs)

    def accel_stack(self) -> tuple[list[AccelConfig], dict[str, Any] | None]:
        """What ``accel.wrap(pipe, result)`` applies: the chosen configs, and torch.compile's kwargs if compiled."""
        configs = self.configs
        return configs, (dict(self.compile_kwargs) if self.chosen.compiled else None)

    def pareto(self) -> list[Trial]:
        """The trials no other trial beats on both speedup and PSNR, fastest first."""
        front = [t for t in self.trials if not any(
            o.speedup.median >= t.speedup.median and o.psnr >= t.psnr and
            (o.speedup.median > t.speedup.median or o.psnr > t.psnr) for o in self.trials)]
        return sorted(front, key=lambda t: -t.speedup.median)

    def table(self) -> str:
        front = {id(t) for t in self.pareto()}
        lines = [f"target {self.target}, {self.num_inference_steps} steps; * Pareto front, → chosen", "",
                 "| | trial | speedup | PSNR dB | FID | meets | s |", "|---|---|---:|---:|---:|---|---:|"]
        for trial in sorted(self.trials, key=lambda t: -t.speedup.median):
            mark = ("→" if trial is self.chosen else "") + ("*" if id(trial) in front else "")
            fid = f"{trial.fid:.2f}" if trial.fid is not None else ""
            lines.append(f"| {mark} | {trial.label} | {trial.speedup.describe()} | {trial.psnr:.2f} | {fid} | "
                         f"{'yes' if trial.meets else 'no'} | {trial.seconds:.0f} |")
        if self.held_out is not None:
            lines += ["", f"Held-out inputs, chosen stack: {self.held_out.speedup.describe()}, PSNR "
                          f"{self.held_out.psnr:.2f} dB, meets the target: {'yes' if self.held_out.meets else 'no'}."]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4.5))
        front = {id(t) for t in self.pareto()}
        shown = [min(t.psnr, PLOT_PSNR_CAP) for t in self.trials]  # a near-exact trial (compile alone) is off scale
        for trial, value in zip(self.trials, shown):
            colour = "tab:green" if trial.meets else "tab:grey"
            axes.errorbar(trial.speedup.median, value, xerr=[[trial.speedup.median - trial.speedup.low],
                          [trial.speedup.high - trial.speedup.median]], fmt="o", color=colour, capsize=2,
                          alpha=1.0 if id(trial) in front else 0.5)
            if id(trial) in front or trial is self.chosen:
                axes.annotate(trial.label, (trial.speedup.median, value), fontsize=6, xytext=(3, 3),
                              textcoords="offset points")
        if "psnr" in self.target:
            axes.axhline(self.target["psnr"], color="tab:red", linestyle="--", linewidth=1, label="target")
        if self.chosen is not None:
            axes.plot(self.chosen.speedup.median, min(self.chosen.psnr, PLOT_PSNR_CAP), "*", color="tab:red",
                      markersize=14, label="chosen")
        axes.set_xlabel("speedup over the plain pipeline (median, spread)")
        axes.set_ylabel(f"PSNR vs the plain output, dB (above {PLOT_PSNR_CAP:.0f} shown at it)")
        axes.legend(fontsize=7)
        figure.tight_layout()
        buffer = Path(path)
        figure.savefig(buffer.with_suffix(".tmp.png"), dpi=130)
        plt.close(figure)
        buffer.with_suffix(".tmp.png").replace(buffer)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "num_inference_steps": self.num_inference_steps,
                "chosen": self.trials.index(self.chosen) if self.chosen is not None else None,
                "trials": [trial.to_dict() for trial in self.trials], "baseline_fid": self.baseline_fid,
                "held_out": self.held_out.to_dict() if self.held_out is not None else None,
                "compile_kwargs": self.compile_kwargs}

    def save(self, path: str | Path) -> None:
        atomic_write(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TuneResult:
        data = json.loads(Path(path).read_text(encoding="utf-8"))  # JSON only: a saved result holds no code
        trials = [Trial.from_dict(item) for item in data["trials"]]
        chosen = trials[data["chosen"]] if data.get("chosen") is not None else None
        held = Trial.from_dict(data["held_out"]) if data.get("held_out") else None
        return cls(data["target"], data["num_inference_steps"], trials, chosen, held, data.get("baseline_fid"),
                   data.get("compile_kwargs", {}))


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"


def _config(data: dict[str, Any]) -> AccelConfig:
    return config_class(data["method"]).from_dict(data)


def check_target(target: Any, fid: Callable | None) -> dict[str, float]:
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in TARGETS:
        raise ValueError(f"target must be one of {{'psnr': dB}} or {{'fid_ratio': r}}, got {target!r}.")
    (name, value), = target.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"target {name} must be a positive number, got {value!r}.")
    if name == "fid_ratio" and fid is None:
        raise ValueError("target fid_ratio needs fid=callable(images) -> float (e.g. the FID against real images).")
    return {name: float(value)}


class _Inputs:
    """The calls a trial makes, each with its generators rewound first, so every trial sees the same noise."""

    def __init__(self, calls: list[dict[str, Any]]) -> None:
        if not calls or not all(isinstance(call, dict) for call in calls):
            raise ValueError("inputs must be a non-empty list of call-argument dicts (or one dict).")
        self.calls = [dict(call, output_type="np") for call in calls]
        self.states = [[g.get_state() for g in _generators(call)] for call in self.calls]

    def rewound(self) -> list[dict[str, Any]]:
        return [self._rewound(index) for index in range(len(self.calls))]

    def outputs(self, pipe) -> np.ndarray:
        return np.concatenate([output_array(pipe(**self._rewound(index))) for index in range(len(self.calls))])

    def _rewound(self, index: int) -> dict[str, Any]:
        for generator, state in zip(_generators(self.calls[index]), self.states[index]):
            generator.set_state(state)
        return self.calls[index]

    def first_call(self, pipe) -> Callable[[], Any]:
        return lambda: pipe(**self._rewound(0))


def _generators(call: dict[str, Any]) -> list[torch.Generator]:
    generator = call.get("generator")
    if generator is None:
        return []
    return list(generator) if isinstance(generator, (list, tuple)) else [generator]


@dataclass
class _Candidate:
    label: str
    configs: list[AccelConfig]
    compiled: bool = False
    ladder: str | None = None  # candidates of one ladder grow more aggressive; the first miss ends the ladder


def default_candidates(pipe) -> list[_Candidate]:
    """The search space when none is given: BAC budgets and Δ-DiT intervals as ladders, the family's sparse
    attention presets alone. Stacks and compiled variants are added during the search."""
    from .methods.bac import BACConfig
    from .methods.delta_dit import DeltaDiTConfig
    from .pipelines.adapters import adapter_for

    family = adapter_for(pipe).name
    depth = len(adapter_for(pipe).blocks(next(iter(adapter_for(pipe).denoisers(pipe).values()))))
    candidates = []
    specs = {spec.name: spec for spec in registered()}
    if specs.get("bac") is not None and specs["bac"].supports(family):
        for budget in (0.45, 0.4, 0.35, 0.32, 0.3, 0.27, 0.25, 0.2):
            config = BACConfig(budget=budget, forecast=1, metric="l2", per_block=True, share_budget=True, top_k=0)
            candidates.append(_Candidate(f"bac budget {budget}", [config], ladder="bac"))
    if specs.get("delta-dit") is not None and specs["delta-dit"].supports(family):
        rear = (depth - 1) / depth
        for interval, fraction in ((2, 0.75), (2, rear), (3, rear), (4, rear)):
            config = DeltaDiTConfig(interval=interval, cached_fraction=fraction, boundary=1.0)
            candidates.append(_Candidate(f"delta-dit interval {interval}, {round(fraction * depth)} of {depth} "
                                         "blocks", [config], ladder="delta-dit"))
    for name in ("adaspa", "vmoba"):
        if specs.get(name) is not None and specs[name].supports(family):
            candidates.append(_Candidate(name, [specs[name].config_cls()]))
    return candidates


def tune(pipe, inputs, *, num_inference_steps: int, target: dict[str, float], budget_s: float = 600.0,
         candidates: list[list[AccelConfig]] | None = None, compile: bool = True, compile_kwargs=None,
         rounds: int = 5, fid: Callable[[np.ndarray], float] | None = None, held_out=None,
         progress: bool = True) -> TuneResult:
    """Search for the fastest stack that meets ``target`` on ``inputs``; see the module docstring.

    Args:
        pipe: an unwrapped pipeline; it is wrapped and unwrapped trial by trial and left as it came.
        inputs: call arguments (one dict or a list; seeded generators), without ``num_inference_steps``.
        target: ``{"psnr": dB}`` or ``{"fid_ratio": r}`` (with ``fid``).
        budget_s: wall-clock seconds; no trial starts that is expected to end past it.
        candidates: lists of configs to try instead of ``default_candidates`` (each list one stack).
        compile: also try the fastest candidates that met the target compiled (``module.compile(**compile_kwargs)``).
        rounds: timed rounds per trial (the plain pipeline timed before and after each trial's rounds).
        held_out: other inputs to measure the chosen stack on, reported apart (``TuneResult.held_out``).
    """
    from .api import is_wrapped

    target = check_target(target, fid)
    if is_wrapped(pipe):
        raise ValueError("accel.tune takes an unwrapped pipeline (accel.unwrap it first): every trial wraps it anew.")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
    if budget_s <= 0 or rounds < 1:
        raise ValueError(f"budget_s must be positive and rounds at least 1 (got {budget_s!r}, {rounds!r}).")
    calls = _Inputs([dict(call, num_inference_steps=num_inference_steps) for call in _as_list(inputs)])
    queue = _checked(pipe, candidates) if candidates is not None else default_candidates(pipe)
    started = time.perf_counter()
    search = _Search(pipe, calls, target, fid, rounds, dict(compile_kwargs or {}), num_inference_steps)
    from tqdm.auto import tqdm

    bar = tqdm(total=budget_s, desc="accel.tune", unit="s", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s {postfix}")
    stopped_ladders: set[str] = set()
    stage = "single"
    while True:
        if not queue:
            queue, stage = search.next_stage(stage, compile, candidates is None)
            if not queue:
                break
        candidate = queue.pop(0)
        if candidate.ladder in stopped_ladders:
            continue
        if time.perf_counter() - started + search.estimate(candidate) > budget_s:
            continue
        trial = search.run(candidate)
        bar.n = min(budget_s, time.perf_counter() - started)
        bar.set_postfix_str(f"{trial.label}: {trial.speedup.median:.2f}×, {trial.psnr:.1f} dB")
        bar.refresh()
        if not trial.meets and candidate.ladder is not None:
            stopped_ladders.add(candidate.ladder)
    bar.close()
    meeting = [trial for trial in search.trials if trial.meets]
    chosen = max(meeting, key=lambda t: t.speedup.median) if meeting else None
    result = TuneResult(target, num_inference_steps, search.trials, chosen, None, search.baseline_fid,
                        search.compile_kwargs)
    if chosen is not None and held_out is not None:
        held = _Search(pipe, _Inputs([dict(call, num_inference_steps=num_inference_steps)
                                      for call in _as_list(held_out)]), target, fid, rounds, search.compile_kwargs,
                       num_inference_steps)
        label = chosen.label.removesuffix(", compiled") + " (held-out inputs)"
        result.held_out = held.run(_Candidate(label, chosen.configs, chosen.compiled), calibrate=False)
    return result


def _checked(pipe, candidates) -> list[_Candidate]:
    """The user's candidate stacks, each resolved and checked (family, stacking rules) before any trial runs."""
    from .pipelines.adapters import adapter_for
    from .registry import resolve, spec_for

    adapter = adapter_for(pipe)
    checked = []
    for stack in candidates:
        configs = resolve(list(stack))
        specs = [spec_for(config) for config in configs]
        unsupported = [spec.name for spec in specs if not spec.supports_adapter(adapter)]
        if unsupported:
            raise ValueError(f"candidate {[c.method for c in configs]}: {', '.join(unsupported)} does not support "
                             f"the {adapter.name!r} family.")
        conflict = stacking_conflict(specs)
        if conflict is not None:
            raise ValueError(f"candidate {[c.method for c in configs]}: {conflict}")
        checked.append(_Candidate(" + ".join(c.method for c in configs) or "no method", configs))
    return checked


def _as_list(inputs) -> list[dict[str, Any]]:
    return [inputs] if isinstance(inputs, dict) else list(inputs)


class _Search:
    """The plain pipeline's reference outputs and timing bracket, and the trials run so far."""

    def __init__(self, pipe, calls: _Inputs, target, fid, rounds: int, compile_kwargs, steps: int) -> None:
        self.pipe, self.calls, self.target, self.fid, self.rounds = pipe, calls, target, fid, rounds
        self.compile_kwargs, self.steps = compile_kwargs, steps
        self.reference = calls.outputs(pipe)
        self.baseline_fid = fid(self.reference) if fid is not None else None
        self.plain_before = self._time_plain()
        self.trials: list[Trial] = []

    def _time_plain(self) -> list[float]:
        return interleaved_timings({"plain": self.calls.first_call(self.pipe)}, self.rounds, warmup=1)["plain"]

    def estimate(self, candidate: _Candidate) -> float:
        """Seconds the candidate's trial should take: the last trial of its ladder or kind, else the slowest so far
        (twice that when compiling, for the compilation), else a guess from the plain call's time."""
        same = [t.seconds for t in self.trials if t.label.split(" ")[0] == candidate.label.split(" ")[0] and
                t.compiled == candidate.compiled]
        if same:
            return same[-1]
        if self.trials:
            return max(t.seconds for t in self.trials) * (2 if candidate.compiled else 1)
        plain = float(np.median(self.plain_before))
        return plain * (len(self.calls.calls) * 4 + 3 * self.rounds + 2)

    def run(self, candidate: _Candidate, calibrate: bool = True) -> Trial:
        from . import compiling
        from .api import calibrate as calibrate_method
        from .api import unwrap, wrap
        from .hooks import context_of
        from .registry import spec_for

        started = time.perf_counter()
        configs = []
        for config in candidate.configs:
            spec = spec_for(config)
            if calibrate and spec.calibrate is not None and getattr(config, spec.artifact_field, None) is None:
                inputs = [{k: v for k, v in c.items() if k != "num_inference_steps"} for c in self.calls.rewound()]
                artifact = calibrate_method(self.pipe, config, inputs,
                                            num_inference_steps=self.steps, progress=False)
                config = config.replace(**{spec.artifact_field: artifact})
            configs.append(config)
        wrap(self.pipe, configs)
        denoisers = list(context_of(self.pipe).denoisers.values())
        try:
            if candidate.compiled:
                for denoiser in denoisers:
                    denoiser.compile(**self.compile_kwargs)
            outputs = self.calls.outputs(self.pipe)  # also the compilation's first call
            seconds = interleaved_timings({"trial": self.calls.first_call(self.pipe)}, self.rounds, warmup=1)["trial"]
        finally:
            unwrap(self.pipe)
            for denoiser in denoisers:
                compiling.forget_compiled(denoiser)
        plain_after = self._time_plain()
        plain = [(before + after) / 2 for before, after in zip(self.plain_before, plain_after)]
        self.plain_before = plain_after
        quality = psnr(self.reference, outputs)
        fid = self.fid(outputs) if self.fid is not None else None
        if "psnr" in self.target:
            meets = quality >= self.target["psnr"]
        else:
            meets = fid <= self.target["fid_ratio"] * self.baseline_fid
        trial = Trial(candidate.label + (", compiled" if candidate.compiled else ""), configs, candidate.compiled,
                      Speedup.from_times(plain, seconds), quality, fid, meets, time.perf_counter() - started)
        self.trials.append(trial)
        return trial

    def next_stage(self, stage: str, compile: bool, default_space: bool) -> tuple[list[_Candidate], str]:
        """After the single methods: stacks of the best caching trials with the sparse presets that met the target
        alone (default space only); then the compiled variants of the two fastest trials that met it."""
        meeting = sorted((t for t in self.trials if t.meets), key=lambda t: -t.speedup.median)
        if stage == "single":
            stacks = []
            if default_space:
                roles = {spec.name: spec.role for spec in registered()}
                caching = [t for t in meeting if not t.compiled and
                           {roles.get(c.method) for c in t.configs} == {"caching"}][:2]
                sparse = [t for t in meeting if not t.compiled and
                          {roles.get(c.method) for c in t.configs} == {"sparse attention"}]
                for first in caching:
                    for second in sparse:
                        configs = first.configs + second.configs
                        specs = [spec for c in configs for spec in registered() if spec.config_cls is type(c)]
                        if stacking_conflict(specs) is None:
                            stacks.append(_Candidate(f"{first.label} + {second.label}", configs))
            if stacks:
                return stacks, "stacks"
            stage = "stacks"
        if stage == "stacks" and compile:
            best = [t for t in meeting if not t.compiled][:2]
            variants = [_Candidate("no method", [], compiled=True)]
            variants += [_Candidate(t.label, t.configs, compiled=True) for t in best]
            return variants, "compiled"
        return [], "done"
