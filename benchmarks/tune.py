"""accel.tune on digits-dit: what it picks for a PSNR target, and whether the pick holds on other seeds.

    python benchmarks/tune.py                       # target 34 dB, 20 steps, 15-minute budget
    python benchmarks/tune.py --budget 120 --out /tmp/quick

``accel.tune`` runs on the shipped digits-dit (20 steps, guidance 1.5) with 2 calls of 16 labels as its inputs
(seeds 90000+) and the default search space (BAC budgets and Δ-DiT intervals as ladders, the sparse presets, the
stacks and the compiled variants; inductor on the CPU). Its choice is then measured on held-out inputs (2 calls of
16 labels, seeds 1000+) the same way. The bar: the best single method at ≥ 34 dB in docs/benchmarks/caching.md
(read from caching.json, not typed in) names a configuration; the pick must be at least as fast as that
configuration's trial in this same run, timed side by side (the caching benchmark's own figure was timed at 100
labels per call on another day, so it is printed, not compared). Writes ``tune.md``, ``tune.json`` and
``tune.png`` (the trials, the Pareto front, the pick) to ``--out`` (default docs/benchmarks); ``--report-only``
rewrites them from the saved ``tune-result.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import accel  # noqa: E402
from accel.eval.allocator import timing_allocator  # noqa: E402
from accel.io import atomic_write  # noqa: E402
from accel.pipelines import reference  # noqa: E402

MODEL = "digits-dit"
TUNE_SEED, HELD_OUT_SEED = 90_000, 1000


def inputs(pipe, seed: int, calls: int = 2, batch: int = 16) -> list[dict]:
    result = []
    for index in range(calls):
        kwargs = reference.call_kwargs(MODEL, pipe, [(seed + index + k) % 10 for k in range(batch)],
                                       seed=seed + index)
        kwargs.pop("num_inference_steps")
        result.append(kwargs)
    return result


def best_single_in_caching_benchmark(target: float, steps: int) -> dict | None:
    """The fastest of our single-method rows at >= target dB in caching.json's digits-dit section at ``steps``."""
    data = json.loads((ROOT / "docs" / "benchmarks" / "caching.json").read_text(encoding="utf-8"))
    best = None
    for section in data["settings"]:
        if section.get("model") != MODEL or section.get("steps") != steps:
            continue
        for row in section["rows"]:
            psnr = row.get("psnr_db")
            if not row.get("ours") or psnr is None or psnr < target or "nothing" in row["name"]:
                continue
            if best is None or row["speedup"] > best["speedup"]:
                best = {"name": row["name"], "speedup": row["speedup"], "psnr": row["psnr_db"]}
    return best


def same_config_trial(result, published: dict | None):
    """The trial of this run with the configuration of the caching benchmark's best single method, if it ran."""
    if published is None:
        return None
    match = re.fullmatch(r"BAC \+ forecast, L2 shared schedule, budget ([0-9.]+)", published["name"])
    label = f"bac budget {float(match.group(1))}" if match else None
    if published["name"].startswith("Δ-DiT interval"):
        found = re.match(r"Δ-DiT interval (\d+), rear (\d+) of (\d+) blocks", published["name"])
        if found:
            label = f"delta-dit interval {found.group(1)}, {found.group(2)} of {found.group(3)} blocks"
    return next((t for t in result.trials if t.label == label), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=34.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--report-only", action="store_true", help="rewrite tune.md / tune.json from the saved result")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    allocator = timing_allocator()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        result = accel.TuneResult.load(args.out / "tune-result.json")
        result.plot(args.out / "tune.png")
        previous = json.loads((args.out / "tune.json").read_text(encoding="utf-8"))
        measured, command = previous["date"], previous["command"]
    else:
        pipe = reference.load(MODEL)
        result = accel.tune(pipe, inputs(pipe, TUNE_SEED), num_inference_steps=args.steps,
                            target={"psnr": args.target}, budget_s=args.budget,
                            held_out=inputs(pipe, HELD_OUT_SEED))
        result.save(args.out / "tune-result.json")
        result.plot(args.out / "tune.png")
        measured = date.today().isoformat()
        command = "python benchmarks/tune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    spent = sum(trial.seconds for trial in result.trials)
    published = best_single_in_caching_benchmark(args.target, args.steps)
    same = same_config_trial(result, published)
    chosen = result.chosen
    report = {
        "date": measured, "model": MODEL, "steps": args.steps, "target_psnr": args.target,
        "budget_s": args.budget, "trials_s": spent, "allocator": allocator, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "chosen": chosen.to_dict() if chosen else None,
        "held_out": result.held_out.to_dict() if result.held_out else None,
        "best_single_caching_benchmark": published, "same_config_this_run": same.to_dict() if same else None,
        "command": command,
    }
    atomic_write(args.out / "tune.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    lines = [
        "# accel.tune on digits-dit", "",
        f"Measured {measured}: `{command.strip()}` ({report['machine']}, torch {report['torch']}, allocator: "
        f"{allocator}). Target PSNR ≥ {args.target} dB against the plain output, {args.steps} steps, 2 calls of 16 "
        f"labels as tune inputs, budget {args.budget:.0f} s (the trials took {spent:.0f} s). The saved result: "
        "`tune-result.json`; the plot: `tune.png`.", "",
        result.table(), "",
        "## The bar", "",
    ]
    if chosen is None:
        lines.append("Nothing met the target within the budget: **not met**.")
    else:
        held = result.held_out
        lines.append(f"- Chosen: **{chosen.label}**, {chosen.speedup.describe()}, {chosen.psnr:.2f} dB on the tune "
                     f"inputs; on held-out seeds {held.speedup.describe()}, {held.psnr:.2f} dB "
                     f"(**{'holds' if held.meets else 'does not hold'}** the target).")
        if published is not None:
            lines.append(f"- The caching benchmark's best single method at ≥ {args.target} dB: {published['name']} "
                         f"({published['speedup']:.2f}×, {published['psnr']:.2f} dB there, at 100 labels per call "
                         "on another day).")
        if same is not None:
            separated = chosen.speedup.low > same.speedup.high
            verdict = "met" if chosen.speedup.median >= same.speedup.median else "not met"
            lines.append(f"- The same configuration in this run, side by side with the others: {same.label}, "
                         f"{same.speedup.describe()} ({same.psnr:.2f} dB). At least as fast: **{verdict}** "
                         f"({'the spreads do not overlap' if separated else 'the spreads overlap'}).")
        elif published is not None:
            lines.append("- That configuration did not run in this search: no side-by-side comparison.")
    atomic_write(args.out / "tune.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
