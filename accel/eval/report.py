"""Metrics and reports of an eval run, always recomputed from the samples on disk.

Per method: FID (torchmetrics ``FrechetInceptionDistance``; digit-classifier features on the reference models,
Inception when local weights are given), class accuracy (class-conditional reference models) or CLIP score
(open-clip-torch, prompt models, when local weights are given), PSNR / SSIM (torchmetrics) and LPIPS (when its
backbone weights are in the torch hub cache) against the baseline on the same seeds, latency per sample (median
over batches), peak memory, FLOPs per sample, and the ``accel.summary`` shares. Every FID records its library,
version, feature extractor and N.

Writes ``results.json``, ``results.csv``, ``report.md``, ``speedup-vs-fid.png``, ``speedup-vs-psnr.png`` and
``grid.png`` (the same seeds, one row per method).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel.io import atomic_write

from .metrics import psnr, ssim
from .models import ModelHandle
from .samples import EvalSettings, conditions, read_sample, sample_path

DIGIT_FEATURES = 64
INCEPTION_FEATURES = 2048


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


def fid(settings: EvalSettings, model: ModelHandle, samples: np.ndarray) -> dict[str, Any] | None:
    import torchmetrics

    kind = _fid_kind(settings, model)
    if kind == "none":
        return None
    if kind == "digit":
        from accel.pipelines.digits import split
        from accel.pipelines.reference import classifier

        from .metrics import digit_fid

        real = split()["held_out"].images
        value = digit_fid(classifier(), samples, real)
        count = len(samples) * (samples.shape[1] if samples.ndim == 5 else 1)
        return {"value": value, "library": f"torchmetrics {torchmetrics.__version__}",
                "features": "digit classifier, 64-d penultimate layer (accel.pipelines.reference.classifier())",
                "n_generated": count, "reference": f"{len(real)} held-out digits (sklearn load_digits)"}
    from PIL import Image
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=INCEPTION_FEATURES, normalize=True,
                                      feature_extractor_weights_path=settings.inception_weights)
    real_paths = sorted(p for p in Path(settings.fid_reference).iterdir() if p.suffix.lower() in (".png", ".jpg"))
    for path in real_paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), np.float32) / 255
        metric.update(torch.from_numpy(array).permute(2, 0, 1)[None], real=True)
    images = samples.reshape(-1, *samples.shape[-3:])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    metric.update(tensor.repeat(1, 3 // tensor.shape[1], 1, 1), real=False)
    return {"value": float(metric.compute()), "library": f"torchmetrics {torchmetrics.__version__}",
            "features": f"Inception v3 pool3 ({settings.inception_weights})", "n_generated": len(images),
            "reference": f"{len(real_paths)} images in {settings.fid_reference}"}


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


def compute_results(settings: EvalSettings, model: ModelHandle, *, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm


    out = Path(settings.out)
    flops_file = out / ".flops.json"
    flops = json.loads(flops_file.read_text()) if flops_file.is_file() else {}
    labels = conditions(settings, model)
    baseline = None
    if "baseline" in settings.methods:
        baseline, _ = load_samples(settings, "baseline")
    baseline_latency = None
    rows = []
    for method in tqdm(settings.methods, desc="metrics", disable=not progress):
        samples, records = load_samples(settings, method)
        row: dict[str, Any] = {"method": method, "samples": settings.num_images}
        if samples is None:
            row["error"] = "samples missing on disk: rerun the same command to finish generating them"
            rows.append(row)
            continue
        per_sample = [r["seconds_per_sample"] for r in records]
        row["latency_s_per_sample"] = statistics.median(per_sample) if per_sample else None
        row["peak_rss_mb"] = max((r["peak_rss_mb"] for r in records if r.get("peak_rss_mb")), default=None)
        row["flops_per_sample"] = flops.get(method)
        for key in ("blocks_computed", "branches_computed", "attention_density"):
            values = [r[key] for r in records if r.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
        if method == "baseline":
            baseline_latency = row["latency_s_per_sample"]
        if model.digit_metrics:
            from accel.pipelines.reference import classifier

            row["class_accuracy"] = classifier().accuracy(samples, labels)
        elif settings.clip_weights:
            row["clip_score"] = clip_score(settings, samples, labels)
        row["fid"] = fid(settings, model, samples)
        if baseline is not None:
            row["psnr_db"] = psnr(baseline, samples)
            row["ssim"] = ssim(baseline, samples)
            row["lpips"] = lpips(baseline, samples) if lpips_available() else None
        rows.append(row)
    for row in rows:
        if baseline_latency and row.get("latency_s_per_sample"):
            row["speedup"] = baseline_latency / row["latency_s_per_sample"]
    import diffusers

    import accel

    return {
        "settings": {key: value for key, value in vars(settings).items()},
        "model": settings.model,
        "versions": {"accel": accel.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "computed": time.strftime("%Y-%m-%d %H:%M:%S"),
        "lpips": "computed" if lpips_available() else "not computed: no AlexNet weights in the torch hub cache",
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------- reports


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
           ("peak_rss_mb", "peak RSS MB", ".0f")]


def _flat(row: dict) -> dict:
    flat = dict(row)
    flat["fid"] = row["fid"]["value"] if isinstance(row.get("fid"), dict) else None
    if flat.get("flops_per_sample") is not None:
        flat["flops_per_sample"] = flat["flops_per_sample"] / 1e9
    return flat


def write_reports(results: dict, out: Path) -> None:
    out = Path(out)
    atomic_write(out / "results.json", json.dumps(results, indent=1, default=str))
    rows = [_flat(row) for row in results["rows"]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[key for key, _, _ in COLUMNS] + ["error"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key) for key, _, _ in COLUMNS} | {"error": row.get("error")})
    atomic_write(out / "results.csv", buffer.getvalue())
    shown = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)]
    settings = results["settings"]
    lines = [f"# Eval: {results['model']}", "",
             f"accel {results['versions']['accel']}, torch {results['versions']['torch']}, diffusers "
             f"{results['versions']['diffusers']}; computed {results['computed']}.",
             f"{settings['num_images']} inputs, seeds {settings['seed']}.."
             f"{settings['seed'] + settings['num_images'] - 1} (input i uses seed {settings['seed']} + i), "
             f"batch size {settings['batch_size']}, steps "
             f"{settings['steps'] or 'model default'}, guidance {settings['guidance_scale'] or 'model default'}.",
             "", "| " + " | ".join(title for _, title, _ in shown) + " |",
             "|" + "|".join("---" if key == "method" else "---:" for key, _, _ in shown) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row[key]) if key == "method" else _cell(row.get(key), spec)
                                       for key, _, spec in shown) + " |")
    fids = [row["fid"] for row in results["rows"] if isinstance(row.get("fid"), dict)]
    if fids:
        lines += ["", f"FID: {fids[0]['library']}, features: {fids[0]['features']}, N = {fids[0]['n_generated']} "
                      f"generated vs {fids[0]['reference']}."]
    lines += ["", f"LPIPS: {results['lpips']}.", "Latency: median over batches of seconds per sample, methods "
              "interleaved, warm-up excluded. Peak RSS: the process's peak resident memory during a batch.", ""]
    errors = [f"- {row['method']}: {row['error']}" for row in rows if row.get("error")]
    lines += errors
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    _plots(rows, out)
    _grid(results, out)


def _save_figure(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())


def _plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric, name in (("fid", "speedup-vs-fid.png"), ("psnr_db", "speedup-vs-psnr.png")):
        points = [(r["speedup"], min(r[metric], 60.0), r["method"]) for r in rows
                  if r.get("speedup") is not None and r.get(metric) is not None]
        if not points:
            continue
        figure, axis = plt.subplots(figsize=(5, 4))
        for x, y, label in points:
            axis.scatter([x], [y])
            axis.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel("speedup vs baseline (×)")
        axis.set_ylabel("FID (lower is better)" if metric == "fid" else "PSNR vs baseline (dB, capped at 60)")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        _save_figure(figure, out / name)
        plt.close(figure)


def _grid(results: dict, out: Path, columns: int = 8) -> None:
    """The first ``columns`` inputs, one row per method, as one lossless PNG."""
    from PIL import Image


    rows = []
    for row in results["rows"]:
        pictures = []
        for index in range(min(columns, results["settings"]["num_images"])):
            path = sample_path(out, row["method"], index)
            if path.is_file():
                with Image.open(path) as image:
                    pictures.append(np.asarray(image.convert("RGB")))
        if pictures:
            rows.append(np.concatenate([np.pad(p, ((1, 1), (1, 1), (0, 0)), constant_values=64) for p in pictures],
                                       axis=1))
    if not rows:
        return
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows])
    scale = max(1, 256 // grid.shape[1]) if grid.shape[1] < 256 else 1
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(out / "grid.png", buffer.getvalue())
