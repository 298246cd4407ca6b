"""Quality metrics shared by the model cards, the main job and (later) the eval harness."""

from __future__ import annotations

import math

import numpy as np
import torch


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """PSNR in dB of ``other`` against ``reference``, both in [0, 1]; ``inf`` when identical."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(other, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def digit_fid(classifier, generated, real) -> float:
    """FID between two sets of digits (or video frames) in the digit classifier's 64-d feature space.

    Computed by torchmetrics' ``FrechetInceptionDistance`` with the classifier as its feature extractor, so the
    same code path takes Inception features where real weights are available. Needs more samples than features.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from accel.pipelines.classifier import to_digit_batch

    generated, real = to_digit_batch(generated), to_digit_batch(real)
    features = classifier.model.num_features
    if min(len(generated), len(real)) <= features:
        raise ValueError(f"FID on {features}-d features needs more than {features} samples per set; "
                         f"got {len(generated)} generated and {len(real)} real.")
    metric = FrechetInceptionDistance(feature=classifier.model, normalize=True).double()
    with torch.no_grad():
        for start in range(0, len(real), 512):
            metric.update(real[start : start + 512], real=True)
        for start in range(0, len(generated), 512):
            metric.update(generated[start : start + 512], real=False)
    return float(metric.compute())
