"""The eval harness: generate the same seeded samples with several methods, then measure them.

    accel-eval --model digits-dit --methods baseline,delta-dit,bac --num-images 500 --steps 20 --out runs/x
    accelerate launch --multi_gpu --num_processes 2 -m accel.eval.harness ...    # the same, split over 2 processes

Input ``i`` is the condition ``i`` (class ``i % classes`` for class-conditional models unless ``--classes`` lists
them, else prompt ``i % len(prompts)`` from ``--prompts``) generated from seed ``--seed + i``, so every method sees
the same noise. Inputs are grouped in fixed batches of ``--batch-size``; batch ``k`` runs on process
``k % num_processes``, so the split changes nothing in what is computed. Within a batch the methods run one after
the other, their order rotating from batch to batch, so machine drift hits every method alike.

Before the timed batches each method makes an untimed call on a full batch in which its own peak memory is
measured (``{out}/memory.json``, one entry per method): on CUDA ``torch.cuda.max_memory_allocated`` reset
before it, on Linux CPUs the rise of the peak resident set size (VmHWM, reset through ``/proc/self/clear_refs``)
over the resident set just before it, after ``malloc_trim`` handed freed memory back. It follows a one-sample
warm-up of every method (untimed too), so one-time costs (thread pools, lazy initialisation) land in no method's
figure.

Files: ``{out}/{method}/{index:06d}.png`` (an image, or a video's frames side by side; ``.gif`` next to it for
videos), written atomically; ``{out}/{method}/.batches/{k:06d}.json`` with the batch's timing and
``accel.summary`` figures; ``{out}/run.json`` with the settings, the steps and guidance as resolved, and the
machine (hardware, threads, versions, git commit). Progress goes to stderr: status lines for every phase and
bars for generation and the FID bootstrap. A rerun skips batches whose files are all present and readable and
regenerates the rest; metrics are always recomputed from what is on disk (``accel.eval.report``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import accel
from accel.io import atomic_write
from accel.registry import parse_method_list, resolve, spec_for

from .metrics import output_array
from .models import ModelHandle, load_model
from .samples import (
    EvalSettings,
    batches,
    conditions,
    read_prompts,
    read_sample,
    sample_path,
    status,
    strict_json,
    write_sample,
)

RUN_FORMAT = "accel.eval.run/1"
MEMORY_FILE = "memory.json"  # {method: {"peak_mb", "measure", ...}}, read by accel.eval.report
CALIBRATION_SEED_OFFSET = 1_000_000  # calibration inputs use seeds no measured input uses


# --------------------------------------------------------------------------------------------- inputs


# --------------------------------------------------------------------------------------------- checks


def method_configs(method: str) -> list:
    if method == "baseline":
        return []
    return resolve([name.strip() for name in method.split("+")])


def check_settings(settings: EvalSettings, *, progress: bool = False) -> ModelHandle:
    """Every check that can fail, before any generation starts. Returns the model handle."""
    if settings.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {settings.num_images}.")
    if settings.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {settings.batch_size}.")
    if settings.steps is not None and settings.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {settings.steps}.")
    if settings.guidance_scale is not None and not (math.isfinite(settings.guidance_scale)
                                                    and settings.guidance_scale >= 0):
        raise ValueError(f"--guidance-scale must be a finite number >= 0 (1 turns guidance off), got "
                         f"{settings.guidance_scale}.")
    largest_seed = 2**63 - 1 - CALIBRATION_SEED_OFFSET - settings.num_images  # torch seeds are 64-bit
    if not 0 <= settings.seed <= largest_seed:
        raise ValueError(f"--seed must be in 0..{largest_seed} (input i uses seed SEED + i), got {settings.seed}.")
    status(f"loading {settings.model}", progress)
    model = load_model(settings.model)
    if model.conditioning == "prompt_embeds":
        raise ValueError(f"{settings.model} takes prompt_embeds only; the eval harness needs prompts.")
    from accel.pipelines.adapters import adapter_for

    family = None
    for method in settings.methods:
        for config in method_configs(method):
            spec = spec_for(config)
            if family is None:
                status(f"building {settings.model} once to check which methods support it", progress)
                family = adapter_for(model.build()).name
            if not spec.supports(family):
                raise ValueError(f"{spec.name!r} does not support {settings.model} (family {family!r}); supported: "
                                 f"{', '.join(spec.families or ())}.")
    if model.conditioning == "prompt":
        if settings.prompts_file is None and not settings.prompts:
            raise ValueError(f"{settings.model} is prompt-conditioned: pass --prompts FILE (.txt, .json or .csv).")
        if settings.prompts_file is not None:
            settings.prompts = read_prompts(settings.prompts_file)
    elif settings.prompts_file is not None:
        raise ValueError(f"{settings.model} is class-conditional: use --classes, not --prompts.")
    if settings.classes is not None:
        limit = model.num_classes or 10
        if not settings.classes or any(not 0 <= c < limit for c in settings.classes):
            raise ValueError(f"--classes must list class ids in 0..{limit - 1}, got {settings.classes}.")
    from .report import check_metric_settings

    check_metric_settings(settings, model)
    out = Path(settings.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"Cannot write to the output folder {out}: {error}.") from None
    previous = out / "run.json"
    if previous.is_file():
        try:
            earlier = json.loads(previous.read_text())
        except json.JSONDecodeError:
            earlier = None
        if earlier is not None and _generation_key(earlier.get("settings", {})) != _generation_key(asdict(settings)):
            raise ValueError(
                f"{out} holds a run with other generation settings ({previous}); use a new --out folder, or the "
                "same model, steps, guidance, seed, batch size and inputs to resume it."
            )
    return model


def _generation_key(settings: dict) -> tuple:
    return tuple(json.dumps(settings.get(key), sort_keys=True) for key in
                 ("model", "steps", "guidance_scale", "batch_size", "seed", "classes", "prompts"))


# --------------------------------------------------------------------------------------------- files


# --------------------------------------------------------------------------------------------- generation


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    except OSError:
        return False
    return True


def measure_peak_memory(call, device: torch.device | str = "cpu") -> dict:
    """Run ``call()`` once and measure the memory it needed on top of what was in use before it:

    * CUDA: ``torch.cuda.max_memory_allocated`` (its peak reset first) minus ``memory_allocated`` before the call;
    * Linux CPU: ``malloc_trim`` hands freed memory back, the peak resident set size is reset to the current one,
      and the result is the peak (VmHWM) after the call minus the resident set size (VmRSS) before it.

    Returns ``{"peak_mb", "measure", "before_mb"}``; ``peak_mb`` is None where neither works."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": (peak - before) / 2**20, "measure": "cuda", "before_mb": before / 2**20}
    from .allocator import release_free_memory

    release_free_memory()
    if not _reset_peak_rss() or _proc_status_mb("VmRSS") is None:
        call()
        return {"peak_mb": None, "measure": "unavailable", "before_mb": None}
    before = _proc_status_mb("VmRSS")
    call()
    peak = _proc_status_mb("VmHWM")
    return {"peak_mb": max(0.0, peak - before), "measure": "rss-increase", "before_mb": before}


def _device_of(pipe) -> torch.device:
    return torch.device(getattr(pipe, "device", "cpu"))


def build_method(model: ModelHandle, method: str, settings: EvalSettings, calibration_conditions: list):
    """A fresh pipeline with ``method`` applied; methods with an offline pass are calibrated on seeds no measured
    input uses."""
    pipe = model.build()
    steps = settings.steps or model.steps
    guidance = settings.guidance_scale if settings.guidance_scale is not None else model.guidance_scale
    seeds = [settings.seed + CALIBRATION_SEED_OFFSET + i for i in range(len(calibration_conditions))]
    kwargs = model.call_kwargs(pipe, calibration_conditions, seeds, steps, guidance)
    del kwargs["num_inference_steps"]
    return accel.wrap_calibrated(pipe, method_configs(method), kwargs, num_inference_steps=steps)


def count_flops(pipe, model: ModelHandle, condition, settings: EvalSettings) -> float | None:
    """FLOPs of one single-sample call (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    steps = settings.steps or model.steps
    guidance = settings.guidance_scale if settings.guidance_scale is not None else model.guidance_scale
    kwargs = model.call_kwargs(pipe, [condition], [settings.seed], steps, guidance)
    counter = FlopCounterMode(display=False)
    with counter:
        pipe(**kwargs)
    return float(counter.get_total_flops())


def remove_stale_temporaries(out: Path, methods: list[str]) -> None:
    """Temporary files a killed run left behind (``atomic_write`` names them ``.<name>.<random>``)."""
    for method in methods:
        for folder in (out / method, out / method / ".batches"):
            for path in folder.glob(".*.*"):
                if path.is_file():
                    path.unlink(missing_ok=True)


def generate(settings: EvalSettings, model: ModelHandle, *, process_index: int = 0, num_processes: int = 1,
             progress: bool = True) -> dict[str, int]:
    """Generate this process's share of every method's samples; returns how many batches each generated."""
    from tqdm.auto import tqdm

    out = Path(settings.out)
    all_conditions = conditions(settings, model)
    steps = settings.steps or model.steps
    guidance = settings.guidance_scale if settings.guidance_scale is not None else model.guidance_scale
    frames = None
    mine = [(k, batch) for k, batch in enumerate(batches(settings)) if k % num_processes == process_index]

    def done(method: str, batch: list[int]) -> bool:
        record = out / method / ".batches" / f"{batch[0] // settings.batch_size:06d}.json"
        if not record.is_file():
            return False
        try:
            written = json.loads(record.read_text())
        except json.JSONDecodeError:
            return False
        frames, shape = written.get("frames"), written.get("sample_shape")
        return all(read_sample(sample_path(out, method, i), frames, shape) is not None for i in batch)

    todo = {method: [(k, b) for k, b in mine if not done(method, b)] for method in settings.methods}
    total = sum(map(len, todo.values()))
    generated = {method: 0 for method in settings.methods}
    if total == 0:
        return generated
    pipes = {}
    for method in settings.methods:
        if todo[method]:
            verb = "building" if method == "baseline" else f"building and calibrating ({settings.batch_size} inputs)"
            status(f"{verb} {method}", progress)
            pipes[method] = build_method(model, method, settings, all_conditions[: settings.batch_size])
    for method, pipe in pipes.items():  # warm-up, not timed
        status(f"warm-up call of {method}", progress)
        pipe(**model.call_kwargs(pipe, all_conditions[:1], [settings.seed], steps, guidance))
    first = batches(settings)[0]
    memory_file = out / MEMORY_FILE
    try:
        memory = json.loads(memory_file.read_text()) if memory_file.is_file() else {}
    except json.JSONDecodeError:
        memory = {}
    # untimed, after every warm-up (one-time costs paid): each method's own peak memory on one full batch
    for method, pipe in pipes.items():
        if process_index != 0 or method in memory:
            continue
        status(f"measuring {method}'s peak memory on one untimed batch of {len(first)}", progress)
        kwargs = model.call_kwargs(pipe, [all_conditions[i] for i in first], [settings.seed + i for i in first],
                                   steps, guidance)
        measured = measure_peak_memory(functools.partial(pipe, **kwargs), _device_of(pipe))
        memory[method] = {**measured, "batch_size": len(first)}
        atomic_write(memory_file, strict_json(memory, indent=1))
    flops_file = out / ".flops.json"
    if settings.flops and process_index == 0 and not flops_file.is_file():
        flops = {}
        for method, pipe in pipes.items():
            status(f"counting the FLOPs of one {method} call", progress)
            flops[method] = count_flops(pipe, model, all_conditions[0], settings)
        atomic_write(flops_file, strict_json(flops))
    bar = tqdm(total=total * 1, desc=f"generate [{process_index + 1}/{num_processes}]", unit="batch",
               disable=not progress)
    for position, (k, batch) in enumerate(mine):
        shift = position % len(settings.methods)
        order = settings.methods[shift:] + settings.methods[:shift]
        for method in order:
            if (k, batch) not in todo[method]:
                continue
            pipe = pipes[method]
            kwargs = model.call_kwargs(pipe, [all_conditions[i] for i in batch], [settings.seed + i for i in batch],
                                       steps, guidance)
            cuda = _device_of(pipe).type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            samples = output_array(pipe(**kwargs))
            seconds = time.perf_counter() - started
            frames = samples.shape[1] if samples.ndim == 5 else None
            for index, sample in zip(batch, samples):
                write_sample(sample_path(out, method, index), sample)
            summary = accel.summary(pipe) if accel.is_wrapped(pipe) else None
            record = {
                "batch": k, "indices": batch, "seconds": seconds, "seconds_per_sample": seconds / len(batch),
                "frames": frames, "sample_shape": list(samples.shape[1:]),
                "process": process_index,
                "blocks_computed": summary.blocks_computed_share if summary else None,
                "branches_computed": summary.branches_computed_share if summary else None,
                "attention_density": summary.attention_density if summary else None,
            }
            if cuda:
                record["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
            atomic_write(out / method / ".batches" / f"{k:06d}.json", strict_json(record))
            generated[method] += 1
            bar.update()
    bar.close()
    return generated


# --------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-dit",
                        help="reference model name, tiny:<family>, or a local diffusers pipeline folder")
    parser.add_argument("--methods", default="baseline,delta-dit,bac",
                        help="comma-separated: baseline, preset names, stacks with '+' (bac+vmoba)")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="input i uses seed SEED + i")
    parser.add_argument("--classes", default=None, help="class ids to cycle through, e.g. 3,7 (class models)")
    parser.add_argument("--prompts", default=None, help="prompts file: .txt (one per line), .json or .csv")
    parser.add_argument("--fid", default="auto", choices=("auto", "digit", "inception", "none"),
                        help="FID features: auto = digit classifier on reference models, Inception if weights given")
    parser.add_argument("--inception-weights", default=None,
                        help="local pt_inception-2015-12-05 weights for Inception FID (needs torch-fidelity)")
    parser.add_argument("--fid-reference", default=None, help="folder of real images for Inception FID")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name for CLIP score")
    parser.add_argument("--clip-weights", default=None, help="local open_clip weights file for CLIP score")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    return parser


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    classes = None
    if args.classes is not None:
        try:
            classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--classes must be comma-separated integers, got {args.classes!r}.") from None
    return EvalSettings(
        model=args.model, methods=[label for label, _ in parse_method_list(args.methods)],
        num_images=args.num_images, out=args.out,
        steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size, seed=args.seed,
        classes=classes, prompts_file=args.prompts, fid=args.fid, inception_weights=args.inception_weights,
        fid_reference=args.fid_reference, clip_model=args.clip_model, clip_weights=args.clip_weights,
        flops=not args.no_flops,
    )


def run(settings: EvalSettings, *, progress: bool = True) -> dict | None:
    """Check, generate (this process's share), then on the main process compute the metrics and write reports.
    Returns the results on the main process, ``None`` on the others."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    # every process checks, so a bad setting stops all of them
    model = check_settings(settings, progress=progress and state.is_main_process)
    out = Path(settings.out)
    if state.is_main_process:
        from .report import environment, resolved_call

        atomic_write(out / "run.json", strict_json({"format": RUN_FORMAT, "settings": asdict(settings),
                                                    "resolved": resolved_call(settings, model),
                                                    "environment": environment()}, indent=1))
        remove_stale_temporaries(out, settings.methods)
    state.wait_for_everyone()
    with torch.no_grad():
        generate(settings, model, process_index=state.process_index, num_processes=state.num_processes,
                 progress=progress)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    from .report import compute_results, write_reports

    with torch.no_grad():
        results = compute_results(settings, model, progress=progress)
    write_reports(results, out, progress=progress)
    status(f"done: {out / 'report.md'}", progress)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        results = run(settings)
    except ValueError as error:
        print(f"accel-eval: {error}", file=sys.stderr)
        return 2
    if results is not None:
        print((Path(settings.out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

