"""Metrics and reports of an eval run, always recomputed from the samples on disk.

Per method: FID (torchmetrics ``FrechetInceptionDistance``; digit-classifier features on the reference models,
Inception when local weights are given) with a seeded bootstrap 95% interval (generated samples resampled with
replacement), class accuracy (class-conditional reference models) or CLIP score (open-clip-torch, prompt models,
when local weights are given), PSNR / SSIM (torchmetrics) and LPIPS (when its backbone weights are in the torch hub
cache) against the baseline on the same seeds, latency per sample (median and spread over batches), the speedup
(median and spread of the per-batch ratios baseline / method, methods interleaved batch by batch), the method's
own peak memory (measured per method by the harness), FLOPs per sample, and the ``accel.summary`` shares. Every
FID records its library, version, feature extractor and N.

Writes ``results.json`` (strict JSON: ``null`` where a number is not finite, e.g. the baseline's PSNR against
itself), ``results.csv``, ``report.md`` (settings as resolved, hardware, versions, the table, the pictures),
``speedup-vs-fid.png``, ``speedup-vs-psnr.png``, ``grid.png`` (rows methods and their difference to the baseline,
columns seeds) and, for videos, ``frames.png`` (one seed, every frame) and ``side-by-side.gif``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel.io import atomic_write

from .metrics import psnr, ssim
from .models import ModelHandle
from .samples import EvalSettings, conditions, finite_or_none, read_sample, sample_path, status, strict_json
from .timing import Speedup, Spread

DIGIT_FEATURES = 64
INCEPTION_FEATURES = 2048
BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
MEMORY_FILE = "memory.json"  # {out}/memory.json: {method: peak memory}, written by the harness


def _fid_kind(settings: EvalSettings, model: ModelHandle) -> str:
    if settings.fid == "auto":
        if model.digit_metrics:
            return "digit"
        return "inception" if settings.inception_weights else "none"
    return settings.fid


def check_metric_settings(settings: EvalSettings, model: ModelHandle) -> None:
    """Raise ``ValueError`` before generation for metric settings that cannot work."""
    kind = _fid_kind(settings, model)
    frames = 1
    if model.video:
        frames = int((model.extra_call or {}).get("num_frames", 1))
    if kind == "digit":
        if not model.digit_metrics:
            raise ValueError("--fid digit needs a digit reference model (digits-dit, moving-digits).")
        if settings.num_images * frames <= DIGIT_FEATURES:
            raise ValueError(f"FID on the digit classifier's {DIGIT_FEATURES}-d features needs more than "
                             f"{DIGIT_FEATURES} samples; --num-images {settings.num_images} is too few "
                             "(or pass --fid none).")
    if kind == "inception":
        if not settings.inception_weights or not Path(settings.inception_weights).is_file():
            raise ValueError(
                "Inception FID needs its weights on disk: download pt_inception-2015-12-05-6726825d.pth (the "
                "torch-fidelity / torchmetrics FID Inception) elsewhere and pass --inception-weights PATH; "
                "or --fid none."
            )
        if not settings.fid_reference or not Path(settings.fid_reference).is_dir():
            raise ValueError("Inception FID needs --fid-reference FOLDER with real images to compare against.")
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ValueError("Inception FID needs torch-fidelity: pip install torch-fidelity.") from None
    if settings.clip_weights is not None:
        if model.conditioning != "prompt":
            raise ValueError("CLIP score needs a prompt-conditioned model; class models report class accuracy.")
        if not Path(settings.clip_weights).is_file():
            raise ValueError(f"--clip-weights {settings.clip_weights} does not exist.")


# --------------------------------------------------------------------------------------------- loading


def load_samples(settings: EvalSettings, method: str) -> tuple[np.ndarray | None, list[dict]]:
    """Every sample of ``method`` on disk, in index order (``None`` if any is missing), and its batch records."""

    out = Path(settings.out)
    records = []
    for path in sorted((out / method / ".batches").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    frames = next((r.get("frames") for r in records if r.get("frames")), None)
    shape = next((r["sample_shape"] for r in records if r.get("sample_shape")), None)
    samples = [read_sample(sample_path(out, method, index), frames, shape) for index in range(settings.num_images)]
    if any(sample is None for sample in samples):
        return None, records
    return np.stack(samples), records


# --------------------------------------------------------------------------------------------- metrics


def lpips_available() -> bool:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return any(hub.glob("alexnet-*.pth"))


def lpips(reference: np.ndarray, other: np.ndarray) -> float:
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

    def frames(array):
        array = torch.from_numpy(np.asarray(array, np.float32))
        array = array.reshape(-1, *array.shape[-3:]).permute(0, 3, 1, 2)
        return array.repeat(1, 3 // array.shape[1], 1, 1) * 2 - 1

    return float(learned_perceptual_image_patch_similarity(frames(other), frames(reference), net_type="alex"))


def _features(metric, images: torch.Tensor) -> torch.Tensor:
    """What ``metric.update`` feeds into its sums: the feature extractor's output, float64 [N, D]."""
    if metric.normalize and not metric.used_custom_model:
        images = (images * 255).byte()
    features = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            batch = metric.inception(images[start : start + 256]).double()
            features.append(batch if batch.dim() == 2 else batch.reshape(len(images[start : start + 256]), -1))
    return torch.cat(features)


class _Reference:
    """A reference feature set, prepared once for many FIDs against it: the mean, the covariance's trace and its
    PSD square root ``A``, so tr sqrt(C_r C_g) = sum sqrt(eig(A C_g A)) (a symmetric eigenproblem: fast, stable)."""

    def __init__(self, features: np.ndarray) -> None:
        features = np.asarray(features, np.float64)
        self.mean = features.mean(0)
        covariance = np.cov(features, rowvar=False)
        self.trace = float(np.trace(covariance))
        values, vectors = np.linalg.eigh(covariance)
        self.root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    def fid(self, generated: np.ndarray) -> float:
        generated = np.asarray(generated, np.float64)
        covariance = np.cov(generated, rowvar=False)
        middle = np.linalg.eigvalsh(self.root @ covariance @ self.root)
        return float(((self.mean - generated.mean(0)) ** 2).sum() + self.trace + np.trace(covariance)
                     - 2 * np.sqrt(np.clip(middle, 0, None)).sum())


def fid_from_features(real, generated) -> float:
    """FID between two feature sets [N, D]: torchmetrics' formula (unbiased covariances), computed in float64."""
    return _Reference(real).fid(generated)


def bootstrap_interval(real, generated, per_sample: int, *, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE, progress: bool = False,
                       label: str = "") -> dict[str, Any]:
    """Bootstrap interval of the FID: the generated samples (``per_sample`` feature rows each: a video's frames stay
    together) are drawn with replacement ``resamples`` times from a fixed seed (the same draws for every method)
    and the FID recomputed against the fixed reference set.

    Drawing with replacement repeats samples, which shrinks the covariance's rank and raises FID (a lot when N is
    near the feature dimension), so the raw percentile interval can lie wholly above the point value. The interval
    reported (``low``, ``high``) is the percentile interval shifted back by that bias (the bootstraps' mean minus
    the point value); the raw one is kept as ``percentile_low`` / ``percentile_high``."""
    from tqdm.auto import tqdm

    generated = np.asarray(generated, np.float64)
    count = len(generated) // per_sample
    grouped = generated.reshape(count, per_sample, -1)
    reference = _Reference(real)
    point = reference.fid(generated)
    rng = np.random.default_rng(seed)
    values = []
    for _ in tqdm(range(resamples), desc=f"FID bootstrap {label}".strip(), leave=False, disable=not progress):
        values.append(reference.fid(grouped[rng.integers(0, count, count)].reshape(count * per_sample, -1)))
    tail = (1 - confidence) / 2 * 100
    low, high = (float(v) for v in np.percentile(values, [tail, 100 - tail]))
    bias = float(np.mean(values)) - point
    return {"low": max(0.0, low - bias), "high": high - bias, "percentile_low": low, "percentile_high": high,
            "bias": bias, "confidence": confidence, "resamples": resamples, "seed": seed,
            "kind": "bias-corrected percentile bootstrap over generated samples"}


def fid(settings: EvalSettings, model: ModelHandle, samples: np.ndarray, *, progress: bool = False,
        label: str = "") -> dict[str, Any] | None:
    import torchmetrics
    from torchmetrics.image.fid import FrechetInceptionDistance

    kind = _fid_kind(settings, model)
    if kind == "none":
        return None
    per_sample = samples.shape[1] if samples.ndim == 5 else 1
    if kind == "digit":
        from accel.pipelines.classifier import to_digit_batch
        from accel.pipelines.digits import split
        from accel.pipelines.reference import classifier

        from .metrics import digit_fid

        real = split()["held_out"].images
        value = digit_fid(classifier(), samples, real)
        metric = FrechetInceptionDistance(feature=classifier().model, normalize=True).double()
        real_features = _features(metric, to_digit_batch(real)).numpy()
        generated_features = _features(metric, to_digit_batch(samples)).numpy()
        result = {"value": value, "library": f"torchmetrics {torchmetrics.__version__}",
                  "features": "digit classifier, 64-d penultimate layer (accel.pipelines.reference.classifier())",
                  "n_generated": len(samples) * per_sample,
                  "reference": f"{len(real)} held-out digits (sklearn load_digits)"}
    else:
        from PIL import Image

        metric = FrechetInceptionDistance(feature=INCEPTION_FEATURES, normalize=True,
                                          feature_extractor_weights_path=settings.inception_weights)
        real_paths = sorted(p for p in Path(settings.fid_reference).iterdir() if p.suffix.lower() in (".png", ".jpg"))
        real_images = []
        for path in real_paths:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), np.float32) / 255
            real_images.append(torch.from_numpy(array).permute(2, 0, 1))
        real_features = torch.cat([_features(metric, image[None]) for image in real_images]).numpy()
        images = samples.reshape(-1, *samples.shape[-3:])
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
        generated_features = _features(metric, tensor.repeat(1, 3 // tensor.shape[1], 1, 1)).numpy()
        result = {"value": fid_from_features(real_features, generated_features),
                  "library": f"torchmetrics {torchmetrics.__version__}",
                  "features": f"Inception v3 pool3 ({settings.inception_weights})", "n_generated": len(images),
                  "reference": f"{len(real_paths)} images in {settings.fid_reference}"}
    result["ci95"] = bootstrap_interval(real_features, generated_features, per_sample, progress=progress,
                                        label=label)
    return result


def clip_score(settings: EvalSettings, samples: np.ndarray, prompts: list[str]) -> float:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(settings.clip_model, pretrained=settings.clip_weights)
    tokenizer = open_clip.get_tokenizer(settings.clip_model)
    from PIL import Image

    model.eval()
    scores = []
    with torch.no_grad():
        for sample, prompt in zip(samples, prompts):
            frames = sample if sample.ndim == 4 else sample[None]
            pictures = torch.stack([preprocess(Image.fromarray((np.repeat(f, 3 // f.shape[-1], -1) * 255)
                                                               .astype(np.uint8))) for f in frames])
            image = torch.nn.functional.normalize(model.encode_image(pictures), dim=-1)
            text = torch.nn.functional.normalize(model.encode_text(tokenizer([prompt])), dim=-1)
            scores.append(float((100 * image @ text.T).clamp_min(0).mean()))
    return float(np.mean(scores))


def environment() -> dict[str, Any]:
    """Where the numbers come from: hardware, threads, library versions, the accel git commit (when available)."""
    import os
    import platform
    import subprocess

    import diffusers

    import accel

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    commit = None
    try:
        root = Path(accel.__file__).resolve().parents[1]
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        if commit:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable, "gpu": gpu,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "accel": accel.__version__,
            "git_commit": commit}


def resolved_call(settings: EvalSettings, model: ModelHandle) -> dict[str, Any]:
    """The steps and guidance actually used, and whether they were given or the model's defaults."""
    return {"steps": settings.steps or model.steps,
            "steps_source": "--steps" if settings.steps else "the model's default",
            "guidance_scale": settings.guidance_scale if settings.guidance_scale is not None else model.guidance_scale,
            "guidance_source": "--guidance-scale" if settings.guidance_scale is not None else "the model's default"}


def _read_memory(out: Path, method: str) -> dict | None:
    try:
        return json.loads((out / MEMORY_FILE).read_text()).get(method)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def compute_results(settings: EvalSettings, model: ModelHandle, *, progress: bool = True) -> dict[str, Any]:
    out = Path(settings.out)
    flops_file = out / ".flops.json"
    flops = json.loads(flops_file.read_text()) if flops_file.is_file() else {}
    labels = conditions(settings, model)
    baseline = None
    if "baseline" in settings.methods:
        baseline, _ = load_samples(settings, "baseline")
    per_batch: dict[str, dict[int, float]] = {}
    rows = []
    for number, method in enumerate(settings.methods, 1):
        status(f"metrics {number}/{len(settings.methods)}: {method} (loading samples)", progress)
        samples, records = load_samples(settings, method)
        row: dict[str, Any] = {"method": method, "samples": settings.num_images}
        if samples is None:
            row["error"] = "samples missing on disk: rerun the same command to finish generating them"
            rows.append(row)
            continue
        per_batch[method] = {int(r["batch"]): float(r["seconds_per_sample"]) for r in records}
        if per_batch[method]:
            latency = Spread.of(per_batch[method].values())
            row["latency_s_per_sample"] = latency.median
            row["latency_spread"] = latency.to_dict()
        memory = _read_memory(out, method)
        row["peak_memory_mb"] = memory.get("peak_mb") if memory else None
        row["memory_measure"] = memory.get("measure") if memory else None
        row["flops_per_sample"] = flops.get(method)
        for key in ("blocks_computed", "branches_computed", "attention_density"):
            values = [r[key] for r in records if r.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
        if model.digit_metrics:
            from accel.pipelines.reference import classifier

            row["class_accuracy"] = classifier().accuracy(samples, labels)
        elif settings.clip_weights:
            status(f"metrics: {method}: CLIP score", progress)
            row["clip_score"] = clip_score(settings, samples, labels)
        if _fid_kind(settings, model) != "none":
            status(f"metrics: {method}: FID features and {BOOTSTRAP_RESAMPLES} bootstrap resamples", progress)
        row["fid"] = fid(settings, model, samples, progress=progress, label=method)
        if baseline is not None:
            row["psnr_db"] = psnr(baseline, samples)
            row["identical_to_baseline"] = math.isinf(row["psnr_db"])
            row["ssim"] = ssim(baseline, samples)
            row["lpips"] = lpips(baseline, samples) if lpips_available() else None
        rows.append(row)
    reference = per_batch.get("baseline")
    for row in rows:
        mine = per_batch.get(row["method"])
        if not reference or not mine:
            continue
        common = sorted(set(reference) & set(mine))
        if not common:
            continue
        speedup = Speedup.from_times([reference[k] for k in common], [mine[k] for k in common])
        row["speedup"] = speedup.median
        row["speedup_spread"] = speedup.to_dict()
    run_file = out / "run.json"
    try:
        run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    except json.JSONDecodeError:
        run = {}
    env = run.get("environment") or environment()
    return {
        "settings": {key: value for key, value in vars(settings).items()},
        "resolved": resolved_call(settings, model),
        "model": settings.model,
        "environment": env,
        "versions": {"accel": env["accel"], "torch": env["torch"], "diffusers": env["diffusers"]},
        "computed": time.strftime("%Y-%m-%d %H:%M:%S"),
        "lpips": "computed" if lpips_available() else "not computed: no AlexNet weights in the torch hub cache",
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------- reports


MEMORY_TITLES = {"rss-increase": "peak RSS rise MB", "cuda": "peak CUDA alloc MB"}
MEMORY_NOTES = {
    "rss-increase": "the rise of the process's peak resident set size (Linux VmHWM, reset through "
                    "/proc/self/clear_refs) over its resident set size just before one untimed batch of the method, "
                    "after glibc malloc_trim returned freed memory; measured per method, so it shows the method's "
                    "own working memory (activations, caches), not the weights every method shares",
    "cuda": "torch.cuda.max_memory_allocated during one untimed batch of the method, reset before it (per method), "
            "minus what was allocated before it",
}


def _cell(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


COLUMNS = [("method", "method", "s"), ("speedup", "speedup", ".2f"), ("latency_s_per_sample", "s / sample", ".4f"),
           ("fid", "FID", ".2f"), ("class_accuracy", "class acc", ".3f"), ("clip_score", "CLIP", ".2f"),
           ("psnr_db", "PSNR dB", ".2f"), ("ssim", "SSIM", ".4f"), ("lpips", "LPIPS", ".4f"),
           ("blocks_computed", "blocks run", ".3f"), ("branches_computed", "branches run", ".3f"),
           ("attention_density", "attn density", ".3f"), ("flops_per_sample", "GFLOPs / sample", ".3f"),
           ("peak_memory_mb", "peak memory MB", ".1f")]
CSV_EXTRA = ["speedup_low", "speedup_high", "speedup_spread", "speedup_within_noise", "latency_low", "latency_high",
             "latency_spread", "fid_ci_low", "fid_ci_high", "memory_measure", "error"]


def _flat(row: dict) -> dict:
    """A results row as flat numbers (what results.csv holds and the table and plots show)."""
    flat = dict(row)
    fid_result = row.get("fid") if isinstance(row.get("fid"), dict) else None
    flat["fid"] = fid_result["value"] if fid_result else None
    interval = (fid_result or {}).get("ci95") or {}
    flat["fid_ci_low"], flat["fid_ci_high"] = interval.get("low"), interval.get("high")
    speedup = row.get("speedup_spread") or {}
    flat["speedup_low"], flat["speedup_high"] = speedup.get("low"), speedup.get("high")
    flat["speedup_spread"], flat["speedup_within_noise"] = speedup.get("spread"), speedup.get("within_noise")
    latency = row.get("latency_spread") or {}
    flat["latency_low"], flat["latency_high"] = latency.get("low"), latency.get("high")
    flat["latency_spread"] = latency.get("spread")
    if flat.get("flops_per_sample") is not None:
        flat["flops_per_sample"] = flat["flops_per_sample"] / 1e9
    return flat


def _table_cell(row: dict, key: str, spec: str) -> str:
    if key == "method":
        return str(row["method"])
    if key == "speedup" and row.get("speedup") is not None:
        if row["method"] == "baseline":
            return "1.00× (reference)"
        text = f"{row['speedup']:.2f}× ({row['speedup_low']:.2f}–{row['speedup_high']:.2f})"
        return text + (", within noise" if row.get("speedup_within_noise") else "")
    if key == "latency_s_per_sample" and row.get("latency_low") is not None:
        return f"{row[key]:.4f} ({row['latency_low']:.4f}–{row['latency_high']:.4f})"
    if key == "fid" and row.get("fid") is not None and row.get("fid_ci_low") is not None:
        return f"{row['fid']:.2f} [{row['fid_ci_low']:.2f}–{row['fid_ci_high']:.2f}]"
    if key == "psnr_db" and row.get("psnr_db") is None and row.get("identical_to_baseline"):
        return "∞ (identical)"
    return _cell(row.get(key), spec)


def _md_settings(results: dict) -> list[str]:
    settings, resolved = results["settings"], results.get("resolved") or {}
    env = results.get("environment") or {}
    steps = resolved.get("steps", settings.get("steps"))
    guidance = resolved.get("guidance_scale", settings.get("guidance_scale"))
    classes = settings.get("classes")
    inputs = (f"classes {', '.join(map(str, classes))} cycled" if classes else
              f"{len(settings['prompts'])} prompts cycled" if settings.get("prompts") else "classes 0–9 cycled")
    lines = ["## Settings", "",
             f"- model: `{results['model']}`; methods: {', '.join(f'`{m}`' for m in settings['methods'])}",
             f"- {settings['num_images']} inputs ({inputs}), seeds {settings['seed']}.."
             f"{settings['seed'] + settings['num_images'] - 1} (input i uses seed {settings['seed']} + i), "
             f"batch size {settings['batch_size']}",
             f"- steps: **{steps}** ({resolved.get('steps_source', '--steps')}); guidance scale: **{guidance}** "
             f"({resolved.get('guidance_source', '--guidance-scale')})",
             "", "## Environment", "",
             f"- hardware: {env.get('cpu', '?')}, {env.get('logical_cores', '?')} logical cores "
             f"({env.get('usable_cores', '?')} usable by this process); GPU: {env.get('gpu') or 'none'}",
             f"- torch threads: {env.get('torch_threads', '?')}; Python {env.get('python', '?')}, torch "
             f"{env.get('torch', '?')}, diffusers {env.get('diffusers', '?')}, accel {env.get('accel', '?')}",
             f"- accel git commit: {env.get('git_commit') or 'not available'}",
             f"- computed {results['computed']}"]
    return lines


def write_reports(results: dict, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """Write results.json / .csv, report.md and the pictures; returns what the pictures show (for checks)."""
    out = Path(out)
    results = finite_or_none(results)  # what results.json holds is what everything below shows
    status("writing results.json, results.csv, report.md", progress)
    atomic_write(out / "results.json", strict_json(results, indent=1, default=str))
    rows = [_flat(row) for row in results["rows"]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[key for key, _, _ in COLUMNS] + CSV_EXTRA, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key) for key in [k for k, _, _ in COLUMNS] + CSV_EXTRA})
    atomic_write(out / "results.csv", buffer.getvalue())
    status("drawing plots and sample grids", progress)
    pictures = {"plots": _plots(rows, out, results), "grid": _grid(results, out)}
    if _is_video(results, out):
        pictures.update(_video_pictures(results, out))
    measures = {row.get("memory_measure") for row in rows if row.get("memory_measure")}
    memory_title = MEMORY_TITLES.get(next(iter(measures)), "peak memory MB") if len(measures) == 1 else \
        "peak memory MB"
    columns = [(key, memory_title if key == "peak_memory_mb" else title, spec) for key, title, spec in COLUMNS]
    shown = [c for c in columns if any(row.get(c[0]) is not None for row in rows)]
    lines = [f"# Eval: {results['model']}", ""]
    lines += _md_settings(results)
    lines += ["", "## Results", "", "| " + " | ".join(title for _, title, _ in shown) + " |",
              "|" + "|".join("---" if key == "method" else "---:" for key, _, _ in shown) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_table_cell(row, key, spec) for key, _, spec in shown) + " |")
    lines.append("")
    fids = [row["fid"] for row in results["rows"] if isinstance(row.get("fid"), dict)]
    if fids:
        interval = fids[0].get("ci95") or {}
        lines += [f"- FID: {fids[0]['library']}, features: {fids[0]['features']}, N = {fids[0]['n_generated']} "
                  f"generated vs {fids[0]['reference']}. In brackets: the "
                  f"{interval.get('confidence', CONFIDENCE):.0%} "
                  f"{interval.get('kind', 'bootstrap')} ({interval.get('resamples')} resamples, seed "
                  f"{interval.get('seed')}, the same draws for every method). Drawing with replacement repeats "
                  "samples, which raises FID; the interval is shifted back by that bias (results.json keeps the "
                  "raw percentiles and the bias). With N near the feature dimension FID is very noisy: compare "
                  "methods by their intervals, not their point values."]
    lines += ["- Speedup: median of the per-batch ratios baseline s / method s (the same batch of the same seeds; "
              "methods interleaved batch by batch, warm-up excluded), in brackets their spread (min–max under 8 "
              "batches, IQR from 8); \"within noise\" where that spread reaches 1.0×. Latency: median seconds per "
              "sample over batches, same spread.",
              f"- PSNR / SSIM / LPIPS against the baseline on the same seeds; LPIPS: {results['lpips']}. The "
              "baseline's PSNR against itself is infinite: `null` in results.json, ∞ here."]
    for measure in sorted(measures):
        lines.append(f"- {MEMORY_TITLES.get(measure, measure)}: {MEMORY_NOTES.get(measure, measure)}.")
    if not measures:
        lines.append("- Peak memory: not measured on this platform.")
    errors = [f"- {row['method']}: {row['error']}" for row in rows if row.get("error")]
    lines += errors
    names = [("speedup vs FID", "speedup-vs-fid.png"), ("speedup vs PSNR", "speedup-vs-psnr.png"),
             ("samples, one row per method, with the difference to the baseline", "grid.png"),
             ("every frame of one clip", "frames.png"), ("the methods side by side", "side-by-side.gif")]
    present = [(alt, name) for alt, name in names if (out / name).is_file()]
    if present:
        lines += ["", "## Pictures", ""]
        for alt, name in present:
            lines += [f"![{alt}]({name})", ""]
    atomic_write(out / "report.md", "\n".join(lines).rstrip() + "\n")
    return pictures


def _save_figure(figure, path: Path) -> tuple[int, int]:
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", pad_inches=0.15)
    atomic_write(path, buffer.getvalue())
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        return image.size


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both speedup (higher) and quality, by falling speedup."""
    sign = -1 if higher_is_better else 1
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], sign * points[i][1]))
    front, best = [], math.inf
    for i in order:
        quality = sign * points[i][1]
        if quality < best:
            front.append(i)
            best = quality
    return front


def _plots(rows: list[dict], out: Path, results: dict) -> dict[str, list[dict]]:
    """speedup-vs-fid.png and speedup-vs-psnr.png; returns the points each plot drew (the values as reported)."""
    plt = _pyplot()
    drawn: dict[str, list[dict]] = {}
    resolved = results.get("resolved") or {}
    subtitle = (f"{results['model']}, {results['settings']['num_images']} samples, "
                f"{resolved.get('steps', '?')} steps, guidance {resolved.get('guidance_scale', '?')}")
    baseline = next((r for r in rows if r["method"] == "baseline"), None)
    for metric, name, higher in (("fid", "speedup-vs-fid.png", False), ("psnr_db", "speedup-vs-psnr.png", True)):
        points = []
        for r in rows:
            if r.get("speedup") is None or r.get(metric) is None:
                continue
            low, high = (r.get("fid_ci_low"), r.get("fid_ci_high")) if metric == "fid" else (None, None)
            points.append({"method": r["method"], "x": r["speedup"], "y": r[metric],
                           "x_low": r.get("speedup_low"), "x_high": r.get("speedup_high"), "y_low": low,
                           "y_high": high})
        if not points:
            continue
        figure, axis = plt.subplots(figsize=(6.4, 4.6))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for number, p in enumerate(points):
            color = colors[number % len(colors)]
            axis.scatter([p["x"]], [p["y"]], color=color, zorder=3, label=p["method"])
            if p["x_low"] is not None and p["x_high"] is not None and p["x_high"] > p["x_low"]:
                axis.hlines(p["y"], p["x_low"], p["x_high"], color=color, lw=1.2, zorder=2)
            if p["y_low"] is not None and p["y_high"] is not None:
                axis.vlines(p["x"], p["y_low"], p["y_high"], color=color, lw=1.2, zorder=2)
            axis.annotate(p["method"], (p["x"], p["y"]), fontsize=8, xytext=(5, 4), textcoords="offset points")
        front = pareto_front([(p["x"], p["y"]) for p in points], higher)
        for i, p in enumerate(points):
            p["pareto"] = i in front
        xs, ys = [points[i]["x"] for i in front], [points[i]["y"] for i in front]
        axis.plot(xs, ys, color="0.3", ls="-", lw=1, marker="o", markersize=13, markerfacecolor="none",
                  zorder=1, label="Pareto frontier (no method both faster and better)")
        axis.axvline(1.0, color="0.5", ls=":", lw=1, label="baseline speed (1.0×)")
        if metric == "fid" and baseline is not None and baseline.get("fid") is not None:
            axis.axhline(baseline["fid"], color="0.5", ls="--", lw=1, label=f"baseline FID {baseline['fid']:.2f}")
        if metric == "psnr_db":
            axis.text(1.0, 1.0, " baseline: PSNR ∞ (identical to itself)", transform=axis.get_xaxis_transform(),
                      fontsize=7, color="0.4", va="top", ha="left")
        axis.set_xlabel("speedup vs baseline (×), bar: spread over batches")
        axis.set_ylabel("FID (lower is better), bar: 95% bootstrap interval" if metric == "fid"
                        else "PSNR vs baseline on the same seeds (dB, higher is closer)")
        axis.set_title(("Speedup vs FID" if metric == "fid" else "Speedup vs PSNR") + f"\n{subtitle}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.margins(x=0.15, y=0.12)
        axis.legend(fontsize=7, loc="best")
        _save_figure(figure, out / name)
        plt.close(figure)
        drawn[name] = points
    return drawn


def _is_video(results: dict, out: Path) -> bool:
    return any((out / row["method"] / f"{0:06d}.gif").is_file() for row in results["rows"])


def _load_for_pictures(results: dict, out: Path, indices: list[int]) -> dict[str, list[np.ndarray]]:
    """The samples ``indices`` of every method that has them all, as floats [H, W, C] or [F, H, W, C]."""
    loaded = {}
    for row in results["rows"]:
        method = row["method"]
        records = []
        for path in sorted((out / method / ".batches").glob("*.json"))[:1]:
            try:
                records.append(json.loads(path.read_text()))
            except json.JSONDecodeError:
                pass
        frames = records[0].get("frames") if records else None
        shape = records[0].get("sample_shape") if records else None
        samples = [read_sample(sample_path(out, method, i), frames, shape) for i in indices]
        if samples and all(s is not None for s in samples):
            loaded[method] = samples
    return loaded


def _picture_grid(rows: list[tuple[str, list[np.ndarray], bool]], column_labels: list[str], title: str,
                  path: Path, difference_max: float) -> dict[str, Any]:
    """One picture per cell, upscaled without smoothing (each pixel a visible block), rows labelled on the left.
    ``rows``: (label, pictures [H, W, C] in [0, 1], is a difference row)."""
    plt = _pyplot()
    columns = len(column_labels)
    height, width = rows[0][1][0].shape[:2]
    cell = 1.0 if max(height, width) <= 32 else 1.6
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.6 + cell * columns, 0.9 + cell * len(rows)),
                                squeeze=False)
    for r, (label, pictures, difference) in enumerate(rows):
        for c, picture in enumerate(pictures):
            axis = axes[r][c]
            if difference:
                axis.imshow(picture.mean(-1), cmap="magma", vmin=0, vmax=difference_max, interpolation="nearest")
                axis.set_xticks([])
                axis.set_yticks([])
            else:
                _show(axis, picture)
            if r == 0:
                axis.set_title(column_labels[c], fontsize=8)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8,
                              color="0.3" if difference else "black")
    figure.suptitle(title, fontsize=9)
    size = _save_figure(figure, path)
    plt.close(figure)
    return {"path": str(path), "size": size, "row_labels": [label for label, _, _ in rows],
            "column_labels": list(column_labels)}


def _with_differences(loaded: dict[str, list[np.ndarray]], pick) -> tuple[list, float]:
    """Rows for ``_picture_grid``: each method, then (for all but the baseline) its |difference| to the baseline."""
    reference = loaded.get("baseline")
    rows, largest = [], 1 / 255
    for method, samples in loaded.items():
        pictures = pick(samples)
        rows.append((method, pictures, False))
        if reference is not None and method != "baseline":
            differences = [np.abs(p - q) for p, q in zip(pictures, pick(reference))]
            largest = max(largest, max(float(d.max()) for d in differences))
            rows.append((f"|{method} − baseline|", differences, True))
    return rows, largest


def _show(axis, picture: np.ndarray) -> None:
    """One picture ([H, W, C] in 0..1) on ``axis``, pixels as squares, no ticks."""
    if picture.shape[-1] == 1:
        axis.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        axis.imshow(np.clip(picture, 0, 1), interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def _grid(results: dict, out: Path, columns: int = 8) -> dict[str, Any] | None:
    """grid.png: the first ``columns`` seeds (columns), one row per method plus one row of its absolute difference
    to the baseline; a video shows its middle frame."""
    settings = results["settings"]
    indices = list(range(min(columns, settings["num_images"])))
    loaded = _load_for_pictures(results, out, indices)
    if not loaded:
        return None
    first = next(iter(loaded.values()))[0]
    middle = first.shape[0] // 2 if first.ndim == 4 else None

    def pick(samples):
        return [s[middle] if middle is not None else s for s in samples]

    rows, largest = _with_differences(loaded, pick)
    classes = settings.get("classes") or list(range(10))
    labels = []
    for i in indices:
        label = f"seed {settings['seed'] + i}"
        if not settings.get("prompts"):
            label += f"\nclass {classes[i % len(classes)]}"
        labels.append(label)
    what = f"frame {middle} of each clip" if middle is not None else "one sample per seed"
    title = (f"{results['model']}: {what}; rows: methods and |difference to baseline| "
             f"(black 0, brightest {largest:.2f})")
    return _picture_grid(rows, labels, title, out / "grid.png", largest)


def _video_pictures(results: dict, out: Path, seeds: int = 3) -> dict[str, Any]:
    """frames.png (one clip, every frame as a column, rows methods and differences) and side-by-side.gif (every
    method in one labelled frame, a few seeds as rows, frames in sync)."""
    settings = results["settings"]
    indices = list(range(min(seeds, settings["num_images"])))
    loaded = _load_for_pictures(results, out, indices)
    if not loaded:
        return {}
    first = next(iter(loaded.values()))[0]
    if first.ndim != 4:
        return {}
    count = first.shape[0]
    rows, largest = _with_differences(loaded, lambda samples: list(samples[0]))
    title = (f"{results['model']}: seed {settings['seed']}, frames 0–{count - 1}; rows: methods and |difference to "
             f"baseline| (black 0, brightest {largest:.2f})")
    pictures = {"frames": _picture_grid(rows, [f"f{f}" for f in range(count)], title, out / "frames.png", largest)}
    pictures["animation"] = _side_by_side_gif(loaded, settings, out / "side-by-side.gif")
    return pictures


def _side_by_side_gif(loaded: dict[str, list[np.ndarray]], settings: dict, path: Path) -> dict[str, Any]:
    from PIL import Image

    plt = _pyplot()
    methods = list(loaded)
    seeds = len(next(iter(loaded.values())))
    count = next(iter(loaded.values()))[0].shape[0]
    frames = []
    for f in range(count):
        figure, axes = plt.subplots(seeds, len(methods), figsize=(0.4 + 1.5 * len(methods), 0.5 + 1.5 * seeds),
                                    squeeze=False, dpi=80)
        for c, method in enumerate(methods):
            for r in range(seeds):
                picture = loaded[method][r][f]
                axis = axes[r][c]
                _show(axis, picture)
                if r == 0:
                    axis.set_title(method, fontsize=9)
                if c == 0:
                    axis.set_ylabel(f"seed {settings['seed'] + r}", fontsize=8)
        figure.suptitle(f"frame {f + 1}/{count}", fontsize=9)
        figure.canvas.draw()
        frames.append(Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()))
        plt.close(figure)
    palette = [frame.convert("P", palette=Image.Palette.ADAPTIVE, colors=255) for frame in frames]
    buffer = io.BytesIO()
    palette[0].save(buffer, format="GIF", save_all=True, append_images=palette[1:], duration=120, loop=0)
    atomic_write(path, buffer.getvalue())
    return {"path": str(path), "size": frames[0].size, "frames": count, "methods": methods}
