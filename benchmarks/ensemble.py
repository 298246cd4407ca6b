"""Ensemble benchmark: AFA on two digits-dit fine-tunes side by side with each member, their prediction average and
their weight average, on the same labels and seeds.

    python benchmarks/ensemble.py                      # trains the aggregator (about 14 min), then 500 samples
    python benchmarks/ensemble.py --aggregator DIR     # reuses a saved aggregator (its card's training time)
    python benchmarks/ensemble.py --samples 50 --train-steps 20 --out /tmp/quick --aggregator-out /tmp/agg

Members: ``digits-dit-a`` and ``digits-dit-b`` (``python -m training.train_members``: digits-dit fine-tuned on
disjoint halves of its train split with different seeds). Rows, all at the default call (20 steps, guidance 1.5)
unless named:

* ``member a``, ``member b``: each member alone; ``base (digits-dit, not a member)`` for reference.
* ``prediction average``: every step's noise prediction is the mean of the members' (two forwards).
* ``weight average``: one model whose weights are the mean of the members' (a model soup).
* ``AFA, untrained``: the members in lock-step mixed by the plain mean after every block (the aggregator's start).
* ``AFA``: the trained aggregator (``accel.train_aggregator``: the members' denoising loss on the full train split,
  10% of labels dropped to the null class, as the members were trained); guidance's unconditional branch mixed
  with the conditional branch's weights (``guidance_mix="shared"``, the default).
* ``AFA, guidance branches mixed each by its own condition``: the same aggregator, ``guidance_mix="per-branch"``
  (the paper: the null condition routes the unconditional branch itself).
* ``AFA, N/2 steps``: the equal-compute row (two members at half the steps cost about one member at full steps).

Columns: FID (digit-classifier features vs the held-out digits, torchmetrics), class accuracy, seconds per sample
and the time ratio to member a (batches interleaved, row order rotating, member a timed before and after each
batch; median and spread over batches), weights in memory (fp32 MB, members and aggregator), training seconds.
Writes ``ensemble.json`` and ``ensemble.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from quantization import machine_description  # noqa: E402

import accel  # noqa: E402
from accel.eval.allocator import timing_allocator  # noqa: E402
from accel.eval.metrics import digit_fid, output_array  # noqa: E402
from accel.eval.timing import Speedup  # noqa: E402
from accel.io import atomic_write  # noqa: E402
from accel.methods.afa import AFAConfig, Aggregator, AggregatorSettings, validation_loss  # noqa: E402
from accel.pipelines import reference  # noqa: E402
from accel.pipelines.digits import split  # noqa: E402

MODEL = "digits-dit"
MEMBERS = reference.ENSEMBLE_MEMBERS
MEASURE_SEED = 1_000
NULL_CLASS = 1000  # DiTPipeline's unconditional label
LABEL_DROPOUT = 0.1  # as the members were trained (training/train_digits_dit.py)
SETTINGS = AggregatorSettings(steps=2000, batch_size=32, lr=5e-4, warmup_steps=100, hidden=64, heads=4, seed=0)
BOOTSTRAP = 200  # resamples of the measured samples for the FID differences' intervals
HALF_CLASSES = {"digits 0-4": range(0, 5), "digits 5-9": range(5, 10)}
AGGREGATOR_OUT = reference.MODELS_DIR / "digits-dit-ab-aggregator"
BATCH = 50


@dataclass
class Row:
    name: str
    kind: str  # "member", "base", "baseline" (an ensembling baseline), "ours"
    pipe: object
    steps: int
    weights_mb: float
    seconds: list[float] = field(default_factory=list)
    base_seconds: list[float] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)


def digit_batches(part: str = "train", dropout: float = LABEL_DROPOUT):
    """``batches(generator, size)`` for train_aggregator: ``part``'s digits in [-1, 1], labels with dropout."""
    data = split()[part]
    images = torch.from_numpy(data.images)[:, None].float() * 2 - 1
    labels = torch.from_numpy(data.labels).long()

    def batches(generator: torch.Generator, size: int) -> dict:
        index = torch.randint(0, len(labels), (size,), generator=generator)
        chosen = labels[index].clone()
        chosen[torch.rand(size, generator=generator) < dropout] = NULL_CLASS
        return {"latents": images[index], "class_labels": chosen}

    return batches


def held_out_losses(aggregator: Path) -> dict[str, float]:
    """The denoising loss on held-out digits (fixed noise and timesteps, conditional): members, base, ensembles."""
    batches = digit_batches("held_out", dropout=0.0)
    losses = {name: validation_loss([reference.load(name)], batches) for name in (*MEMBERS, MODEL)}
    losses["AFA, untrained"] = validation_loss([reference.load(n) for n in MEMBERS], batches)
    losses["AFA"] = validation_loss([reference.load(n) for n in MEMBERS], batches, aggregator)
    return {name: round(value, 5) for name, value in losses.items()}


def _frechet(features: np.ndarray, real_mean: np.ndarray, real_cov: np.ndarray) -> float:
    from scipy.linalg import sqrtm

    mean, cov = features.mean(0), np.cov(features, rowvar=False)
    root = sqrtm(cov @ real_cov).real
    return float(((mean - real_mean) ** 2).sum() + np.trace(cov + real_cov - 2 * root))


def fid_difference(classifier, ours: np.ndarray, other: np.ndarray, held_out: np.ndarray) -> dict:
    """FID(ours) - FID(other) on the same labels and seeds (torchmetrics), with a 90% paired bootstrap interval:
    both sets resampled with the same indices, the Fréchet distance recomputed on the classifier features
    (computed once; the same 64-d features torchmetrics reads)."""
    with torch.no_grad():
        ours_f, other_f, real_f = (classifier.features(images).double().numpy() for images in (ours, other, held_out))
    real_mean, real_cov = real_f.mean(0), np.cov(real_f, rowvar=False)
    rng = np.random.default_rng(0)
    differences = []
    for _ in range(BOOTSTRAP):
        index = rng.integers(0, len(ours_f), len(ours_f))
        differences.append(_frechet(ours_f[index], real_mean, real_cov)
                           - _frechet(other_f[index], real_mean, real_cov))
    low, high = np.percentile(differences, [5, 95])
    return {"difference": digit_fid(classifier, ours, held_out) - digit_fid(classifier, other, held_out),
            "interval_90": [float(low), float(high)]}


def megabytes(*modules: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters()) / 2**20


def prediction_average(pipes: list):
    """``pipes[0]`` with its transformer's output replaced by the mean of every pipeline's transformer output."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    lead, others = pipes[0], [pipe.transformer for pipe in pipes[1:]]

    def average(module, args, kwargs, output):
        total = output.sample if hasattr(output, "sample") else output[0]
        for other in others:
            total = total + other(*args, **{**kwargs, "return_dict": False})[0]
        mean = total / len(pipes)
        return Transformer2DModelOutput(sample=mean) if hasattr(output, "sample") else (mean,)

    lead.transformer.register_forward_hook(average, with_kwargs=True)
    return lead


def weight_average(pipes: list):
    """A pipeline like ``pipes[0]`` whose transformer holds the mean of the members' weights."""
    soup = reference.load(MEMBERS[0])
    states = [pipe.transformer.state_dict() for pipe in pipes]
    soup.transformer.load_state_dict({key: sum(state[key] for state in states) / len(states) for key in states[0]})
    return soup


def aggregator_for(train_steps: int, aggregator_dir: Path | None, aggregator_out: Path,
                   lr: float = SETTINGS.lr) -> tuple[Path, dict]:
    if aggregator_dir is not None:
        return aggregator_dir, Aggregator.read_card(aggregator_dir)
    pipes = [reference.load(name) for name in MEMBERS]
    settings = AggregatorSettings(**{**SETTINGS.__dict__, "steps": train_steps, "lr": lr})
    aggregator = accel.train_aggregator(pipes, digit_batches(), settings=settings,
                                        checkpoint_dir=ROOT / "runs" / f"afa-checkpoint-{train_steps}-{lr:g}")
    aggregator.save(aggregator_out)
    return aggregator_out, Aggregator.read_card(aggregator_out)


def build_rows(steps: int, aggregator: Path) -> list[Row]:
    members = [reference.load(name) for name in MEMBERS]
    one = megabytes(members[0].transformer)
    rows = [Row(f"member a ({MEMBERS[0]})", "member", members[0], steps, one),
            Row(f"member b ({MEMBERS[1]})", "member", members[1], steps, one),
            Row("base (digits-dit, not a member)", "base", reference.load(MODEL), steps, one),
            Row("prediction average", "baseline", prediction_average([reference.load(n) for n in MEMBERS]), steps,
                2 * one),
            Row("weight average", "baseline", weight_average([reference.load(n) for n in MEMBERS]), steps, one),
            Row("AFA, untrained (plain mean after every block)", "baseline",
                accel.ensemble([reference.load(n) for n in MEMBERS]), steps, 2 * one)]
    loaded = Aggregator.load(aggregator)
    size = 2 * one + megabytes(loaded)
    rows.append(Row("AFA", "ours", accel.ensemble([reference.load(n) for n in MEMBERS], aggregator=aggregator),
                    steps, size))
    per_branch = AFAConfig(members=[reference.load(MEMBERS[1])], aggregator=aggregator, guidance_mix="per-branch")
    rows.append(Row("AFA, guidance branches mixed each by its own condition (the paper's)", "baseline",
                    accel.wrap(reference.load(MEMBERS[0]), per_branch), steps, size))
    rows.append(Row(f"AFA, {steps // 2} steps (equal compute)", "ours",
                    accel.ensemble([reference.load(n) for n in MEMBERS], aggregator=aggregator), steps // 2, size))
    for row in rows:
        row.pipe.set_progress_bar_config(disable=True)
    return rows


def measure(rows: list[Row], samples: int) -> list[int]:
    labels = [i % 10 for i in range(samples)]
    batches = [labels[start:start + BATCH] for start in range(0, samples, BATCH)]
    base, others = rows[0], rows[1:]
    for row in rows:  # warm-up, untimed
        row.pipe(**reference.call_kwargs(MODEL, row.pipe, [0, 1], seed=MEASURE_SEED - 1,
                                         num_inference_steps=row.steps))
    progress = tqdm(total=len(batches) * (len(rows) + 1), desc="ensemble: generate")
    for index, batch_labels in enumerate(batches):
        shift = index % len(others)
        order = [base] + others[shift:] + others[:shift] + [base]
        base_times = []
        for position, row in enumerate(order):
            kwargs = reference.call_kwargs(MODEL, row.pipe, batch_labels, seed=MEASURE_SEED + index,
                                           num_inference_steps=row.steps)
            started = time.perf_counter()
            output = output_array(row.pipe(**kwargs))
            seconds = time.perf_counter() - started
            if row is base:
                base_times.append(seconds)
                if position == 0:
                    row.outputs.append(output)
                elif not np.array_equal(output, row.outputs[-1]):
                    raise RuntimeError("Member a is not deterministic: the same seeds gave other outputs.")
            else:
                row.seconds.append(seconds)
                row.outputs.append(output)
            progress.update()
        mean = sum(base_times) / 2
        base.seconds.append(mean)
        for row in others:
            row.base_seconds.append(mean)
    base.base_seconds = list(base.seconds)
    progress.close()
    return labels


def run(samples: int, train_steps: int, aggregator_dir: Path | None, aggregator_out: Path,
        lr: float = SETTINGS.lr) -> dict:
    steps = reference.DEFAULT_CALL[MODEL]["num_inference_steps"]
    aggregator, card = aggregator_for(train_steps, aggregator_dir, aggregator_out, lr)
    rows = build_rows(steps, aggregator)
    labels = measure(rows, samples)
    classifier = reference.classifier()
    held = split()["held_out"]
    held_out = held.images
    label_array = np.array(labels)
    results = []
    for row in rows:
        images = np.concatenate(row.outputs)
        speed = Speedup.from_times(row.base_seconds, row.seconds)
        halves = {name: digit_fid(classifier, images[np.isin(label_array, list(classes))],
                                  held_out[np.isin(held.labels, list(classes))])
                  for name, classes in HALF_CLASSES.items()}
        results.append({
            "name": row.name, "kind": row.kind, "steps": row.steps, "weights_mb": round(row.weights_mb, 2),
            "fid": digit_fid(classifier, images, held_out), "fid_halves": halves,
            "class_accuracy": classifier.accuracy(images, labels),
            "seconds_per_sample": sum(row.seconds) / samples, "speed": speed.to_dict(),
            "time_ratio": float(np.median(np.array(row.seconds) / np.array(row.base_seconds))),
            "speed_text": speed.describe() if row is not rows[0] else "1.00×",
        })
    ours = np.concatenate(next(row for row in rows if row.name == "AFA").outputs)
    for row, result in zip(rows, results):
        if row.kind in ("member", "baseline"):
            result["afa_minus_this"] = fid_difference(classifier, ours, np.concatenate(row.outputs), held_out)
    members = [json.loads((reference.model_dir(name) / "training.json").read_text()) for name in MEMBERS]
    return {"model": MODEL, "members": list(MEMBERS), "steps": steps, "samples": samples,
            "guidance_scale": reference.DEFAULT_CALL[MODEL]["guidance_scale"],
            "member_training": [{"name": name, "minutes": info["minutes"], "steps": info["steps"],
                                 "data": info["data"], "seed": info["seed"]} for name, info in zip(MEMBERS, members)],
            "aggregator": str(aggregator.relative_to(ROOT)) if aggregator.is_relative_to(ROOT) else str(aggregator),
            "aggregator_loaded": aggregator_dir is not None, "aggregator_training": card["training"],
            "held_out_loss": held_out_losses(aggregator), "rows": results}


def bars(result: dict) -> list[str]:
    """The issue's bars, checked against the measured rows (nothing here is a result)."""
    rows = {row["name"]: row for row in result["rows"]}
    ours = next(row for row in result["rows"] if row["name"] == "AFA")
    lines = []

    def check(label: str, ok: bool, detail: str) -> None:
        lines.append(f"- {'met' if ok else '**not met**'}: {label} ({detail})")

    for name, row in rows.items():
        if row["kind"] in ("member", "baseline") and not name.startswith("AFA"):
            low, high = row["afa_minus_this"]["interval_90"]
            noise = "outside the noise" if high < 0 else "**inside the noise**"
            check(f"FID better than '{name}'", ours["fid"] < row["fid"],
                  f"{ours['fid']:.2f} vs {row['fid']:.2f}; difference {ours['fid'] - row['fid']:+.2f}, 90% paired "
                  f"bootstrap interval [{low:+.2f}, {high:+.2f}]: {noise}")
    training = result["aggregator_training"]
    minutes = training["seconds_this_run"] / 60
    if training.get("resumed_from_step"):
        lines.append(f"- not measured: aggregator training time (this run resumed at step "
                     f"{training['resumed_from_step']}; {minutes:.1f} min after it)")
    else:
        check("aggregator training ≤ 20 minutes on 2 CPU cores", minutes <= 20, f"{minutes:.1f} min")
    return lines


def markdown(result: dict, machine: dict) -> str:
    training = result["aggregator_training"]
    members = "; ".join(f"`{m['name']}`: {m['data']}, seed {m['seed']}, {m['steps']} steps in {m['minutes']} min"
                        for m in result["member_training"])
    lines = ["# Ensembling: AFA vs each member, the prediction average and the weight average", "",
             "Generated by `python benchmarks/ensemble.py` (module docstring: rows, columns, protocol). "
             f"Machine: {machine['processor']}, {machine['threads']} threads, torch {machine['torch']}; measured "
             f"{machine['date']}. Every figure is a trained reference model's.", "",
             f"## {result['model']} fine-tunes, {result['steps']} steps, guidance {result['guidance_scale']}, "
             f"{result['samples']} samples", "",
             f"Members (fine-tuned from digits-dit, `python -m training.train_members`): {members}.", "",
             f"Aggregator (`{result['aggregator']}`): {training['parameters']:,} parameters, hidden "
             f"{training['hidden']}, "
             f"{training['steps']} steps of batch {training['batch_size']}, lr {training['lr']}, in "
             f"{training['seconds_this_run'] / 60:.1f} min"
             + (" (loaded; its card's training time)" if result["aggregator_loaded"] else " (trained in this run)")
             + f"; loss {training['first_losses_mean']} → {training['last_losses_mean']} (mean of the first and last "
             "steps).", "",
             "| row | steps | FID | FID digits 0-4 | FID digits 5-9 | AFA − row (90% interval) | class acc. | "
             "s / sample | time vs member a | weights MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        halves = row["fid_halves"]
        versus = row.get("afa_minus_this")
        versus_text = "–" if versus is None else \
            f"{versus['difference']:+.2f} [{versus['interval_90'][0]:+.2f}, {versus['interval_90'][1]:+.2f}]"
        lines.append(f"| {row['name']} | {row['steps']} | {row['fid']:.2f} | {halves['digits 0-4']:.2f} | "
                     f"{halves['digits 5-9']:.2f} | {versus_text} | {100 * row['class_accuracy']:.1f}% | "
                     f"{row['seconds_per_sample']:.3f} | {row['time_ratio']:.2f}× time ({row['speed_text']} speed) | "
                     f"{row['weights_mb']:.1f} |")
    losses = result["held_out_loss"]
    lines += ["", "Denoising loss on the held-out digits (the training objective; fixed noise and timesteps, "
              "8 batches of 64, conditional): " + ", ".join(f"{name} {value:.5f}" for name, value in losses.items())
              + "."]
    lines += ["", "FID per half: the samples of digits 0-4 (5-9) against the held-out digits 0-4 (5-9). The interval "
              f"column: AFA's FID minus the row's, with the 5th-95th percentiles over {BOOTSTRAP} paired bootstrap "
              f"resamples of the {result['samples']} samples (an interval that holds 0 is a difference inside the "
              "noise).", ""]
    lines += ["Time: the median over batches of the row's seconds over member a's (mean of its calls before "
              "and after the batch); the speed column is its inverse with the spread over batches.", "",
              "Bars:"] + bars(result) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--train-steps", type=int, default=SETTINGS.steps)
    parser.add_argument("--aggregator", type=Path, default=None, help="a saved aggregator's folder (skips training)")
    parser.add_argument("--aggregator-out", type=Path, default=AGGREGATOR_OUT)
    parser.add_argument("--lr", type=float, default=SETTINGS.lr, help="the aggregator's learning rate")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    if args.samples < BATCH or args.samples % BATCH:
        parser.error(f"--samples must be a positive multiple of {BATCH}")
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)  # training turns gradients on where it needs them
    allocator = timing_allocator()
    result = run(args.samples, args.train_steps, args.aggregator, args.aggregator_out, args.lr)
    machine = machine_description(allocator)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "ensemble.json", json.dumps({"machine": machine, **result}, indent=1))
    atomic_write(args.out / "ensemble.md", markdown(result, machine))
    print(markdown(result, machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
