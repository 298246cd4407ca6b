"""The data every reference model is trained and measured on: scikit-learn's bundled handwritten digits.

``load_digits()`` ships 1,797 real 8x8 digits (10 classes, grey levels 0..16) with scikit-learn, so nothing is
downloaded. ``split()`` fixes a stratified train / held-out split once for the whole project: the reference
models and the classifier train on ``train``; FID reference statistics and classifier accuracy use ``held_out``.

``moving_digit_clips`` makes the video data: one digit from a split moving in a straight line and bouncing off the
walls of a square canvas, deterministic for a given seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.25
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class DigitSplit:
    images: np.ndarray  # [N, 8, 8] float32 in [0, 1]
    labels: np.ndarray  # [N] int64


@functools.cache
def split() -> dict[str, DigitSplit]:
    """The fixed train / held-out split (75% / 25%, stratified by class, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train_x, held_x, train_y, held_y = train_test_split(
        images, labels, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return {"train": DigitSplit(train_x, train_y), "held_out": DigitSplit(held_x, held_y)}


def moving_digit_clips(
    data: DigitSplit, count: int, *, frames: int, canvas: int, seed: int, speed: tuple[float, float] = (0.3, 0.9)
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` clips [count, frames, canvas, canvas] in [0, 1] of one digit bouncing around, and their labels.

    Each clip draws a digit, a start position and a velocity (``speed`` pixels per frame in each axis, random sign)
    from ``seed``; the digit is placed with bilinear sub-pixel shifts so motion is smooth.
    """
    rng = np.random.default_rng(seed)
    size = data.images.shape[-1]
    travel = canvas - size
    indices = rng.integers(0, len(data.labels), count)
    clips = np.zeros((count, frames, canvas, canvas), np.float32)
    for clip, index in enumerate(indices):
        position = rng.uniform(0, travel, 2)
        velocity = rng.uniform(*speed, 2) * rng.choice([-1.0, 1.0], 2)
        for frame in range(frames):
            clips[clip, frame] = _place(data.images[index], position, canvas)
            position = position + velocity
            for axis in range(2):  # bounce off the walls
                if position[axis] < 0 or position[axis] > travel:
                    velocity[axis] = -velocity[axis]
                    position[axis] = np.clip(position[axis], 0, travel) * 2 - position[axis]
                    position[axis] = np.clip(position[axis], 0, travel)
    return clips, data.labels[indices]


def _place(digit: np.ndarray, position: np.ndarray, canvas: int) -> np.ndarray:
    size = digit.shape[0]
    out = np.zeros((canvas + 1, canvas + 1), np.float32)
    (row, col), (fr, fc) = np.floor(position).astype(int), position - np.floor(position)
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
        out[row + dr : row + dr + size, col + dc : col + dc + size] += weight * digit
    return np.clip(out[:canvas, :canvas], 0, 1)
