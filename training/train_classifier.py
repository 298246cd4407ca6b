"""Train the digit classifier / feature extractor on the train split (about a minute on 2 cores).

    python -m training.train_classifier [--out accel/pipelines/reference_models/digit-classifier]

Recipe: ``DigitCNN`` (3 conv layers, 64 features), AdamW 1e-3, batch 64, 40 epochs, cosine decay, augmented with
random sub-pixel shifts of up to 1 pixel, so the features also hold for generated samples and for the digit crops
cut from video frames. Reports held-out accuracy; writes fp16 safetensors + config atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from accel.pipelines.classifier import FEATURES, DigitClassifier, DigitCNN
from accel.pipelines.digits import split
from accel.pipelines.reference import MODELS_DIR
from training.common import atomic_directory, get_logger, seed_everything, write_json_atomic

DEFAULT_OUT = MODELS_DIR / "digit-classifier"


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations of up to 1 pixel (bilinear), one per image."""
    theta = torch.zeros(len(images), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = (torch.rand(len(images), 2, generator=generator) * 2 - 1) * (2 / 8)
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logger = get_logger("train_classifier", args.out.with_name(args.out.name + ".train.log"))
    generator = seed_everything(args.seed)
    data = split()
    train_x = torch.from_numpy(data["train"].images)[:, None]
    train_y = torch.from_numpy(data["train"].labels)
    model = DigitCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps_per_epoch = int(np.ceil(len(train_y) / 64))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * steps_per_epoch)
    for epoch in tqdm(range(args.epochs), desc="classifier"):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            logits = model.head(model(shift(train_x[index], generator)))
            loss = F.cross_entropy(logits, train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if (epoch + 1) % 10 == 0:
            accuracy = DigitClassifier(model).accuracy(data["held_out"].images, data["held_out"].labels)
            logger.info("epoch %d loss %.4f held-out accuracy %.4f", epoch + 1, loss.item(), accuracy)
            model.train()
    with atomic_directory(args.out) as folder:
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
        write_json_atomic(folder / "config.json", {"width": 32, "features": FEATURES, "seed": args.seed})
    reloaded = DigitClassifier.from_pretrained(args.out)
    accuracy = reloaded.accuracy(data["held_out"].images, data["held_out"].labels)
    logger.info("saved %s; held-out accuracy of the fp16 weights: %.4f", args.out, accuracy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
