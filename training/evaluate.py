"""Measure a reference model and write its ``metrics.json``, model card and sample pictures.

    python -m training.evaluate digits-dit       # ~5 minutes on 2 cores
    python -m training.evaluate moving-digits    # ~5 minutes on 2 cores
    python -m training.evaluate classifier

digits-dit: 1,000 samples (100 per class) at the default 20 DDIM steps and guidance 1.5 (and at 50 steps):
class accuracy by the digit classifier, FID in its feature space against the 450 held-out digits, and the
real-vs-real floor (1,000 train digits vs held-out). moving-digits: 100 clips (10 per class): per-frame class
accuracy, frame-label consistency (share of frames agreeing with the clip's majority class) and motion
smoothness (mean |second difference| of the ink centroid, pixels/frame^2) next to the same figure on real clips.
Every figure goes to ``metrics.json`` beside the weights, and the model card is written from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from accel.eval.metrics import digit_fid
from accel.pipelines import reference
from accel.pipelines.digits import moving_digit_clips, split
from training.common import write_json_atomic
from training.model_cards import write_card

DOCS = Path(__file__).resolve().parents[1] / "docs"


def generate(name: str, pipe, labels: list[int], batch: int, seed: int, **overrides) -> np.ndarray:
    outputs = []
    for index, start in enumerate(tqdm(range(0, len(labels), batch), desc=f"{name} samples")):
        kwargs = reference.call_kwargs(name, pipe, labels[start : start + batch], seed=seed + index, **overrides)
        output = pipe(**kwargs)
        outputs.append(np.asarray(output.images if hasattr(output, "images") else output.frames))
    return np.concatenate(outputs)


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def evaluate_digits_dit(samples: int) -> dict:
    pipe, classifier = reference.load("digits-dit"), reference.classifier()
    data = split()
    labels = [label for label in range(10) for _ in range(samples // 10)]
    results: dict = {"samples": len(labels), "settings": {}}
    rng = np.random.default_rng(0)
    floor_real = data["train"].images[rng.choice(len(data["train"].labels), 1000, replace=False)]
    results["fid_real_vs_real"] = digit_fid(classifier, floor_real, data["held_out"].images)
    for steps in (20, 50):
        started = time.time()
        images = generate("digits-dit", pipe, labels, batch=200, seed=1000, num_inference_steps=steps)
        results["settings"][f"{steps}_steps"] = {
            "num_inference_steps": steps,
            "guidance_scale": reference.DEFAULT_CALL["digits-dit"]["guidance_scale"],
            "class_accuracy": classifier.accuracy(images, labels),
            "fid_vs_held_out": digit_fid(classifier, images, data["held_out"].images),
            "seconds_per_image": (time.time() - started) / len(labels),
        }
        if steps == 20:
            grid = images[:, :, :, 0].reshape(10, samples // 10, 8, 8)[:, :10]
            grid = np.pad(grid, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=0.25)
            _save_png(_upscale(grid.transpose(0, 2, 1, 3).reshape(100, 100), 4), DOCS / "digits-dit-samples.png")
    results["classifier_held_out_accuracy"] = classifier.accuracy(data["held_out"].images, data["held_out"].labels)
    return results


def _centroid_jerk(clips: np.ndarray) -> float:
    """Mean |second difference| of the ink centroid over frames, pixels per frame^2."""
    clips = clips.reshape(*clips.shape[:4])
    ys, xs = np.mgrid[0 : clips.shape[2], 0 : clips.shape[3]]
    mass = clips.sum(axis=(2, 3)) + 1e-6
    centroid = np.stack([(clips * ys).sum(axis=(2, 3)) / mass, (clips * xs).sum(axis=(2, 3)) / mass], axis=-1)
    return float(np.abs(np.diff(centroid, n=2, axis=1)).mean())


def evaluate_moving_digits(clips: int) -> dict:
    pipe, classifier = reference.load("moving-digits"), reference.classifier()
    labels = [label for label in range(10) for _ in range(clips // 10)]
    started = time.time()
    videos = generate("moving-digits", pipe, labels, batch=20, seed=2000)
    seconds = (time.time() - started) / len(labels)
    frames = videos.shape[1]
    predictions = classifier.predict(videos).reshape(len(labels), frames)
    majority = np.array([np.bincount(row, minlength=10).argmax() for row in predictions])
    real, _ = moving_digit_clips(split()["held_out"], len(labels), frames=frames, canvas=videos.shape[2], seed=7)
    strip = videos[:: clips // 10, ::4, :, :, 0]  # one clip per class, every 4th frame
    strip = np.pad(strip, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=0.25)
    rows, columns, height, width = strip.shape
    picture = strip.transpose(0, 2, 1, 3).reshape(rows * height, columns * width)
    _save_png(_upscale(picture, 3), DOCS / "moving-digits-strip.png")
    _save_gif(videos[:: clips // 10, :, :, :, 0], DOCS / "moving-digits.gif")
    return {
        "clips": len(labels),
        "frames": frames,
        "settings": {k: v for k, v in reference.DEFAULT_CALL["moving-digits"].items()},
        "per_frame_class_accuracy": float(np.mean(predictions == np.repeat(labels, frames).reshape(-1, frames))),
        "frame_label_consistency": float(np.mean(predictions == majority[:, None])),
        "centroid_jerk_generated": _centroid_jerk(videos),
        "centroid_jerk_real": _centroid_jerk(real),
        "seconds_per_clip": seconds,
    }


def _save_gif(videos: np.ndarray, path: Path) -> None:
    from PIL import Image

    count, frames, height, width = videos.shape
    tiles = np.pad(videos, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=0.25)
    movie = tiles.transpose(1, 2, 0, 3).reshape(frames, height + 2, count * (width + 2))
    images = [Image.fromarray((_upscale(frame, 4) * 255).round().astype(np.uint8)) for frame in movie]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("digits-dit", "moving-digits", "classifier"))
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--clips", type=int, default=100)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.model == "digits-dit":
        results, folder = evaluate_digits_dit(args.samples), reference.model_dir("digits-dit")
    elif args.model == "moving-digits":
        results, folder = evaluate_moving_digits(args.clips), reference.model_dir("moving-digits")
    else:
        data = split()["held_out"]
        results = {"held_out_accuracy": reference.classifier().accuracy(data.images, data.labels),
                   "held_out_images": len(data.labels)}
        folder = reference.MODELS_DIR / "digit-classifier"
    results["measured_on"] = {"machine": platform.machine(), "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    write_json_atomic(folder / "metrics.json", results)
    write_card(folder.name, folder)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
