"""Quantization benchmark: QuEST side by side with round-to-nearest and the peers, on the trained reference models.

    python benchmarks/quantization.py                                   # digits-dit (500 samples) and moving-digits
    python benchmarks/quantization.py --model digits-dit --samples 100 --out /tmp/quick

Rows (each its own pipeline instance, same weights, same seeds):

* ``float``: the reference model as shipped (float32 on the CPU).
* ``quest-w8a8`` / ``-w4a8`` / ``-w4a4``: ``accel.calibrate`` on inputs (labels, seeds) disjoint from the measured
  ones, then ``accel.wrap(..., release_originals=True)``; calibration + finetuning time is the ``calibrate`` call.
* ``rtn-*``: round-to-nearest at the same bit-widths and granularity (per-output-channel min/max weights, min/max
  activation ranges per step group, first and last layers at 8 bits), no search and no finetuning.
* peers (``[dev]`` dependencies, each library's documented CPU path): torchao ``Int8WeightOnlyConfig`` and
  ``Int8DynamicActivationInt8WeightConfig`` (W8A8), optimum-quanto ``qint8`` / ``qint4`` weights, alone and with
  ``qint8`` activations (calibrated on the same calibration inputs), bitsandbytes NF4 when its CPU backend runs.
  A peer that cannot run here is listed with the reason.
* ``quest-w8a8 + bac-forecast``: the stacked row.

Columns: FID (digit-classifier features, torchmetrics) and class accuracy (per frame for video), PSNR against the
float output for the same seeds, transformer weight bytes (every tensor the transformer and accel's hooks hold,
tensor subclasses unpacked, shared storage counted once) and that over the fp16 weights, resident memory of the
loaded pipeline (VmRSS of a fresh process that loads and quantizes it, malloc_trim'd), seconds per sample with
the speed ratio to float (batches interleaved, the row order rotating; median and spread over batches).
Writes ``quantization.json``, ``quantization.md`` and ``quantization.png`` (FID vs weight bytes) to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import accel  # noqa: E402
from accel.eval.allocator import release_free_memory, timing_allocator  # noqa: E402
from accel.eval.metrics import digit_fid, output_array, psnr  # noqa: E402
from accel.eval.timing import Speedup  # noqa: E402
from accel.io import atomic_write  # noqa: E402
from accel.methods.quest import QuESTConfig  # noqa: E402
from accel.pipelines import reference  # noqa: E402
from accel.pipelines.digits import split  # noqa: E402

CALIBRATION_SEED = 90_000
MEMORY_ROWS = ["float", "quest-w4a8", "torchao int8 weight-only", "quanto qint4 weights"]
MEASURE_SEED = 1_000


def calibration_inputs(model: str, pipe) -> list[dict]:
    """Calibration calls on labels and seeds no measured call uses: 4 calls of 5 digits (digits-dit), 2 of 2 clips."""
    calls, per_call = (4, 5) if model == "digits-dit" else (2, 2)
    inputs = []
    for index in range(calls):
        labels = [(per_call * index + j) % 10 for j in range(per_call)]
        kwargs = reference.call_kwargs(model, pipe, labels, seed=CALIBRATION_SEED + index)
        kwargs.pop("num_inference_steps")
        inputs.append(kwargs)
    return inputs


def rtn(weight_bits: int, activation_bits: int) -> QuESTConfig:
    return QuESTConfig(weight_bits=weight_bits, activation_bits=activation_bits, search_clipping=False,
                       activation_range="minmax", stage_a_iterations=0, stage_b_epochs=0)


def quest(weight_bits: int, activation_bits: int) -> QuESTConfig:
    (config,) = accel.registry.resolve(f"quest-w{weight_bits}a{activation_bits}")
    return config


# ------------------------------------------------------------------------------------------------ rows


@dataclass
class Row:
    name: str
    kind: str  # "float", "ours", "rtn", "peer", "stack"
    apply: Callable  # (pipe, model) -> seconds of calibration (or None)
    config: Callable[[], QuESTConfig] | None = None  # ours: the config calibrated (its artifact is cached)
    calibration_s: float | None = None
    seconds: list[float] = field(default_factory=list)
    float_seconds: list[float] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)


_ARTIFACTS: dict[tuple, tuple] = {}  # (model, config) -> (artifact, seconds): the stacked row reuses W8A8's


def _ours(config_of: Callable[[], QuESTConfig], extra: tuple = ()):
    def apply(pipe, model: str) -> float:
        config = config_of()
        key = (model, repr(config.to_dict()))
        if key not in _ARTIFACTS:
            started = time.perf_counter()
            artifact = accel.calibrate(pipe, config, calibration_inputs(model, pipe),
                                       num_inference_steps=reference.DEFAULT_CALL[model]["num_inference_steps"],
                                       progress=False)
            _ARTIFACTS[key] = (artifact, time.perf_counter() - started)
        artifact, seconds = _ARTIFACTS[key]
        accel.wrap(pipe, [config.replace(artifact=artifact, release_originals=True), *extra])
        return seconds
    return apply


def _torchao(kind: str):
    def apply(pipe, model: str) -> None:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if kind == "int8wo" else Int8DynamicActivationInt8WeightConfig()
        quantize_(pipe.transformer, config)
    return apply


def _quanto(weights: str, activations: str | None):
    def apply(pipe, model: str) -> None:
        from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

        types = {"qint8": qint8, "qint4": qint4}
        quantize(pipe.transformer, weights=types[weights], activations=types[activations] if activations else None)
        if activations:
            with Calibration():
                for kwargs in calibration_inputs(model, pipe):
                    pipe(**kwargs)
        freeze(pipe.transformer)
    return apply


def _bnb_nf4(pipe, model: str) -> None:
    import bitsandbytes as bnb

    for module in list(pipe.transformer.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    layer.bias = child.bias
                setattr(module, name, layer.to("cpu"))


def rows_for(model: str) -> list[Row]:
    rows = [Row("float", "float", lambda pipe, model: None)]
    bit_widths = [(8, 8), (4, 8), (4, 4)] if model == "digits-dit" else [(8, 8)]
    for w, a in bit_widths:
        config = functools.partial(quest, w, a)
        rows.append(Row(f"quest-w{w}a{a}", "ours", _ours(config), config))
    for w, a in bit_widths:
        config = functools.partial(rtn, w, a)
        rows.append(Row(f"rtn-w{w}a{a}", "rtn", _ours(config), config))
    rows += [Row("torchao int8 weight-only", "peer", _torchao("int8wo")),
             Row("torchao int8 dynamic (W8A8)", "peer", _torchao("int8dq")),
             Row("quanto qint8 weights", "peer", _quanto("qint8", None)),
             Row("quanto qint8 weights + qint8 activations", "peer", _quanto("qint8", "qint8"))]
    if model == "digits-dit":
        rows += [Row("quanto qint4 weights", "peer", _quanto("qint4", None)),
                 Row("quanto qint4 weights + qint8 activations", "peer", _quanto("qint4", "qint8")),
                 Row("bitsandbytes nf4 weights", "peer", _bnb_nf4),
                 Row("quest-w8a8 + bac-forecast", "stack", _ours(functools.partial(quest, 8, 8), ("bac-forecast",)))]
    return rows


# ---------------------------------------------------------------------------------------------- bytes


def _tensor_bytes(tensor: torch.Tensor, seen: set) -> int:
    """Bytes of ``tensor``'s storage (each storage once); tensor subclasses (torchao, quanto) and bitsandbytes'
    quantization state are unpacked into the tensors they hold."""
    if hasattr(type(tensor), "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name), seen) for name in names)
    total = 0
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                total += _tensor_bytes(value, seen)
    storage = tensor.untyped_storage()
    key = (storage.data_ptr(), storage.nbytes())
    if key not in seen and storage.nbytes():
        seen.add(key)
        total += storage.nbytes()
    return total


def _held_by(value, seen: set, depth: int = 0) -> int:
    if isinstance(value, torch.Tensor):
        return _tensor_bytes(value, seen)
    if depth > 3:
        return 0
    if isinstance(value, torch.nn.Module):
        return sum(_tensor_bytes(t, seen) for t in [*value.parameters(), *value.buffers()])
    if isinstance(value, (list, tuple)):
        return sum(_held_by(item, seen, depth + 1) for item in value)
    if isinstance(value, dict):
        return sum(_held_by(item, seen, depth + 1) for item in value.values())
    if hasattr(value, "__dataclass_fields__"):
        return sum(_held_by(getattr(value, name), seen, depth + 1) for name in value.__dataclass_fields__)
    return 0


def transformer_bytes(transformer: torch.nn.Module) -> int:
    """Every tensor the transformer holds: parameters and buffers, and what accel's hooks on its modules hold."""
    seen: set = set()
    total = 0
    for module in transformer.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            total += _tensor_bytes(tensor, seen)
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for hook in registry.hooks.values():
                total += sum(_held_by(value, seen) for name, value in vars(hook).items()
                             if name not in ("scope", "paths", "fn_ref"))
    return total


def fp16_bytes(transformer: torch.nn.Module) -> int:
    return sum(p.numel() * 2 for p in transformer.parameters())


# ------------------------------------------------------------------------------------------ resident memory


def resident_mb(model: str, row_name: str, artifact_dir: Path | None) -> dict | None:
    """Resident memory (MiB) of a fresh process that loaded ``model`` and applied ``row_name`` (ours: from the saved
    artifact in ``artifact_dir``, float weights released), after malloc_trim: the process's VmRSS, and the part the
    pipeline added to the process as it was after its imports."""
    command = [sys.executable, str(Path(__file__).resolve()), "--rss-child", model, row_name, str(artifact_dir or "")]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return None
    for line in result.stdout.splitlines():
        if line.startswith("RSS_MB "):
            before, after = map(float, line.split()[1:])
            return {"process_mb": after, "pipeline_mb": after - before}
    print(f"resident memory of {row_name}: no figure ({result.stderr.strip()[-300:]})", file=sys.stderr)
    return None


def _rss() -> float:
    gc.collect()
    release_free_memory()
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def _rss_child(model: str, row_name: str, artifact_dir: str) -> None:
    torch.set_num_threads(2)
    (row,) = [row for row in rows_for(model) if row.name == row_name]
    import optimum.quanto  # noqa: F401  (every process imports the same libraries before the first reading)
    import torchao  # noqa: F401

    before = _rss()
    pipe = reference.load(model)
    if artifact_dir:
        accel.wrap(pipe, row.config().replace(artifact=artifact_dir, release_originals=True))
    else:
        row.apply(pipe, model)
    print(f"RSS_MB {before:.1f} {_rss():.1f}")


def measure_memory(model: str, rows: list[Row], names: list[str]) -> dict[str, dict | None]:
    """``resident_mb`` for each row in ``names``; ours load the artifact they were calibrated with from disk."""
    import tempfile

    memory = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in tqdm(names, desc=f"{model}: resident memory"):
            matching = [row for row in rows if row.name == name]
            if not matching:
                continue
            artifact_dir = None
            if matching[0].config is not None:
                artifact_dir = Path(folder) / "artifact"
                _ARTIFACTS[(model, repr(matching[0].config().to_dict()))][0].save(artifact_dir)
            memory[name] = resident_mb(model, name, artifact_dir)
    return memory


# ------------------------------------------------------------------------------------------------- run


def run_model(model: str, samples: int, batch: int, memory_rows: list[str]) -> dict:
    steps = reference.DEFAULT_CALL[model]["num_inference_steps"]
    rows = rows_for(model)
    pipes, not_run = {}, {}
    for row in tqdm(list(rows), desc=f"{model}: set up"):
        pipe = reference.load(model)
        try:
            row.calibration_s = row.apply(pipe, model)
            pipe(**reference.call_kwargs(model, pipe, [0, 1], seed=MEASURE_SEED - 1))  # warm-up, untimed
        except Exception as error:  # a peer that cannot run here says why; ours must run
            if row.kind in ("float", "ours", "rtn", "stack"):
                raise
            not_run[row.name] = f"{type(error).__name__}: {str(error)[:300]}"
            rows.remove(row)
            continue
        pipes[row.name] = pipe
    labels = [i % 10 for i in range(samples)]
    batches = [labels[start:start + batch] for start in range(0, samples, batch)]
    float_row, others = rows[0], rows[1:]
    progress = tqdm(total=len(batches) * len(rows), desc=f"{model}: generate")
    for index, batch_labels in enumerate(batches):
        shift = index % len(others)
        order = [float_row] + others[shift:] + others[:shift] + [float_row]
        times: dict[str, float] = {}
        for position, row in enumerate(order):
            pipe = pipes[row.name]
            kwargs = reference.call_kwargs(model, pipe, batch_labels, seed=MEASURE_SEED + index)
            started = time.perf_counter()
            output = output_array(pipe(**kwargs))
            seconds = time.perf_counter() - started
            if row is float_row:
                times[f"float{position}"] = seconds
                if position == 0:
                    row.outputs.append(output)
                elif not np.array_equal(output, row.outputs[-1]):
                    raise RuntimeError("The float pipeline is not deterministic: the same seeds gave other outputs.")
            else:
                row.seconds.append(seconds)
                row.outputs.append(output)
            progress.update()
        float_seconds = (times["float0"] + times[f"float{len(order) - 1}"]) / 2
        float_row.seconds.append(float_seconds)
        for row in others:
            row.float_seconds.append(float_seconds)
    float_row.float_seconds = list(float_row.seconds)
    progress.close()

    classifier = reference.classifier()
    held_out = split()["held_out"].images
    reference_images = np.concatenate(float_row.outputs)
    fp16 = fp16_bytes(pipes["float"].transformer)
    results = []
    for row in tqdm(rows, desc=f"{model}: metrics"):
        images = np.concatenate(row.outputs)
        speed = Speedup.from_times(row.float_seconds, row.seconds)
        held = transformer_bytes(pipes[row.name].transformer)
        entry = {
            "name": row.name, "kind": row.kind,
            "fid": digit_fid(classifier, images, held_out),
            "class_accuracy": classifier.accuracy(images, labels),
            "psnr_db": psnr(reference_images, images),
            "weight_bytes": held, "weight_bytes_over_fp16": held / fp16,
            "seconds_per_sample": sum(row.seconds) / samples, "speed": speed.to_dict(),
            "speed_text": speed.describe() if row is not float_row else "1.00×",
            "calibration_s": row.calibration_s,
        }
        if row.kind in ("ours", "rtn", "stack"):
            extras = accel.summary(pipes[row.name]).extras["quest"]
            entry["paths_last_call"] = extras.get("paths_last_call")
        results.append(entry)
    memory = measure_memory(model, rows, memory_rows)
    for entry in results:
        entry["resident"] = memory.get(entry["name"])
    return {"model": model, "steps": steps, "guidance_scale": reference.DEFAULT_CALL[model]["guidance_scale"],
            "samples": samples, "batch": batch, "fp16_weight_bytes": fp16, "rows": results, "not_run": not_run}


# ---------------------------------------------------------------------------------------------- report


def _resident(figure: dict | None) -> str:
    return "–" if not figure else f"{figure['pipeline_mb']:.1f} ({figure['process_mb']:.0f})"


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def bars(setting: dict) -> list[str]:
    """The issue's bars, checked against the measured rows (nothing here is a result)."""
    rows = {row["name"]: row for row in setting["rows"]}
    base = rows["float"]
    lines = []

    def check(label: str, ok: bool, detail: str) -> None:
        lines.append(f"- {'met' if ok else '**not met**'}: {label} ({detail})")

    if setting["model"] == "digits-dit":
        w8 = rows["quest-w8a8"]
        check("W8A8 FID within +2% of float", w8["fid"] <= 1.02 * base["fid"], f"{w8['fid']:.2f} vs {base['fid']:.2f}")
        check("W8A8 class accuracy within 1 point", w8["class_accuracy"] >= base["class_accuracy"] - 0.01,
              f"{100 * w8['class_accuracy']:.1f}% vs {100 * base['class_accuracy']:.1f}%")
        w4 = rows["quest-w4a8"]
        check("W4A8 FID within +10%", w4["fid"] <= 1.10 * base["fid"], f"{w4['fid']:.2f} vs {base['fid']:.2f}")
        w4a4 = rows["quest-w4a4"]
        four_bit = [row for row in setting["rows"] if row["name"] == "rtn-w4a4" or (
            row["kind"] == "peer" and ("qint4" in row["name"] or "nf4" in row["name"]))]
        for other in four_bit:
            check(f"W4A4 better FID and PSNR than {other['name']}",
                  w4a4["fid"] < other["fid"] and w4a4["psnr_db"] > other["psnr_db"],
                  f"FID {w4a4['fid']:.2f} vs {other['fid']:.2f}, PSNR {w4a4['psnr_db']:.2f} vs "
                  f"{other['psnr_db']:.2f} dB")
        check("4-bit weight bytes ≤ 1/3.5 of fp16", w4["weight_bytes_over_fp16"] <= 1 / 3.5,
              f"{w4['weight_bytes_over_fp16']:.3f} of fp16")
        minutes = max(rows[name]["calibration_s"] for name in ("quest-w8a8", "quest-w4a8", "quest-w4a4")) / 60
        check("calibration + finetuning ≤ 15 minutes", minutes <= 15, f"longest {minutes:.1f} min")
    else:
        w8 = rows["quest-w8a8"]
        check("moving-digits W8A8 per-frame accuracy within 2 points", w8["class_accuracy"] >=
              base["class_accuracy"] - 0.02, f"{100 * w8['class_accuracy']:.1f}% vs "
              f"{100 * base['class_accuracy']:.1f}%")
    return lines


READING = (
    "Reading the table: PSNR against the float output of the same seeds is the fidelity figure. The digit FID "
    "falls as sample diversity rises (on this model it falls from 16.7 at guidance 1.5 to 8.2 at guidance 1.0, "
    "model card), and quantization error adds diversity, so a row can read a lower FID than float while "
    "departing further from it: a FID below float's is not a gain in quality. Resident memory: the pipeline's part "
    "is the process's VmRSS after loading and quantizing minus VmRSS after its imports (both after malloc_trim); "
    "ours load their saved artifact with the float weights released.")


def markdown(settings: list[dict], machine: dict) -> str:
    lines = ["# Quantization: QuEST vs round-to-nearest and the peers", "",
             "Generated by `python benchmarks/quantization.py` (module docstring: rows, columns, protocol). "
             f"Machine: {machine['processor']}, {machine['threads']} threads, torch {machine['torch']}; "
             f"measured {machine['date']}. Random weights prove plumbing only: every figure here is a trained "
             "reference model's.", ""]
    for setting in settings:
        lines += [f"## {setting['model']}, {setting['steps']} steps, guidance {setting['guidance_scale']}, "
                  f"{setting['samples']} samples", "",
                  "| row | FID | class acc. | PSNR vs float | weight bytes | / fp16 | "
                  "resident MiB: pipeline (process) | s / sample | speed vs float | calibration s | "
                  "integer-matmul forwards |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in setting["rows"]:
            paths = row.get("paths_last_call") or {}
            integer = sum(v for k, v in paths.items() if k.startswith("int8"))
            share = f"{integer / sum(paths.values()):.0%}" if paths else "–"
            lines.append(
                f"| {row['name']} | {row['fid']:.2f} | {100 * row['class_accuracy']:.1f}% | "
                f"{_fmt(row['psnr_db'], '.2f')} | {row['weight_bytes'] / 2**20:.2f} MiB | "
                f"{row['weight_bytes_over_fp16']:.3f} | {_resident(row.get('resident'))} | "
                f"{row['seconds_per_sample']:.3f} | {row['speed_text']} | {_fmt(row['calibration_s'], '.0f')} | "
                f"{share} |")
        lines += ["", READING]
        if setting.get("memory_measured"):
            lines += ["", f"Resident memory re-measured {setting['memory_measured']} "
                          "(`python benchmarks/quantization.py --memory-only`)."]
        if setting["not_run"]:
            lines += ["", "Not run here:"] + [f"- {name}: {why}" for name, why in setting["not_run"].items()]
        lines += ["", "Bars:"] + bars(setting) + [""]
    return "\n".join(lines)


def plot(settings: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.5), squeeze=False)
    colours = {"float": "black", "ours": "tab:red", "rtn": "tab:grey", "peer": "tab:blue", "stack": "tab:purple"}
    for axis, setting in zip(axes[0], settings):
        for row in setting["rows"]:
            axis.scatter(row["weight_bytes"] / 2**20, row["fid"], color=colours[row["kind"]])
            axis.annotate(row["name"], (row["weight_bytes"] / 2**20, row["fid"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
        axis.set_xlabel("transformer weight bytes held (MiB)")
        axis.set_ylabel("FID (digit-classifier features; lower is better)")
        axis.set_title(f"{setting['model']}, {setting['steps']} steps, {setting['samples']} samples")
    figure.tight_layout()
    buffer = path.with_suffix(".partial.png")
    figure.savefig(buffer, dpi=110)
    buffer.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=list(reference.MODELS))
    parser.add_argument("--samples", type=int, default=None, help="default 500 (digits-dit), 60 (moving-digits)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure only the resident memory (calibrating the QuEST rows it needs) and update the "
                             "rows of the results already in --out")
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        _rss_child(*args.rss_child)
        return 0
    if args.memory_only:
        return memory_only(args.out, args.model)
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)  # QuEST's finetuning turns gradients on where it needs them
    allocator = timing_allocator()
    settings = []
    for model in args.model or ["digits-dit", "moving-digits"]:
        samples = args.samples or (500 if model == "digits-dit" else 60)
        batch = min(args.batch, 10 if model == "moving-digits" else args.batch)
        settings.append(run_model(model, samples, batch, MEMORY_ROWS))
        write(args.out, settings, allocator)  # after each model: a later failure keeps what was measured
    print(markdown(settings, machine_description(allocator)))
    return 0


def memory_only(out: Path, models: list[str] | None) -> int:
    """Re-measure the resident-memory column of ``out/quantization.json`` (the module docstring's protocol)."""
    results = json.loads((out / "quantization.json").read_text())
    for setting in results["settings"]:
        for entry in setting["rows"]:
            entry.pop("resident_mb", None)  # an earlier protocol's figure
        if models and setting["model"] not in models:
            continue
        model, rows = setting["model"], rows_for(setting["model"])
        for row in rows:
            if row.config is not None and row.name in MEMORY_ROWS:
                row.apply(reference.load(model), model)  # calibrates; measure_memory saves the cached artifact
        memory = measure_memory(model, rows, MEMORY_ROWS)
        for entry in setting["rows"]:
            entry.pop("resident_mb", None)
            entry["resident"] = memory.get(entry["name"])
        setting["memory_measured"] = time.strftime("%Y-%m-%d", time.gmtime())
    atomic_write(out / "quantization.json", json.dumps(results, indent=1))
    atomic_write(out / "quantization.md", markdown(results["settings"], results["machine"]))
    print(markdown(results["settings"], results["machine"]))
    return 0


def machine_description(allocator: str) -> dict:
    return {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "allocator": allocator, "date": time.strftime("%Y-%m-%d", time.gmtime())}


def write(out: Path, settings: list[dict], allocator: str) -> None:
    machine = machine_description(allocator)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "quantization.json", json.dumps({"machine": machine, "settings": settings}, indent=1))
    atomic_write(out / "quantization.md", markdown(settings, machine))
    plot(settings, out / "quantization.png")


if __name__ == "__main__":
    sys.exit(main())
