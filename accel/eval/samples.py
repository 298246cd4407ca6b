"""The eval run's settings and its sample files: which inputs (conditions, seeds, batches) a run generates, and
where and how each sample is stored (``{out}/{method}/{index:06d}.png``, 16-bit PNG, videos as frames side by side).
Shared by the generation (``accel.eval.harness``) and the metrics (``accel.eval.report``)."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from accel.io import atomic_write

from .models import ModelHandle


@dataclass
class EvalSettings:
    model: str
    methods: list[str]  # "baseline", presets, stacks "a+b"
    num_images: int
    out: str
    steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int = 10
    seed: int = 0
    classes: list[int] | None = None
    prompts_file: str | None = None
    prompts: list[str] = field(default_factory=list)
    fid: str = "auto"  # "auto", "digit", "inception", "none"
    inception_weights: str | None = None
    fid_reference: str | None = None
    clip_model: str = "ViT-B-32"
    clip_weights: str | None = None
    flops: bool = True


def status(message: str, enabled: bool = True) -> None:
    """A timestamped status line on stderr, for phases that take seconds without a progress bar of their own."""
    if enabled:
        import sys
        import time

        print(f"[accel-eval {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def finite_or_none(value):
    """``value`` with every non-finite float (inf, nan) replaced by ``None``, through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def strict_json(value, **kwargs) -> str:
    """Standard JSON that every parser reads: non-finite numbers become ``null`` (``allow_nan=False`` would
    raise on any left)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a .txt (one per line), .json (a list of strings or of {"prompt": ...}) or .csv ("prompt"
    column) file; ``ValueError`` for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Prompts file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}.") from None
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of prompts (strings or objects with a 'prompt' key).")
        prompts = []
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("prompt"), str):
                item = item["prompt"]
            if not isinstance(item, str):
                raise ValueError(f"{path}: every entry must be a string or {{\"prompt\": ...}}, got {item!r}.")
            prompts.append(item)
    elif suffix == ".csv":
        try:
            rows = list(csv.DictReader(text.splitlines()))
        except csv.Error as error:
            raise ValueError(f"{path} is not valid CSV: {error}.") from None
        if not rows or "prompt" not in rows[0]:
            raise ValueError(f"{path} must be a CSV file with a 'prompt' column and at least one row.")
        prompts = [row["prompt"] or "" for row in rows]
    elif suffix in (".txt", ""):
        prompts = [line for line in text.splitlines()]
    else:
        raise ValueError(f"{path}: prompts files are .txt, .json or .csv, got {suffix!r}.")
    prompts = [prompt.strip() for prompt in prompts if prompt and prompt.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts


def conditions(settings: EvalSettings, model: ModelHandle) -> list:
    """The condition of every input index."""
    if model.conditioning == "class":
        classes = settings.classes or list(range(min(model.num_classes or 10, 10)))
        return [classes[i % len(classes)] for i in range(settings.num_images)]
    return [settings.prompts[i % len(settings.prompts)] for i in range(settings.num_images)]


def batches(settings: EvalSettings) -> list[list[int]]:
    size, count = settings.batch_size, settings.num_images
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def sample_path(out: Path, method: str, index: int) -> Path:
    return out / method / f"{index:06d}.png"


def to_png_array(sample: np.ndarray) -> np.ndarray:
    """An image [H, W, C] or video [F, H, W, C] in [0, 1] as a uint8 picture (video frames side by side)."""
    sample = np.clip(np.asarray(sample, np.float32), 0, 1)
    if sample.ndim == 4:
        sample = np.concatenate(list(sample), axis=1)
    sample = (sample * 255).round().astype(np.uint8)
    return sample[..., 0] if sample.shape[-1] == 1 else sample


def from_png_array(picture: np.ndarray, frames: int | None) -> np.ndarray:
    """Inverse of ``to_png_array``: [H, W, C] or [F, H, W, C] floats in [0, 1]."""
    array = picture.astype(np.float32) / 255
    if array.ndim == 2:
        array = array[..., None]
    if frames:
        array = np.stack(np.split(array, frames, axis=1))
    return array


def write_sample(path: Path, sample: np.ndarray) -> None:
    from io import BytesIO

    from PIL import Image

    picture = to_png_array(sample)
    buffer = BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
    if sample.ndim == 4:  # a video: also an animation to look at
        frames = [Image.fromarray(to_png_array(frame)) for frame in sample]
        buffer = BytesIO()
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        atomic_write(path.with_suffix(".gif"), buffer.getvalue())


def read_sample(path: Path, frames: int | None, shape: list[int] | tuple[int, ...] | None = None) -> np.ndarray | None:
    """The sample stored at ``path``, or ``None`` if it is missing, truncated, otherwise unreadable, or (with
    ``shape``) not of the shape its run generated: another size or channel count is another run's file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            picture = np.asarray(image)
    except (OSError, ValueError, SyntaxError):
        return None
    if frames and picture.shape[1] % frames:
        return None
    sample = from_png_array(picture, frames)
    if shape is not None and tuple(sample.shape) != tuple(shape):
        return None
    return sample
