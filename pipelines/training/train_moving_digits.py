"""Train ``moving-digits``: a class-conditional video transformer on clips of one digit bouncing on a canvas
(about 40 minutes on 2 cores).

    python -m pipelines.training.train_moving_digits [--steps N] [--out pipelines/reference_models/moving-digits]

Data: ``pipelines.digits.moving_digit_clips`` over the train split, 33 frames of 16x16 pixels, a fresh
deterministic batch of clips every step (seeded by the step index). Latents: ``FramePackingVAE`` folds frames
1 + 4k into 9 latent frames of 4 channels (as Wan's own VAE groups time), so a clip is 9 x 8 x 8 = 576 tokens
after 2x2 patching: 9 key blocks of 64, one per latent frame.
Model: ``WanTransformer3DModel``, 8 layers, 4 heads x 32, FFN 512, conditioned by cross-attention on a learned
table of 4 tokens per class (``class_embeddings.safetensors``; row 10 is the null class used for guidance),
trained with 10% of labels dropped to the null class. Objective: rectified flow (x_t = (1 - s) x0 + s noise,
target noise - x0, s uniform, timestep 1000 s), which is what Wan's FlowMatchEulerDiscreteScheduler samples.
AdamW 3e-4 with a 100-step warm-up, batch 8, gradient clipping 1.0, EMA 0.999; fp16 weights written atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from safetensors.torch import save_file
from tqdm import tqdm

from pipelines.digits import moving_digit_clips, split
from pipelines.pixel_space import FramePackingVAE
from pipelines.training.common import EMA, atomic_directory, get_logger, seed_everything, write_json_atomic

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "reference_models" / "moving-digits"
FRAMES, CANVAS, CLASS_TOKENS, TEXT_DIM, NULL_CLASS = 33, 16, 4, 64, 10
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
    text_dim=TEXT_DIM, freq_dim=64, ffn_dim=512, num_layers=8, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)
SAMPLING_SHIFT = 2.0


class ClassConditioning(torch.nn.Module):
    """A learned [11, 4, 64] table: the 'prompt embeddings' of the 10 digit classes and the null class."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(NULL_CLASS + 1, CLASS_TOKENS, TEXT_DIM) * 0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table[labels]


def sampling_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SAMPLING_SHIFT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=2200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logger = get_logger("train_moving_digits", args.out.with_name(args.out.name + ".train.log"))
    generator = seed_everything(args.seed)
    train = split()["train"]
    vae = FramePackingVAE()
    model = WanTransformer3DModel(**TRANSFORMER_CONFIG).train()
    conditioning = ClassConditioning()
    parameters = [*model.parameters(), *conditioning.parameters()]
    ema_model, ema_conditioning = EMA(model), EMA(conditioning)
    optimizer = torch.optim.AdamW(parameters, lr=3e-4, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    logger.info("moving-digits: %.2fM parameters, %d steps, batch %d, seed %d",
                sum(p.numel() for p in parameters) / 1e6, args.steps, args.batch_size, args.seed)
    started, running = time.time(), 0.0
    for step in tqdm(range(1, args.steps + 1), desc="moving-digits"):
        clips, labels = moving_digit_clips(
            train, args.batch_size, frames=FRAMES, canvas=CANVAS, seed=args.seed * 1_000_003 + step
        )
        clean = vae.encode(torch.from_numpy(clips)[:, None])  # [B, 4, 9, 16, 16] in [-1, 1]
        labels = torch.from_numpy(labels)
        labels[torch.rand(len(labels), generator=generator) < 0.1] = NULL_CLASS
        noise = torch.randn(clean.shape, generator=generator)
        sigma = torch.rand(len(labels), generator=generator)
        noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1, 1) * noise
        prediction = model(noisy, timestep=sigma * 1000, encoder_hidden_states=conditioning(labels)).sample
        loss = F.mse_loss(prediction, noise - clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        warmup.step()
        ema_model.update(model)
        ema_conditioning.update(conditioning)
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0 or step == args.steps:
            logger.info("step %d loss %.4f (smoothed) elapsed %.1f min", step, running, (time.time() - started) / 60)

    with atomic_directory(args.out) as folder:
        ema_model.model.to(torch.float16).save_pretrained(folder / "transformer", safe_serialization=True)
        sampling_scheduler().save_pretrained(folder / "scheduler")
        vae.save_config(folder / "vae")
        table = ema_conditioning.model.table.detach().to(torch.float16).contiguous()
        save_file({"table": table}, folder / "class_embeddings.safetensors")
        write_json_atomic(folder / "training.json", {
            "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "lr": 3e-4, "ema": 0.999,
            "label_dropout": 0.1, "frames": FRAMES, "canvas": CANVAS,
            "minutes": round((time.time() - started) / 60, 1),
            "torch": torch.__version__, "final_smoothed_loss": round(running, 5),
        })
    logger.info("saved %s after %.1f minutes", args.out, (time.time() - started) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
