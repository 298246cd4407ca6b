"""Measure a reference model and write its ``metrics.json``, model card and sample pictures.

    python -m training.evaluate digits-dit       # ~55 minutes on 2 cores
    python -m training.evaluate moving-digits    # ~25 minutes on 2 cores
    python -m training.evaluate classifier

digits-dit: 1,000 samples (100 per class) at 20 and 50 DDIM steps, each at guidance 1 / 1.5 / 2 / 3 / 4: class
accuracy by the digit classifier, FID in its feature space against the 450 held-out digits, the real-vs-real floor
(1,000 train digits vs held-out), and the class accuracy of ``pipe(class_labels=labels)`` with no other argument
(40 samples). moving-digits: 100 clips (10 per class): per-frame class
accuracy, frame-label consistency (share of frames agreeing with the clip's majority class) and motion
smoothness (mean |second difference| of the ink centroid, pixels/frame^2) next to the same figure on real clips, then
per-frame accuracy at 20 and 50 steps over guidance 1 / 3 / 5 / 6 / 8 (40 clips each), and of
``pipe(class_labels=labels)`` with no other argument (10 clips).
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

from accel.eval.metrics import digit_fid, output_array
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
        outputs.append(output_array(output))
    return np.concatenate(outputs)


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


GUIDANCES = (1.0, 1.5, 2.0, 3.0, 4.0)
STEP_COUNTS = (20, 50)


def evaluate_digits_dit(samples: int) -> dict:
    """Every (steps, guidance) of the grid on ``samples`` images, and the no-argument call on 40."""
    pipe, classifier = reference.load("digits-dit"), reference.classifier()
    data = split()
    labels = [label for label in range(10) for _ in range(samples // 10)]
    default = reference.DEFAULT_CALL["digits-dit"]
    results: dict = {"samples": len(labels), "default_call": default, "settings": {}}
    rng = np.random.default_rng(0)
    floor_real = data["train"].images[rng.choice(len(data["train"].labels), 1000, replace=False)]
    results["fid_real_vs_real"] = digit_fid(classifier, floor_real, data["held_out"].images)
    for steps in STEP_COUNTS:
        for guidance in GUIDANCES:
            started = time.time()
            images = generate("digits-dit", pipe, labels, batch=200, seed=1000, num_inference_steps=steps,
                              guidance_scale=guidance)
            results["settings"][f"{steps}_steps_guidance_{guidance}"] = {
                "num_inference_steps": steps,
                "guidance_scale": guidance,
                "class_accuracy": classifier.accuracy(images, labels),
                "fid_vs_held_out": digit_fid(classifier, images, data["held_out"].images),
                "seconds_per_image": (time.time() - started) / len(labels),
            }
            if steps == default["num_inference_steps"] and guidance == default["guidance_scale"]:
                grid = images[:, :, :, 0].reshape(10, samples // 10, 8, 8)[:, :10]
                grid = np.pad(grid, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=0.25)
                _save_png(_upscale(grid.transpose(0, 2, 1, 3).reshape(100, 100), 4), DOCS / "digits-dit-samples.png")
    # The call a diffusers user writes first: class labels and nothing else (PIL images back).
    plain_labels = [label for label in range(10) for _ in range(4)]
    torch.manual_seed(3000)  # the call draws its noise from torch's global generator
    images = pipe(class_labels=plain_labels).images  # PIL images
    pixels = np.stack([np.asarray(image.convert("L")) / 255.0 for image in images])[..., None]
    results["no_argument_call"] = {"call": "pipe(class_labels=labels)", "samples": len(plain_labels),
                                   "class_accuracy": classifier.accuracy(pixels, plain_labels)}
    results["classifier_held_out_accuracy"] = classifier.accuracy(data["held_out"].images, data["held_out"].labels)
    return results


def _centroid_jerk(clips: np.ndarray) -> float:
    """Mean |second difference| of the ink centroid over frames, pixels per frame^2."""
    clips = clips.reshape(*clips.shape[:4])
    ys, xs = np.mgrid[0 : clips.shape[2], 0 : clips.shape[3]]
    mass = clips.sum(axis=(2, 3)) + 1e-6
    centroid = np.stack([(clips * ys).sum(axis=(2, 3)) / mass, (clips * xs).sum(axis=(2, 3)) / mass], axis=-1)
    return float(np.abs(np.diff(centroid, n=2, axis=1)).mean())


def evaluate_moving_digits(clips: int, sweep_clips: int = 40) -> dict:
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
        "sweep": sweep_moving_digits(pipe, classifier, sweep_clips),
        "no_argument_call": _moving_digits_no_argument_call(pipe, classifier),
    }


MOVING_DIGITS_GUIDANCES = (1.0, 3.0, 5.0, 6.0, 8.0)


def sweep_moving_digits(pipe, classifier, clips: int) -> dict:
    """Per-frame class accuracy at 20 and 50 steps over a guidance range (seeds 2000+, as the main figure)."""
    labels = [label for label in range(10) for _ in range(clips // 10)]
    cells = {}
    for steps in STEP_COUNTS:
        for guidance in MOVING_DIGITS_GUIDANCES:
            started = time.time()
            videos = generate("moving-digits", pipe, labels, batch=20, seed=2000, num_inference_steps=steps,
                              guidance_scale=guidance)
            cells[f"{steps}_steps_guidance_{guidance}"] = {
                "num_inference_steps": steps, "guidance_scale": guidance, "clips": len(labels),
                "per_frame_class_accuracy": classifier.accuracy(videos, labels),
                "seconds_per_clip": (time.time() - started) / len(labels),
            }
    return cells


def _moving_digits_no_argument_call(pipe, classifier) -> dict:
    labels = list(range(10))
    torch.manual_seed(3000)  # the call draws its noise from torch's global generator
    videos = pipe(class_labels=labels).frames  # np, [N, F, H, W, C]
    return {"call": "pipe(class_labels=labels)", "clips": len(labels),
            "per_frame_class_accuracy": classifier.accuracy(videos, labels)}


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
    parser.add_argument("--sweep-clips", type=int, default=40, help="moving-digits: clips per steps x guidance cell")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.model == "digits-dit":
        results, folder = evaluate_digits_dit(args.samples), reference.model_dir("digits-dit")
    elif args.model == "moving-digits":
        results, folder = evaluate_moving_digits(args.clips, args.sweep_clips), reference.model_dir("moving-digits")
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
