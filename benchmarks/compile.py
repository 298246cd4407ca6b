"""torch.compile benchmark: does a caching method keep its speedup when the model is compiled?

    python benchmarks/compile.py                       # digits-dit, 20 steps, inductor, 12 rounds
    python benchmarks/compile.py --rounds 4 --out /tmp/quick

On the shipped digits-dit (20 steps, guidance 1.5, a batch of 16 labels per call) every row is its own pipeline
instance with the same weights: {baseline, accel with nothing skipped, Δ-DiT, BAC} × {eager, compiled whole
(``pipe.transformer.compile()``), compiled block by block (``block.compile()`` on every transformer block, what
``compile_repeated_blocks()`` does where a model declares its blocks)}. The methods are wrapped *before* compiling,
as the README says. BAC's schedule is calibrated once, on seeds the measured calls never use, and shared by its
rows. Each row's first call (compilation, BAC's first-call work) is made outside the timed part; then ``--rounds``
rounds call every row once, the order rotating from round to round.

Reported per mode: each method's speedup over that mode's baseline (median of per-round ratios, with spread), and
the *kept share*: the compiled speedup divided by the eager speedup of the same round. Also: the compiled row's
time against the eager baseline, its PSNR against the eager row of the same method (same seeds; inductor's
reassociation is the only difference), the first call's seconds, and the number of dynamo compilations during the
timed rounds (must be 0). Writes ``compile.json`` and ``compile.md`` to ``--out`` (default docs/benchmarks).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import accel  # noqa: E402
from accel.eval.allocator import timing_allocator  # noqa: E402
from accel.eval.metrics import output_array, psnr  # noqa: E402
from accel.eval.timing import Speedup, Spread, interleaved_timings  # noqa: E402
from accel.io import atomic_write  # noqa: E402
from accel.methods.bac import BACConfig  # noqa: E402
from accel.methods.delta_dit import DeltaDiTConfig  # noqa: E402
from accel.pipelines import reference  # noqa: E402

MODEL = "digits-dit"
MEASURE_SEED = 1000
CALIBRATION_SEED = 90_000
MODES = ("eager", "compiled whole", "compiled block by block")
DELTA_DIT = DeltaDiTConfig(interval=2, cached_fraction=11 / 12, boundary=1.0)
BAC = BACConfig(budget=0.3, forecast=1, metric="l2", per_block=True, share_budget=True, top_k=0)
METHODS = {
    "baseline": None,
    "accel, nothing skipped": [],
    "Δ-DiT interval 2, rear 11 of 12 blocks": DELTA_DIT,
    "BAC + forecast, L2 shared schedule, budget 0.3": BAC,
}


def compilations() -> int:
    return counters["frames"]["total"] + counters["stats"]["unique_graphs"]


def build_row(method, mode: str, schedule, backend: str):
    pipe = reference.load(MODEL)
    if method is not None:
        config = method.replace(schedule=schedule) if isinstance(method, BACConfig) else method
        accel.wrap(pipe, config)
    if mode == "compiled whole":
        pipe.transformer.compile(backend=backend)
    elif mode == "compiled block by block":
        for block in pipe.transformer.transformer_blocks:
            block.compile(backend=backend)
    return pipe


def measure(args, batch: int, allocator: str) -> dict:
    """One section: every row at ``batch`` labels per call."""
    labels = [index % 10 for index in range(batch)]

    calibration_pipe = reference.load(MODEL)
    calibration = [reference.call_kwargs(MODEL, calibration_pipe, labels, seed=CALIBRATION_SEED + i) for i in range(2)]
    for kwargs in calibration:
        kwargs.pop("num_inference_steps", None)
    schedule = accel.calibrate(calibration_pipe, BAC, calibration, num_inference_steps=args.steps, progress=False)
    del calibration_pipe

    rows = [(name, mode) for mode in MODES for name in METHODS]
    pipes, first_call_s, outputs = {}, {}, {}
    for name, mode in tqdm(rows, desc=f"batch {batch}: first calls"):
        pipe = pipes[name, mode] = build_row(METHODS[name], mode, schedule, args.backend)
        started = time.perf_counter()
        output = pipe(**reference.call_kwargs(MODEL, pipe, labels, seed=MEASURE_SEED, num_inference_steps=args.steps))
        first_call_s[name, mode] = time.perf_counter() - started
        outputs[name, mode] = output_array(output)

    before = compilations()
    def timed_call(pipe):
        return lambda: pipe(**reference.call_kwargs(MODEL, pipe, labels, seed=MEASURE_SEED + 1,
                                                    num_inference_steps=args.steps))

    progress = tqdm(total=args.rounds, desc=f"batch {batch}: timed rounds")
    seconds = interleaved_timings({row: timed_call(pipes[row]) for row in rows}, args.rounds, warmup=0,
                                  rotate=True, on_round=lambda done, total: progress.update())
    progress.close()
    compiled_during_rounds = compilations() - before

    results = []
    for name, mode in rows:
        entry = {"method": name, "mode": mode, "seconds": Spread.of(seconds[name, mode]).to_dict(),
                 "first_call_s": first_call_s[name, mode],
                 "vs_eager_baseline": Speedup.from_times(seconds["baseline", "eager"], seconds[name, mode]).to_dict(),
                 "psnr_vs_eager_same_method": psnr(outputs[name, "eager"], outputs[name, mode])}
        if name != "baseline":
            speedup = Speedup.from_times(seconds["baseline", mode], seconds[name, mode])
            entry["speedup"] = speedup.to_dict()
            if mode != "eager":
                eager_ratios = [b / m for b, m in zip(seconds["baseline", "eager"], seconds[name, "eager"])]
                ratios = [b / m for b, m in zip(seconds["baseline", mode], seconds[name, mode])]
                entry["kept_share"] = Spread.of(r / e for r, e in zip(ratios, eager_ratios)).to_dict()
        results.append(entry)

    guidance = reference.call_kwargs(MODEL, pipes["baseline", "eager"], labels).get("guidance_scale")
    return {"batch": batch, "guidance": guidance, "compiled_during_timed_rounds": compiled_during_rounds,
            "rows": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 4], help="labels per call, one section each")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    allocator = timing_allocator()
    sections = [measure(args, batch, allocator) for batch in args.batches]
    report = {"date": date.today().isoformat(), "model": MODEL, "steps": args.steps, "backend": args.backend,
              "rounds": args.rounds, "allocator": allocator, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "sections": sections,
              "command": "python benchmarks/compile.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "compile.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write(args.out / "compile.md", markdown(report))
    print(markdown(report))
    return 0


def _spread(entry: dict, digits: int = 2, unit: str = "×") -> str:
    return (f"{entry['median']:.{digits}f}{unit} ({entry['low']:.{digits}f}–{entry['high']:.{digits}f} "
            f"{entry['spread']})")


def markdown(report: dict) -> str:
    lines = [
        "# torch.compile with accel: the caching speedups, eager and compiled", "",
        f"Measured {report['date']}: `{report['command'].strip()}`. Model: the shipped {report['model']}, "
        f"{report['steps']} steps. Backend: {report['backend']} on the CPU ({report['machine']}), torch "
        f"{report['torch']}. Allocator: {report['allocator']}. {report['rounds']} timed rounds, every row once per "
        "round, order rotating; each row's first call (compilation) outside the timed part.", "",
        "Speedup: against the baseline of the same mode (median of per-round ratios, spread in brackets). Kept: the "
        "compiled speedup divided by the eager speedup of the same round (the bar: ≥ 90%). vs eager baseline: the "
        "row's speed against the eager baseline. PSNR: the row's output against the eager row of the same method "
        "on the same seeds. First call: compilation included; instances share dynamo's graphs (its cache is per "
        "code object), so the first compiled row of a kind pays for the others.", "",
    ]
    for section in report["sections"]:
        lines += [
            f"## {section['batch']} labels per call, guidance {section['guidance']}", "",
            "| mode | method | s / call | speedup | kept | vs eager baseline | PSNR vs eager dB | first call s |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in section["rows"]:
            speedup = _spread(row["speedup"]) if "speedup" in row else "1.00×"
            kept = ""
            if "kept_share" in row:
                share = row["kept_share"]
                kept = f"{share['median']:.0%} ({share['low']:.0%}–{share['high']:.0%} {share['spread']})"
            value = row["psnr_vs_eager_same_method"]
            psnr_text = "∞" if value == float("inf") else f"{value:.1f}"
            lines.append(f"| {row['mode']} | {row['method']} | {row['seconds']['median']:.3f} | {speedup} | {kept} "
                         f"| {_spread(row['vs_eager_baseline'])} | {psnr_text} | {row['first_call_s']:.1f} |")
        lines += ["", f"Dynamo compilations during the timed rounds: {section['compiled_during_timed_rounds']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
