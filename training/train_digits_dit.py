"""Train ``digits-dit``: a class-conditional pixel-space DiT on the 8x8 digits (about 25 minutes on 2 cores).

    python -m training.train_digits_dit [--steps 2400] [--out accel/pipelines/reference_models/digits-dit]

Recipe: ``DiTTransformer2DModel`` with 12 layers, 4 heads x 32, patch 1 on native 8x8 pixels (64 tokens), one
output channel (no learned sigma); DDPM with 1,000 linear betas (1e-4 .. 0.02), epsilon prediction, MSE; AdamW
3e-4, batch 64, gradient clipping at 1.0, EMA 0.999; 10% of labels replaced by the null class 1000 for
classifier-free guidance. Departure from diffusers' built-in label dropout: that one draws independently in each
of the 12 blocks' own label embedders, so one sample could be conditioned in some blocks and unconditioned in
others; here the whole sample is dropped at once and the model is trained in eval mode (it has no dropout or
batch-norm, so eval mode changes nothing else). Saved in diffusers ``save_pretrained`` layout, EMA weights in
fp16, written atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel
from tqdm import tqdm

from accel.pipelines.digits import split
from accel.pipelines.reference import MODELS_DIR
from training.common import EMA, atomic_directory, get_logger, seed_everything, write_json_atomic

DEFAULT_OUT = MODELS_DIR / "digits-dit"
NULL_CLASS = 1000  # what DiTPipeline passes as the unconditional label
TRANSFORMER_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, patch_size=1, num_layers=12, num_attention_heads=4,
    attention_head_dim=32, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
)
NOISE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def sampling_scheduler() -> DDIMScheduler:
    # Trailing spacing starts sampling at t = 999 (pure noise); clipping x0 to [-1, 1] suits pixel space.
    return DDIMScheduler(**NOISE, clip_sample=True, set_alpha_to_one=False, timestep_spacing="trailing")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logger = get_logger("train_digits_dit", args.out.with_name(args.out.name + ".train.log"))
    generator = seed_everything(args.seed)
    train = split()["train"]
    images = torch.from_numpy(train.images)[:, None] * 2 - 1  # [N, 1, 8, 8] in [-1, 1]
    labels = torch.from_numpy(train.labels)

    model = DiTTransformer2DModel(**TRANSFORMER_CONFIG).eval()  # eval: no built-in per-block label dropout
    ema = EMA(model, decay=0.999)
    noise_scheduler = DDPMScheduler(**NOISE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    logger.info("digits-dit: %.2fM parameters, %d steps, batch %d, seed %d",
                sum(p.numel() for p in model.parameters()) / 1e6, args.steps, args.batch_size, args.seed)
    started, running = time.time(), 0.0
    for step in tqdm(range(1, args.steps + 1), desc="digits-dit"):
        index = torch.randint(0, len(labels), (args.batch_size,), generator=generator)
        clean, classes = images[index], labels[index].clone()
        classes[torch.rand(args.batch_size, generator=generator) < 0.1] = NULL_CLASS
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = model(noisy, timestep=timesteps, class_labels=classes).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 200 == 0 or step == args.steps:
            logger.info("step %d loss %.4f (smoothed) elapsed %.1f min", step, running, (time.time() - started) / 60)

    with atomic_directory(args.out) as folder:
        ema.model.to(torch.float16).save_pretrained(folder / "transformer", safe_serialization=True)
        sampling_scheduler().save_pretrained(folder / "scheduler")
        write_json_atomic(folder / "training.json", {
            "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "lr": 3e-4, "ema": 0.999,
            "label_dropout": 0.1, "minutes": round((time.time() - started) / 60, 1),
            "torch": torch.__version__, "final_smoothed_loss": round(running, 5),
        })
    logger.info("saved %s after %.1f minutes", args.out, (time.time() - started) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
