"""The digit classifier / feature extractor behind every quality figure of the reference models.

A small CNN on 8x8 digits, trained on the train split (``training.train_classifier``). ``predict`` gives
class ids (class accuracy of generated samples: the class-conditional analogue of CLIP score); ``features`` gives
its 64-dimensional penultimate activations, which feed torchmetrics' ``FrechetInceptionDistance(feature=...)``.

Both accept exactly what the reference pipelines output, as numpy or torch, values in [0, 1]:
images [N, 8, 8], [N, 8, 8, 1] or [N, 1, 8, 8]; videos [N, F, H, W] or [N, F, H, W, 1] (every frame is classified:
the 8x8 window with the most ink is cut out of each frame). Larger images are handled the same way. A 4-D array
whose second or last axis is 1 or 3 is read as images (channels), otherwise as a video [N, F, H, W].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

FEATURES = 64


class DigitCNN(torch.nn.Module):
    def __init__(self, width: int = 32, features: int = FEATURES, classes: int = 10) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.GELU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1), torch.nn.GELU(),
            torch.nn.Flatten(),
            torch.nn.Linear(2 * width * 16, features), torch.nn.GELU(),
        )
        self.head = torch.nn.Linear(features, classes)
        self.num_features = features  # read by torchmetrics' FID

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 1, 8, 8] in [0, 1] -> penultimate features [N, 64]."""
        return self.body(images * 2 - 1)


def to_digit_batch(images) -> torch.Tensor:
    """Any reference-model output (see the module docstring) -> [N, 1, 8, 8] float32 in [0, 1]."""
    tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    tensor = tensor.float()
    if tensor.ndim == 5:  # video [N, F, H, W, C]
        tensor = tensor.mean(dim=-1).reshape(-1, 1, *tensor.shape[2:4])
    elif tensor.ndim == 4 and tensor.shape[-1] in (1, 3):  # images [N, H, W, C]
        tensor = tensor.mean(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    elif tensor.ndim == 4 and tensor.shape[1] in (1, 3):  # images [N, C, H, W]
        tensor = tensor.mean(dim=1, keepdim=True)
    elif tensor.ndim == 4:  # video [N, F, H, W]
        tensor = tensor.reshape(-1, 1, *tensor.shape[2:])
    elif tensor.ndim == 3:  # images [N, H, W]
        tensor = tensor[:, None]
    if tensor.ndim != 4 or tensor.shape[1] != 1 or min(tensor.shape[-2:]) < 8:
        raise ValueError(
            f"Expected images [N, H, W(, 1)] or videos [N, F, H, W(, 1)] of at least 8x8, got {tuple(tensor.shape)}."
        )
    if tensor.shape[-2:] != (8, 8):
        tensor = crop_inkiest_window(tensor)
    return tensor.clamp(0, 1)


def crop_inkiest_window(frames: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Cut the ``size`` x ``size`` window with the most ink out of each [N, 1, H, W] frame."""
    mass = F.avg_pool2d(frames, size, stride=1)  # [N, 1, H - size + 1, W - size + 1]
    width = mass.shape[-1]
    flat = mass.flatten(1).argmax(dim=1)
    rows, cols = flat // width, flat % width
    offsets = torch.arange(size)
    row_index = (rows[:, None] + offsets)[:, :, None].expand(-1, size, size)
    col_index = (cols[:, None] + offsets)[:, None, :].expand(-1, size, size)
    batch = torch.arange(frames.shape[0])[:, None, None]
    return frames[batch, 0, row_index, col_index][:, None]


class DigitClassifier:
    """``predict(images)`` -> class ids; ``features(images)`` -> [N, 64]; ``.model`` for torchmetrics' FID."""

    def __init__(self, model: DigitCNN) -> None:
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> DigitClassifier:
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        model = DigitCNN(width=config["width"], features=config["features"])
        model.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
        return cls(model)

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        return self.model(to_digit_batch(images))

    @torch.no_grad()
    def logits(self, images) -> torch.Tensor:
        return self.model.head(self.features(images))

    def predict(self, images) -> np.ndarray:
        return self.logits(images).argmax(dim=1).numpy()

    def accuracy(self, images, labels) -> float:
        """Share of images (or of all frames, for videos) recognised as their label."""
        predictions = self.predict(images)
        labels = np.asarray(labels)
        frames = len(predictions) // len(labels)
        return float(np.mean(predictions == np.repeat(labels, frames)))
