"""Train ``digits-dit``: a class-conditional pixel-space DiT on the 8x8 digits (under 60 minutes on 2 cores).

    python -m training.train_digits_dit [--steps N] [--set NAME=VALUE ...] [--out FOLDER]

Model: ``DiTTransformer2DModel`` with 12 layers, 4 heads x 32, patch 1 on native 8x8 pixels (64 tokens), one output
channel (no learned sigma), classes 0..9 and the null class 1000 that ``DiTPipeline`` passes for guidance. The
``Recipe`` holds every other choice: the noise schedule (DDPM betas, optionally rescaled to zero terminal SNR), the
prediction target, Min-SNR loss weighting (Hang et al., arXiv 2303.09556), AdamW with warm-up and a linear decay to
0, EMA, and the share of labels dropped to the null class. The model card (``python -m training.evaluate
digits-dit``) records what each choice was measured to do. The sampler saved with it is DDIM with trailing spacing
and *no* x0 clipping: clipping x0 to [-1, 1] at every step is what made the earlier checkpoint worse with more steps
and broke it at guidance above 2 (see the card).

Label dropout departs from diffusers' built-in one, which draws independently in each of the 12 blocks' own label
embedders (one sample could be conditioned in some blocks and not in others): here the whole sample is dropped at
once, and the model trains in eval mode (it has no dropout or batch norm, so eval mode changes nothing else). Saved
in diffusers ``save_pretrained`` layout, EMA weights in fp16, written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel
from tqdm import tqdm

from accel.eval.metrics import output_array
from accel.pipelines.digits import split
from accel.pipelines.reference import MODELS_DIR
from training import common
from training.common import EMA, atomic_directory, get_logger, learning_rate_factor, seed_everything, write_json_atomic

DEFAULT_OUT = MODELS_DIR / "digits-dit"
NULL_CLASS = 1000  # what DiTPipeline passes as the unconditional label
TRANSFORMER_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, patch_size=1, num_layers=12, num_attention_heads=4,
    attention_head_dim=32, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
)
PREDICTIONS = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a digits-dit training run, apart from the seed and the number of steps."""

    prediction: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"  # cosine: fewer steps spent near pure noise than linear
    zero_terminal_snr: bool = True  # rescale the betas so the last timestep is pure noise (needs v_prediction)
    min_snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting; 0 (default) is plain MSE on the target
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    decay_steps: int = 1500  # the learning rate falls linearly to 0 over the run's last decay_steps steps
    ema: float = 0.999
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    guidance_scale: float = 1.5  # the default call's guidance
    num_inference_steps: int = 20

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.zero_terminal_snr and self.prediction != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction='v_prediction': at zero SNR the last step's noise "
                             "says nothing about the image")
        if self.min_snr_gamma < 0 or not 0 <= self.label_dropout < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("min_snr_gamma must be 0 or more, label_dropout in [0, 1), batch_size and lr positive")

    def noise(self) -> dict:
        return dict(num_train_timesteps=1000, beta_schedule=self.beta_schedule, beta_start=1e-4, beta_end=0.02,
                    prediction_type=self.prediction, rescale_betas_zero_snr=self.zero_terminal_snr)

    def sampling_scheduler(self) -> DDIMScheduler:
        # Trailing spacing starts sampling at t = 999 (pure noise with zero terminal SNR); no x0 clipping.
        return DDIMScheduler(**self.noise(), clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")

    def call(self) -> dict:
        """The pipeline call the model card is measured with (``accel.pipelines.reference.DEFAULT_CALL``)."""
        return dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale)


RECIPE = Recipe()


def parse_overrides(pairs: list[str]) -> dict:
    """``["lr=1e-3", "prediction=epsilon"]`` -> typed Recipe overrides; unknown names, bad values: ValueError."""
    return common.parse_overrides(Recipe, pairs)


def sampling_scheduler() -> DDIMScheduler:
    return RECIPE.sampling_scheduler()


def diffusion_loss(recipe: Recipe, model, noise_scheduler: DDPMScheduler, clean: torch.Tensor,
                   classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The recipe's target at uniformly drawn timesteps, MSE per sample weighted by Min-SNR-gamma when set."""
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(clean),), generator=generator)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    if recipe.prediction == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    prediction = model(noisy, timestep=timesteps, class_labels=classes).sample
    per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    if recipe.min_snr_gamma:
        alphas = noise_scheduler.alphas_cumprod[timesteps]
        snr = alphas / (1 - alphas)
        clipped = snr.clamp(max=recipe.min_snr_gamma)
        # Min-SNR weights the x0 error by min(SNR, gamma); in terms of the eps / v error that is:
        per_sample = per_sample * (clipped / snr if recipe.prediction == "epsilon" else clipped / (snr + 1))
    return per_sample.mean()


@torch.no_grad()
def quick_check(recipe: Recipe, model, samples: int = 100, seed: int = 4000) -> dict:
    """Class accuracy and digit FID of ``samples`` images at the default call (seeds disjoint from the card's)."""
    from diffusers import DiTPipeline

    from accel.eval.metrics import digit_fid
    from accel.pipelines.pixel_space import PixelSpaceVAE
    from accel.pipelines.reference import classifier

    pipe = DiTPipeline(transformer=model, vae=PixelSpaceVAE(), scheduler=recipe.sampling_scheduler())
    pipe.set_progress_bar_config(disable=True)
    labels = [label for label in range(10) for _ in range(samples // 10)]
    images = output_array(pipe(class_labels=labels, generator=torch.Generator().manual_seed(seed), output_type="np",
                               **recipe.call()))
    judge = classifier()
    return {"class_accuracy": round(judge.accuracy(images, labels), 3),
            "fid": round(digit_fid(judge, images, split()["held_out"].images), 2)}


def train(recipe: Recipe, steps: int, seed: int = 0, check_every: int = 0, logger=None, progress: bool = True,
          max_minutes: float | None = None, init: DiTTransformer2DModel | None = None,
          subset: np.ndarray | None = None, name: str = "digits-dit"):
    """Train and return (EMA model, the log of quick checks, final smoothed loss, minutes, steps run).

    ``init``: fine-tune a copy of this model (fp32) instead of training a fresh one; ``subset``: indices of the
    train split to use instead of all of it."""
    generator = seed_everything(seed)
    train_split = split()["train"]
    images = torch.from_numpy(train_split.images)[:, None] * 2 - 1  # [N, 1, 8, 8] in [-1, 1]
    labels = torch.from_numpy(train_split.labels)
    if subset is not None:
        images, labels = images[torch.as_tensor(subset)], labels[torch.as_tensor(subset)]
    if init is None:
        model = DiTTransformer2DModel(**TRANSFORMER_CONFIG).eval()  # eval: no built-in per-block label dropout
    else:
        model = DiTTransformer2DModel.from_config(init.config).eval()
        model.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
    ema = EMA(model, decay=recipe.ema)
    noise_scheduler = DDPMScheduler(**recipe.noise())
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda index: learning_rate_factor(recipe, index + 1, steps))
    if logger:
        logger.info("%s: %.2fM parameters, %d steps, seed %d, %d images, %s", name,
                    sum(p.numel() for p in model.parameters()) / 1e6, steps, seed, len(labels), recipe)
    started, running, checks = time.time(), 0.0, []
    for step in tqdm(range(1, steps + 1), desc=name, disable=not progress):
        index = torch.randint(0, len(labels), (recipe.batch_size,), generator=generator)
        clean, classes = images[index], labels[index].clone()
        classes[torch.rand(recipe.batch_size, generator=generator) < recipe.label_dropout] = NULL_CLASS
        loss = diffusion_loss(recipe, model, noise_scheduler, clean, classes, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        ema.update(model)
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        minutes = (time.time() - started) / 60
        if logger and (step % 200 == 0 or step == steps):
            logger.info("step %d loss %.4f (smoothed) lr %.2e elapsed %.1f min", step, running,
                        schedule.get_last_lr()[0], minutes)
        if check_every and (step % check_every == 0 or step == steps):
            checks.append({"step": step, **quick_check(recipe, ema.model)})
            if logger:
                logger.info("step %d EMA check (100 samples, default call): %s", step, checks[-1])
        if max_minutes is not None and minutes > max_minutes:
            if logger:
                logger.info("stopped at step %d: --max-minutes %.0f reached", step, max_minutes)
            break
    return ema.model, checks, running, (time.time() - started) / 60, step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a Recipe field (repeatable), e.g. --set prediction=epsilon")
    parser.add_argument("--check-every", type=int, default=1000, help="quick EMA check every N steps (0: off)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early after this many minutes")
    parser.add_argument("--no-save", action="store_true", help="train and log only")
    args = parser.parse_args(argv)
    try:
        recipe = dataclasses.replace(RECIPE, **parse_overrides(args.overrides))
    except ValueError as error:
        parser.error(str(error))
    if args.steps < 1:
        parser.error(f"--steps must be 1 or more, got {args.steps}")
    logger = get_logger("train_digits_dit", None if args.no_save else args.out.with_name(args.out.name + ".train.log"))
    model, checks, loss, minutes, steps_run = train(recipe, args.steps, args.seed, args.check_every, logger,
                                         max_minutes=args.max_minutes)
    if args.no_save:
        return 0
    with atomic_directory(args.out) as folder:
        model.to(torch.float16).save_pretrained(folder / "transformer", safe_serialization=True)
        recipe.sampling_scheduler().save_pretrained(folder / "scheduler")
        write_json_atomic(folder / "training.json", {
            "steps": steps_run, "seed": args.seed, "recipe": dataclasses.asdict(recipe), "checks": checks,
            "minutes": round(minutes, 1), "torch": torch.__version__, "final_smoothed_loss": round(loss, 5),
            "threads": torch.get_num_threads(), "numpy": np.__version__,
        })
    logger.info("saved %s after %.1f minutes", args.out, minutes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
