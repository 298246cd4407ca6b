"""The quality metrics behind the model cards and the main job."""

from __future__ import annotations

import math

import numpy as np
import pytest

from accel.eval.metrics import digit_fid, psnr
from accel.pipelines import reference
from accel.pipelines.digits import split


def test_psnr():
    image = np.random.default_rng(0).random((4, 8, 8, 1))
    assert psnr(image, image) == math.inf
    assert psnr(image, np.clip(image + 0.1, 0, 1)) < psnr(image, np.clip(image + 0.01, 0, 1))
    assert psnr(np.zeros(4), np.full(4, 0.1)) == pytest.approx(20.0)


def test_digit_fid_separates_real_from_noise():
    classifier = reference.classifier()
    data = split()
    real_vs_real = digit_fid(classifier, data["train"].images[:400], data["held_out"].images)
    noise = np.random.default_rng(0).random((400, 8, 8)).astype(np.float32)
    real_vs_noise = digit_fid(classifier, noise, data["held_out"].images)
    assert real_vs_real >= 0 and real_vs_noise > 10 * real_vs_real
    with pytest.raises(ValueError, match="needs more than 64 samples"):
        digit_fid(classifier, noise[:50], data["held_out"].images)
