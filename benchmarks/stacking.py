"""Stacking benchmark: which accelerators stack, and, for pairs that do, whether speedups multiply and losses add.

    python benchmarks/stacking.py                          # the matrix, digits-dit and moving-digits pairs
    python benchmarks/stacking.py --ilf-digits DIR --ilf-moving DIR   # ILF pairs too (trained modules)
    python benchmarks/stacking.py --sections matrix        # only the matrix; measured sections kept from the JSON
    python benchmarks/stacking.py --rounds 2 --samples 4 --out /tmp/quick

The matrix is ``accel.registry.stacking_conflict`` for every ordered pair of registered accelerators (tests/
test_stacking.py checks that ``accel.wrap`` does exactly that on the tiny DiT). The measured sections take the
stacking pairs whose parts need no training run here: caching × caching, caching × quantization and ensembling ×
caching on digits-dit (20 steps, guidance 1.5), caching × sparse attention on moving-digits (20 steps, guidance 6,
576 tokens a clip); with a trained ILF module given (``--ilf-digits``, ``--ilf-moving``: train one with
benchmarks/feedback.py), feedback × quantization and feedback × sparse attention too, ILF at 10 steps.
Per pair, rows R (the reference: the plain model; for ensembling, the untouched ensemble), A, B and A+B are their own
pipeline instances with the same weights. PSNR against R on ``--samples`` samples (seeds 1000+); speed in
``--rounds`` rounds (seed 2000), every row of a model once per round, order rotating, each row's first call
outside the timed part; speedup = median over rounds of R's seconds / the row's seconds in the same round, with
the spread. Two predictions for A+B: the product of A's and B's speedups, and the PSNR if A's and B's errors added
(their mean squared errors summed; independent errors add so). BAC's schedule (calibrated on the ensemble for
AFA + BAC) and QuEST's calibration use seeds 90000+. Writes ``stacking.md`` and ``stacking.json`` to ``--out``
(default docs/benchmarks).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import accel  # noqa: E402
from accel.eval.allocator import timing_allocator  # noqa: E402
from accel.eval.metrics import output_array  # noqa: E402
from accel.eval.timing import Speedup, interleaved_timings  # noqa: E402
from accel.io import atomic_write  # noqa: E402
from accel.methods.adaspa import AdaSpaConfig  # noqa: E402
from accel.methods.bac import BACConfig  # noqa: E402
from accel.methods.delta_dit import DeltaDiTConfig  # noqa: E402
from accel.methods.ilf import ILFConfig  # noqa: E402
from accel.methods.quest import QuESTConfig  # noqa: E402
from accel.methods.vmoba import VMoBAConfig  # noqa: E402
from accel.pipelines import reference  # noqa: E402
from accel.registry import registered, stacking_conflict, stacking_warning  # noqa: E402

QUALITY_SEED, TIMING_SEED, CALIBRATION_SEED = 1000, 2000, 90_000
BAC = BACConfig(budget=0.35, forecast=1, metric="l2", per_block=True, share_budget=True, top_k=0)  # the "bac" preset
QUEST_RTN_W8A8 = QuESTConfig(weight_bits=8, activation_bits=8, search_clipping=False, activation_range="minmax",
                             stage_a_iterations=0, stage_b_epochs=0)  # calibrates in seconds (QuEST's own: minutes)


def delta_dit(depth: int) -> DeltaDiTConfig:
    return DeltaDiTConfig(interval=2, cached_fraction=(depth - 1) / depth, boundary=1.0)


# per model: its rows (the parts each is built from) and the pairs measured
PLANS = {
    "digits-dit": {
        "batch": 16,
        "rows": {"plain": [], "Δ-DiT": ["delta"], "BAC": ["bac"], "QuEST W8A8 (RTN)": ["quest"],
                 "Δ-DiT + QuEST": ["delta", "quest"], "BAC + QuEST": ["bac", "quest"], "Δ-DiT + BAC": ["delta", "bac"],
                 "AFA (untrained mean)": ["afa"], "AFA + Δ-DiT": ["afa", "delta"], "AFA + BAC": ["afa", "bac"],
                 "ILF (10 steps)": ["ilf"], "ILF + QuEST (10 steps)": ["ilf", "quest"]},
        # (A, B, A+B, what A+B is measured against): the ensemble's caching against the ensemble, compared with
        # the caching method on one member against that member
        "pairs": [("Δ-DiT", "BAC", "Δ-DiT + BAC", "plain"),
                  ("Δ-DiT", "QuEST W8A8 (RTN)", "Δ-DiT + QuEST", "plain"),
                  ("BAC", "QuEST W8A8 (RTN)", "BAC + QuEST", "plain"),
                  ("Δ-DiT", None, "AFA + Δ-DiT", "AFA (untrained mean)"),
                  ("BAC", None, "AFA + BAC", "AFA (untrained mean)"),
                  ("ILF (10 steps)", "QuEST W8A8 (RTN)", "ILF + QuEST (10 steps)", "plain")],
    },
    "moving-digits": {
        "batch": 2,
        "rows": {"plain": [], "Δ-DiT": ["delta"], "BAC": ["bac"], "AdaSpa": ["adaspa"], "VMoBA": ["vmoba"],
                 "Δ-DiT + AdaSpa": ["delta", "adaspa"], "Δ-DiT + VMoBA": ["delta", "vmoba"],
                 "BAC + AdaSpa": ["bac", "adaspa"], "BAC + VMoBA": ["bac", "vmoba"],
                 "ILF (10 steps)": ["ilf"], "ILF + AdaSpa (10 steps)": ["ilf", "adaspa"],
                 "ILF + VMoBA (10 steps)": ["ilf", "vmoba"]},
        "pairs": [("Δ-DiT", "AdaSpa", "Δ-DiT + AdaSpa", "plain"), ("Δ-DiT", "VMoBA", "Δ-DiT + VMoBA", "plain"),
                  ("BAC", "AdaSpa", "BAC + AdaSpa", "plain"), ("BAC", "VMoBA", "BAC + VMoBA", "plain"),
                  ("ILF (10 steps)", "AdaSpa", "ILF + AdaSpa (10 steps)", "plain"),
                  ("ILF (10 steps)", "VMoBA", "ILF + VMoBA (10 steps)", "plain")],
    },
}


def matrix() -> dict:
    specs = sorted((spec for spec in registered() if spec.role is not None), key=lambda spec: spec.name)
    cells, warnings = {}, {}
    for first in specs:
        for second in specs:
            if first is not second:
                cells[f"{first.name} → {second.name}"] = stacking_conflict([first, second])
                warnings[f"{first.name} → {second.name}"] = stacking_warning([first, second])
    return {"methods": [(spec.name, spec.role) for spec in specs], "cells": cells, "warnings": warnings}


def call(model: str, pipe, count: int, seed: int, **overrides) -> dict:
    labels = [(seed + index) % 10 for index in range(count)]
    return reference.call_kwargs(model, pipe, labels, seed=seed, **overrides)


def build(model: str, parts: list[str], artifacts: dict):
    pipe = reference.load(model)
    depth = len(pipe.transformer.transformer_blocks if model == "digits-dit" else pipe.transformer.blocks)
    configs = {"delta": delta_dit(depth), "bac": BAC.replace(schedule=artifacts.get("bac")),
               "quest": QUEST_RTN_W8A8.replace(artifact=artifacts.get("quest")),
               "adaspa": AdaSpaConfig(), "vmoba": VMoBAConfig(), "ilf": ILFConfig(module=artifacts.get("ilf"))}
    if parts and parts[0] == "afa":
        members = [reference.load(name) for name in reference.ENSEMBLE_MEMBERS]
        pipe = accel.ensemble(members)  # member a wrapped with AFA (no aggregator: the members' plain mean)
        parts = parts[1:]
        if "bac" in parts:  # BAC's schedule calibrated on the ensemble it runs on
            configs["bac"] = BAC.replace(schedule=accel.calibrate(
                pipe, BAC, calibration_inputs(model, pipe, artifacts["batch"]), num_inference_steps=20,
                progress=False))
    if parts:
        accel.wrap(pipe, [configs[part] for part in parts])
    return pipe


def calibration_inputs(model: str, pipe, batch: int) -> list[dict]:
    inputs = [call(model, pipe, batch, CALIBRATION_SEED + index) for index in range(2)]
    for kwargs in inputs:
        kwargs.pop("num_inference_steps", None)
    return inputs


def calibrate(model: str, batch: int) -> dict:
    pipe = reference.load(model)
    inputs = calibration_inputs(model, pipe, batch)
    artifacts = {"batch": batch, "bac": accel.calibrate(pipe, BAC, inputs, num_inference_steps=20, progress=False)}
    if model == "digits-dit":
        artifacts["quest"] = accel.calibrate(pipe, QUEST_RTN_W8A8, inputs, num_inference_steps=20, progress=False)
    return artifacts


def steps_of(parts: list[str]) -> int:
    return 10 if "ilf" in parts else 20  # ILF samples in half the steps it was trained for


def measure(model: str, samples: int, rounds: int, ilf_module: Path | None) -> dict:
    plan = PLANS[model]
    batch = plan["batch"]
    artifacts = calibrate(model, batch)
    rows = dict(plan["rows"])
    pairs_plan = list(plan["pairs"])
    skipped = None
    if ilf_module is None:
        rows = {name: parts for name, parts in rows.items() if "ilf" not in parts}
        pairs_plan = [pair for pair in pairs_plan if pair[2] in rows]
        skipped = "ILF rows: no trained feedback module given (--ilf-" + model.split("-")[0] + ")"
    else:
        artifacts["ilf"] = str(ilf_module)
    pipes = {name: build(model, parts, artifacts) for name, parts in rows.items()}
    steps = {name: steps_of(parts) for name, parts in rows.items()}
    outputs = {name: [] for name in pipes}
    for start in tqdm(range(0, samples, batch), desc=f"{model}: quality"):
        count = min(batch, samples - start)
        for name, pipe in pipes.items():
            kwargs = call(model, pipe, count, QUALITY_SEED + start, num_inference_steps=steps[name])
            outputs[name].append(output_array(pipe(**kwargs)))
    outputs = {name: np.concatenate(parts) for name, parts in outputs.items()}
    names = list(pipes)
    for name in names:  # warm-up outside the timed part
        pipes[name](**call(model, pipes[name], batch, TIMING_SEED, num_inference_steps=steps[name]))
    def timed_call(name: str):
        return lambda: pipes[name](**call(model, pipes[name], batch, TIMING_SEED, num_inference_steps=steps[name]))

    progress = tqdm(total=rounds, desc=f"{model}: timed rounds")
    seconds = interleaved_timings({name: timed_call(name) for name in names}, rounds, warmup=0, rotate=True,
                                  on_round=lambda done, total: progress.update())
    progress.close()
    def mse(name: str, against: str) -> float:
        return float(np.mean((outputs[against].astype(np.float64) - outputs[name]) ** 2))

    def speedup(name: str, against: str) -> dict:
        return Speedup.from_times(seconds[against], seconds[name]).to_dict()

    pairs = []
    for first, second, both, stack_reference in pairs_plan:
        parts = [first] + ([second] if second else [])
        pairs.append({
            "parts": parts, "stack": both, "stack_reference": stack_reference,
            "speedups": {**{name: speedup(name, "plain") for name in parts}, both: speedup(both, stack_reference)},
            "psnr": {**{name: _psnr(mse(name, "plain")) for name in parts}, both: _psnr(mse(both, stack_reference))},
            "predicted_speedup": math.prod(speedup(name, "plain")["median"] for name in parts),
            "predicted_psnr": _psnr(sum(mse(name, "plain") for name in parts)),
        })
    return {"model": model, "batch": batch, "samples": samples, "rounds": rounds, "skipped": skipped,
            "seconds_per_call": {name: float(np.median(values)) for name, values in seconds.items()},
            "pairs": pairs}


def fmt_psnr(value: float) -> str:
    return "∞" if value == math.inf else f"{value:.2f}"


def _psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def markdown(report: dict) -> str:
    lines = ["# Stacking accelerators", "",
             f"Generated by `{report['command'].strip()}` on {report['date']} ({report['machine']}, torch "
             f"{report['torch']}); module docstring: protocol.", "",
             "## Which pairs stack", "",
             "Row: the method applied first; column: the one applied after it. `accel.wrap` refuses a refused pair "
             "with a `ValueError` giving the reason below, before touching the pipeline, and logs a warning for a "
             "pair that runs but interferes (tests/test_stacking.py checks every cell on the tiny DiT).", ""]
    methods = report["matrix"]["methods"]
    names = [name for name, _ in methods]
    roles = dict(methods)
    lines += ["| first ↓ / then → | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    reasons: dict[str, tuple[int, str]] = {}
    warned: dict[str, int] = {}
    for name, role in methods:
        cells = []
        for other in names:
            if other == name:
                cells.append("—")
                continue
            reason = report["matrix"]["cells"][f"{name} → {other}"]
            caution = report["matrix"].get("warnings", {}).get(f"{name} → {other}")
            if reason is None and caution is not None:
                number = warned.setdefault(caution, len(warned) + 1)
                cells.append(f"stacks, warns ({chr(96 + number)})")
            elif reason is None:
                cells.append("stacks")
            else:  # one footnote per pair of roles, quoting the first refusal of that kind
                pair_roles = {roles[name], roles[other]}
                key = ("ensembling after another method" if "ensembling" in pair_roles
                       else " + ".join(sorted(pair_roles)))
                number = reasons.setdefault(key, (len(reasons) + 1, reason))[0]
                cells.append(f"refused ({number})")
        lines.append(f"| **{name}** ({role}) | " + " | ".join(cells) + " |")
    lines += [""] + [f"{number}. {kind}: {reason}" for kind, (number, reason) in reasons.items()]
    lines += [f"{chr(96 + number)}. logged as a warning: {text}" for text, number in warned.items()] + [""]
    lines += ["Pruning (`accel.prune`, HierarchicalPrune) is not in the matrix: what it returns is a plain diffusers "
              "pipeline with fewer blocks, which every method above wraps like any other model of its family (the "
              "pruning benchmark measures it with QuEST's 4-bit weights on top).", ""]
    for section in report.get("sections", []):
        lines += [f"## {section['model']}: measured pairs", "",
                  f"Measured {section.get('measured', report['date'])}: `{section.get('command', '').strip()}`. "
                  f"{section['samples']} samples for PSNR, {section['rounds']} timed rounds of {section['batch']} "
                  "samples per call." + (f" Not measured: {section['skipped']}." if section.get("skipped") else ""),
                  "",
                  "A and B are measured against the plain model; A+B against the last column's row (the ensemble's "
                  "caching against the ensemble). Predictions: A×B, and the PSNR if A's and B's errors added.", "",
                  "| stack | speedup A | speedup B | speedup A+B | A×B | PSNR A | PSNR B | PSNR A+B "
                  "| PSNR if errors add | A+B against |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for pair in section["pairs"]:
            parts = pair["parts"]
            first = parts[0]
            second = parts[1] if len(parts) > 1 else None

            def fmt_speedup(name, speedups=pair["speedups"]):
                entry = speedups[name]
                return f"{entry['median']:.2f}× ({entry['low']:.2f}–{entry['high']:.2f})"

            lines.append(
                f"| {pair['stack']} | {fmt_speedup(first)} | {fmt_speedup(second) if second else ''} | "
                f"{fmt_speedup(pair['stack'])} | {pair['predicted_speedup']:.2f}× | {fmt_psnr(pair['psnr'][first])} | "
                f"{fmt_psnr(pair['psnr'][second]) if second else ''} | {fmt_psnr(pair['psnr'][pair['stack']])} | "
                f"{fmt_psnr(pair['predicted_psnr'])} | {pair['stack_reference']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="matrix,digits-dit,moving-digits")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--ilf-digits", type=Path, help="a digits-dit feedback module (benchmarks/feedback.py)")
    parser.add_argument("--ilf-moving", type=Path, help="a moving-digits feedback module (benchmarks/feedback.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    sections = [part.strip() for part in args.sections.split(",") if part.strip()]
    report = {"date": date.today().isoformat(), "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "allocator": timing_allocator(), "matrix": matrix(), "sections": [],
              "command": "python benchmarks/stacking.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    previous = {}
    if (args.out / "stacking.json").exists():  # a section not measured now keeps its last measurement
        old = json.loads((args.out / "stacking.json").read_text(encoding="utf-8"))
        previous = {section["model"]: section for section in old.get("sections", [])}
    for model in ("digits-dit", "moving-digits"):
        if model in sections:
            samples = args.samples if model == "digits-dit" else max(2, args.samples // 8)
            module = args.ilf_digits if model == "digits-dit" else args.ilf_moving
            report["sections"].append(measure(model, samples, args.rounds, module) | {
                "measured": report["date"], "command": report["command"]})
        elif model in previous:
            report["sections"].append(previous[model])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "stacking.json", json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    atomic_write(args.out / "stacking.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
