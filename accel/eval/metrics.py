"""Quality metrics, one implementation each, shared by the main job (``accel-run``), the eval harness, the demo,
the benchmarks and the model cards: a pipeline output as an array, PSNR, SSIM and the digit-feature FID."""

from __future__ import annotations

import math

import numpy as np
import torch


def output_array(output) -> np.ndarray:
    """A pipeline output (``output_type="np"``) as a float32 array: images [N, H, W, C], videos [N, F, H, W, C]."""
    return np.asarray(output.images if hasattr(output, "images") else output.frames, dtype=np.float32)


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """PSNR in dB of ``other`` against ``reference``, both in [0, 1]; ``inf`` when identical."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(other, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean SSIM (torchmetrics, Gaussian window) of ``other`` against ``reference``, both in [0, 1], over every
    image or video frame: the standard 11-pixel window, the largest odd one that fits for smaller images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    def frames(array):
        array = torch.from_numpy(np.asarray(array, np.float32))
        return array.reshape(-1, *array.shape[-3:]).permute(0, 3, 1, 2)  # [N(*F), C, H, W]

    size = min(reference.shape[-3], reference.shape[-2])
    kernel = min(11, size - (1 - size % 2))
    return float(structural_similarity_index_measure(frames(other), frames(reference), data_range=1.0,
                                                     kernel_size=kernel))


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
