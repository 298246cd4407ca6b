"""Train ``moving-digits``: a class-conditional video transformer on clips of one digit bouncing on a canvas
(under 40 minutes on 2 cores).

    python -m training.train_moving_digits [--steps N] [--set NAME=VALUE ...] [--out FOLDER]

Everything that defines a run apart from the seed and the step count is one ``Recipe`` (its defaults below);
``--set lr=1e-3 --set patch=1`` changes fields for a recipe search, ``--max-minutes`` stops early, ``--history``
writes the evaluation curve, ``--no-save`` keeps the weights in memory only. ``train()`` is the same loop for
other callers and runs on any device; its random draws come from a CPU generator, so a step is the same
computation on the same batches everywhere.

Data: ``accel.pipelines.digits.moving_digit_clips`` over the train split, 17 frames of 16x16 pixels, a fresh
deterministic batch every step (seeded by the step index). Latents: ``FramePackingVAE`` with a temporal factor
of 2 (Wan-style grouping: the first frame alone, then pairs of frames stacked as channels), so a clip is
9 latent frames x 8 x 8 = 576 tokens after 2x2 patching: 9 key blocks of 64, one per latent frame.
Model: ``WanTransformer3DModel``, 8 layers, 4 heads x 32, FFN 512, conditioned by cross-attention on a learned
table of 4 tokens per class (``class_embeddings.safetensors``; row 10 is the null class used for guidance),
trained with 10% of labels dropped to the null class.

Training is a curriculum, then joint image-video training as video diffusion models are trained. The first 1,600
steps train on 64 one-latent-frame samples each (64 tokens): half of them a still frame (what a clip's latent frame
0 holds, the frame repeated on both channels) and half a pair of consecutive frames of a moving digit (what every
later latent frame holds; ``group_share``). They teach the digit shapes, the slow part. Every later step trains on
2 clips (motion) and 48 such samples. Objective: rectified flow (x_t = (1 - s) x0 + s noise, target noise - x0,
timestep 1000 s), which Wan's FlowMatchEulerDiscreteScheduler samples (shift 2); s is uniform mapped through that
shift, so training visits noise levels as the sampler does, favouring the high-noise steps where a digit's class is
decided. The squared error of pixels within one pixel of the digit's ink weighs 4 times that of the rest
(``ink_loss_weight=3``): the canvas is three quarters empty background, which is learnt first and would otherwise
dominate the loss. AdamW 8e-4 with a 100-step warm-up and a linear decay to 0 over the last 1,000 of the 2,800
steps, gradient clipping 1.0, EMA 0.998. Every ``--eval-every`` steps the EMA model generates clips of every class
through ``WanPipeline`` and the log reports per-frame class accuracy at each ``--eval-guidance``. EMA weights are
written in fp16, atomically. The default call samples 20 steps at guidance 6.

The shipped checkpoint is this recipe's seed-0 run (35.3 minutes on 2 cores, 2026-11-30): **92.2%** per-frame class
accuracy on 100 clips at guidance 6 (``python -m training.evaluate moving-digits``). Its log, at guidance
6 on 10 clips: 24% / 55% / 72% / 79% at steps 400 / 800 / 1,200 / 1,600, 70% at 2,000 once clips join, 79% at
2,400 and 92% at 2,800. Guidance 6 was fixed before this run, from a sweep of the run below on 40 selection clips
(seeds 5000+, disjoint from the model card's): 76% / 77% / 79% / 79% at guidance 4 / 5 / 6 / 7.

How the recipe got here (each a 38-minute seed-0 run, measured on the model card's 100 clips):

* without the ink weight (``ink_loss_weight=0``): 79.6% at guidance 5 and at 6. Its log at guidance 5: 15% / 38% /
  54% / 61% at steps 400 / 800 / 1,200 / 1,600, 53% at 2,000, 68% at 2,400, 84% at 2,800;
* without the ink weight and without pairs among the one-latent-frame samples (``group_share=0``, shipped before):
  78.5% at guidance 5. The first clip steps then met pair latent frames for the first time, and its log (guidance
  3, 10 clips) fell from 60% at step 1,600 to 34% at 2,000 before recovering to 69% at 2,800. On 40 clips, guidance
  3 / 4 / 5 / 6 / 7 gave 70% / 77% / 80% / 80% / 78%; 40 sampling steps or sampler shift 1 or 3 gave no more. Frame
  0 scored as the later frames did, so the shapes, not temporal consistency, were what was short.

Recipes tried before (per-frame accuracy of the EMA model, 10 clips, guidance 3 / 5 unless said):

* clips alone (33 frames packed 4 to a latent frame, 8 clips a step, lr 4e-4, 1,700 steps): speckled blobs, 13-16%;
* 8 clips + 48 frames a step, logit-normal noise levels, lr 4e-4 (1.5 s a step): 25% at step 750;
* 4 clips + 48 frames a step from the start (0.83-1.05 s a step): 17% at step 800 with EMA 0.998; with
  ``ema=0.995``: 5% / 5% at step 300, 13% / 17% at 600, 22% / 27% at 900 (stopped);
* ``patch=1 temporal_factor=4 clips_per_step=1 frames_per_step=16 ema=0.995`` (per-pixel tokens as in digits-dit;
  1,280 tokens per clip; 1.05 s a step): 11% / 11% at 300, 17% / 18% at 600, 17% / 16% at 900, 17% /
  18% at 1,200, 25% / 29% at 1,500 (stopped by ``--max-minutes 38``);
* 1 clip + 56 frames a step from the start, decay over the last 1,200 of 2,900 steps (2026-11-30): 7% / 14% / 25%
  at guidance 5 at steps 500 / 1,000 / 1,500, against 60% at 1,600 for the curriculum (stopped);
* single frames alone, 64 a step: 17% / 19% / 26% / 42% / 63% at steps 300 / 600 / 900 / 1,200 / 1,500 (single-frame
  accuracy of 100 samples), which led to the curriculum.

Diagnostics (2026-11-30; each 300 steps of 64 single frames, lr 8e-4, single-frame accuracy of 100 samples at
guidance 3; throw-away scripts, not kept):

* one 8x8 digit filling an 8x8 canvas, patch 1 (64 tokens): 94%; patch 2 (16 tokens): 95%. Wan with this
  conditioning learns class-conditional digits faster than digits-dit's DiT recipe (43% at the same step);
* the same digit centred on a 16x16 canvas, patch 2 (the same 16 digit tokens plus 48 background tokens): 23%;
  with a learned absolute position embedding patched in (diagnostic only): 20%; with the loss restricted to the
  digit's window: 38%; 8 heads and FFN 1,024: 11% at step 150;
* 16x16 canvas, patch 4 (16 tokens): centred 67%, random positions 10%; a 12x12 upscaled digit at random
  positions, patch 2: 29%; 64 canvas-filling close-ups a step beside 32 full frames: 13% on full frames;
* Xavier / zero-initialised output layers (DiT's adaLN-Zero idea): 18% (default init 17%); lr 2e-3: 17%.

So neither the cross-attention class signal, the objective nor missing absolute positions is what is slow: the
digit tokens learn in 300 steps on their own and slowly inside a mostly empty canvas, and WanPipeline's
multiple-of-16 canvas makes an 8x8 digit three quarters background. The loss restricted to the digit's window (38%
against 23%) led to the ink weight, which keeps the background in the loss. Untried: two digits a clip,
``torch.compile`` for the single-frame phase (measured 0.50 against 0.60 s a step after a 75-second compile).
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
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from safetensors.torch import save_file
from tqdm import tqdm

from accel.eval.metrics import output_array
from accel.pipelines.digits import moving_digit_clips, split
from accel.pipelines.pixel_space import FramePackingVAE
from accel.pipelines.reference import MODELS_DIR
from training import common
from training.common import EMA, atomic_directory, get_logger, learning_rate_factor, seed_everything, write_json_atomic

DEFAULT_OUT = MODELS_DIR / "moving-digits"
CLASS_TOKENS, TEXT_DIM, NULL_CLASS = 4, 64, 10
TIMESTEP_SAMPLINGS = ("shifted-uniform", "logit-normal")


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a moving-digits training run, apart from the seed and the number of steps."""

    canvas: int = 16
    frames: int = 17
    temporal_factor: int = 2  # frames folded into one latent frame (FramePackingVAE)
    patch: int = 2  # spatial patch of the transformer
    layers: int = 8
    heads: int = 4
    head_dim: int = 32
    ffn: int = 512
    lr: float = 8e-4
    warmup_steps: int = 100
    decay_steps: int = 1000  # the learning rate falls linearly to 0 over the run's last decay_steps steps
    ema: float = 0.998
    label_dropout: float = 0.1
    frames_only_steps: int = 1600  # curriculum: the first steps train on single frames alone ...
    frames_only_batch: int = 64  # ... this many a step
    clips_per_step: int = 2  # then clips (motion) ...
    frames_per_step: int = 48  # ... beside single frames ("one-latent-frame videos"); 0: clips only
    group_share: float = 0.5  # share of those one-latent-frame samples that hold temporal_factor consecutive frames
    ink_loss_weight: float = 3.0  # extra loss weight on pixels within one pixel of the digit's ink (1 + this)
    timestep_sampling: str = "shifted-uniform"
    sampling_shift: float = 2.0
    guidance_scale: float = 6.0  # the default call's guidance
    num_inference_steps: int = 20

    def __post_init__(self) -> None:
        if self.ink_loss_weight < 0:
            raise ValueError(f"ink_loss_weight must be 0 or more, got {self.ink_loss_weight}")
        if not 0.0 <= self.group_share <= 1.0:
            raise ValueError(f"group_share is a share of the single-frame samples, in [0, 1]; got {self.group_share}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.timestep_sampling!r}")
        if (self.frames - 1) % self.temporal_factor or self.canvas % 16 or 16 % self.patch:
            raise ValueError("frames must be 1 + k * temporal_factor, canvas a multiple of 16 (WanPipeline's rule) "
                             "and patch a divisor of 16")
        counts = (self.clips_per_step, self.frames_per_step, self.frames_only_steps, self.frames_only_batch,
                  self.decay_steps)
        if min(counts) < 0 or self.clips_per_step + self.frames_per_step < 1 or (
                self.frames_only_steps and self.frames_only_batch < 1):
            raise ValueError("clips_per_step, frames_per_step, frames_only_steps, frames_only_batch and decay_steps "
                             "must be 0 or more, with at least one clip or frame a step (and frames_only_batch at "
                             "least 1 when frames_only_steps is set)")

    def transformer_config(self) -> dict:
        return dict(
            patch_size=(1, self.patch, self.patch), num_attention_heads=self.heads, attention_head_dim=self.head_dim,
            in_channels=self.temporal_factor, out_channels=self.temporal_factor, text_dim=TEXT_DIM, freq_dim=64,
            ffn_dim=self.ffn, num_layers=self.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6, rope_max_seq_len=64,
        )

    def tokens_per_clip(self) -> int:
        return (1 + (self.frames - 1) // self.temporal_factor) * (self.canvas // self.patch) ** 2

    def call(self) -> dict:
        """The pipeline call the model card is measured with (``accel.pipelines.reference.DEFAULT_CALL``)."""
        return dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    height=self.canvas, width=self.canvas, num_frames=self.frames)


RECIPE = Recipe()


def parse_overrides(pairs: list[str]) -> dict:
    """``["lr=1e-3", "layers=12"]`` -> typed Recipe overrides; unknown names or bad values raise ValueError."""
    return common.parse_overrides(Recipe, pairs)


class ClassConditioning(torch.nn.Module):
    """A learned [11, 4, 64] table: the 'prompt embeddings' of the 10 digit classes and the null class."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(NULL_CLASS + 1, CLASS_TOKENS, TEXT_DIM) * 0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table[labels]


def make_vae(recipe: Recipe = RECIPE) -> FramePackingVAE:
    factor = recipe.temporal_factor
    return FramePackingVAE(channels=1, scale_factor_temporal=factor, z_dim=factor,
                           latents_mean=(0.0,) * factor, latents_std=(1.0,) * factor)


def sampling_scheduler(recipe: Recipe = RECIPE) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=recipe.sampling_shift)


def noise_levels(recipe: Recipe, count: int, generator: torch.Generator) -> torch.Tensor:
    if recipe.timestep_sampling == "logit-normal":
        return torch.sigmoid(torch.randn(count, generator=generator))
    # uniform t mapped through the sampler's shift: noise levels visited as the sampler visits them, which favours
    # the high-noise steps where the digit's class and position are decided
    uniform = torch.rand(count, generator=generator)
    return recipe.sampling_shift * uniform / (1 + (recipe.sampling_shift - 1) * uniform)


def flow_matching_loss(recipe, model, conditioning, clean, labels, generator) -> torch.Tensor:
    """Rectified flow: x_s = (1 - s) x0 + s noise, target noise - x0, timestep 1000 s. Random draws come from a CPU
    generator, so a run is the same sequence of batches on any device."""
    device = clean.device
    labels = labels.clone()
    labels[torch.rand(len(labels), generator=generator) < recipe.label_dropout] = NULL_CLASS
    noise = torch.randn(clean.shape, generator=generator).to(device)
    sigma = noise_levels(recipe, len(labels), generator).to(device)
    noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1, 1) * noise
    prediction = model(noisy, timestep=sigma * 1000, encoder_hidden_states=conditioning(labels.to(device))).sample
    if not recipe.ink_loss_weight:
        return F.mse_loss(prediction, noise - clean)
    # weight the pixels near the digit's ink: a 16x16 canvas is three quarters background, which is learnt first
    ink = (clean > -1).flatten(0, 1).float()  # [B * channels, frames, H, W]; background is exactly -1
    near_ink = F.max_pool3d(ink, (1, 3, 3), stride=1, padding=(0, 1, 1)).view_as(clean)
    weight = 1 + recipe.ink_loss_weight * near_ink
    return (weight * (prediction - (noise - clean)) ** 2).sum() / weight.sum()


@torch.no_grad()
def per_frame_accuracy(recipe: Recipe, model, table: torch.Tensor, *, clips_per_class: int = 1, seed: int = 0,
                       guidance_scale: float | None = None) -> float:
    """Clips of every class generated through WanPipeline, scored frame by frame by the digit classifier."""
    from accel.pipelines.reference import classifier

    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=make_vae(recipe).to(table.device),
                       scheduler=sampling_scheduler(recipe))
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(clips_per_class).to(table.device)
    call = recipe.call()
    if guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    frames = output_array(pipe(prompt_embeds=table[labels],
                               negative_prompt_embeds=table[torch.full_like(labels, NULL_CLASS)],
                               generator=torch.Generator().manual_seed(seed), output_type="np", **call))
    return classifier().accuracy(frames, labels.cpu().numpy())


def one_latent_frame_batch(recipe: Recipe, vae: FramePackingVAE, data, count: int,
                           data_seed) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` one-latent-frame samples [count, temporal_factor, 1, H, W] and their labels: still frames (what a
    clip's latent frame 0 holds) and, for ``group_share`` of them, groups of consecutive frames of a moving digit
    (what every later latent frame holds), each packed by ``vae`` as it packs a clip."""
    groups = round(count * recipe.group_share)
    parts = []
    if count > groups:
        stills, labels = moving_digit_clips(data, count - groups, frames=1, canvas=recipe.canvas, seed=(data_seed, 1))
        parts.append((vae.encode(torch.from_numpy(stills)[:, None]), torch.from_numpy(labels)))
    if groups:
        frames, labels = moving_digit_clips(data, groups, frames=recipe.temporal_factor, canvas=recipe.canvas,
                                            seed=(data_seed, 2))
        # a lead frame, then the group: the group is the clip's latent frame 1
        clips = torch.from_numpy(np.concatenate([frames[:, :1], frames], axis=1))[:, None]
        parts.append((vae.encode(clips)[:, :, 1:], torch.from_numpy(labels)))
    return torch.cat([latents for latents, _ in parts]), torch.cat([labels for _, labels in parts])


def train(recipe: Recipe, steps: int, *, seed: int = 0, device: str = "cpu", eval_every: int = 0,
          eval_clips_per_class: int = 1, eval_guidances: tuple[float, ...] = (), max_minutes: float | None = None,
          logger=None, progress: bool = True):
    """Train for ``steps`` (or until ``max_minutes``); returns (EMA transformer, EMA class table, history).

    history: {"steps", "minutes", "smoothed_loss", "evaluations": {step: {guidance: per-frame accuracy}}}.
    """
    log = logger.info if logger is not None else (lambda *args: None)
    generator = seed_everything(seed)
    train_split = split()["train"]
    vae = make_vae(recipe)
    model = WanTransformer3DModel(**recipe.transformer_config()).to(device).train()
    conditioning = ClassConditioning().to(device)
    parameters = [*model.parameters(), *conditioning.parameters()]
    ema_model, ema_conditioning = EMA(model, recipe.ema), EMA(conditioning, recipe.ema)
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda index: learning_rate_factor(recipe, index + 1, steps))
    log("moving-digits: %.2fM parameters, %d tokens per clip, up to %d steps, seed %d, recipe %s",
        sum(p.numel() for p in parameters) / 1e6, recipe.tokens_per_clip(), steps, seed, dataclasses.asdict(recipe))
    guidances = eval_guidances or (recipe.guidance_scale,)
    started, running, evaluations, step = time.time(), 0.0, {}, 0

    def batch(count: int, frames: int, data_seed) -> tuple[torch.Tensor, torch.Tensor]:
        clips, labels = moving_digit_clips(train_split, count, frames=frames, canvas=recipe.canvas, seed=data_seed)
        return vae.encode(torch.from_numpy(clips)[:, None]).to(device), torch.from_numpy(labels)

    for step in tqdm(range(1, steps + 1), desc="moving-digits", disable=not progress):
        data_seed = seed * 1_000_003 + step
        clips, frames = ((0, recipe.frames_only_batch) if step <= recipe.frames_only_steps
                         else (recipe.clips_per_step, recipe.frames_per_step))
        loss = 0.0
        if clips:
            loss = flow_matching_loss(recipe, model, conditioning, *batch(clips, recipe.frames, data_seed), generator)
        if frames:
            latents, labels = one_latent_frame_batch(recipe, vae, train_split, frames, data_seed)
            loss = loss + flow_matching_loss(recipe, model, conditioning, latents.to(device), labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        ema_model.update(model)
        ema_conditioning.update(conditioning)
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        minutes = (time.time() - started) / 60
        out_of_time = max_minutes is not None and minutes >= max_minutes
        if step % 100 == 0 or step == steps or out_of_time:
            log("step %d loss %.4f (smoothed) elapsed %.1f min", step, running, minutes)
        if eval_every and (step % eval_every == 0 or step == steps or out_of_time):
            table = ema_conditioning.model.table.detach()
            evaluations[step] = {
                guidance: per_frame_accuracy(recipe, ema_model.model, table, guidance_scale=guidance,
                                             clips_per_class=eval_clips_per_class)
                for guidance in guidances
            }
            scores = ", ".join(f"{acc:.3f} at guidance {g}" for g, acc in evaluations[step].items())
            log("step %d EMA model: per-frame class accuracy %s (%d clips)", step, scores, 10 * eval_clips_per_class)
        if out_of_time:
            break
    history = {"steps": step, "minutes": round((time.time() - started) / 60, 2), "smoothed_loss": running,
               "evaluations": evaluations}
    return ema_model.model, ema_conditioning.model.table.detach(), history


def save(folder: Path, recipe: Recipe, model, table: torch.Tensor, history: dict, seed: int) -> None:
    with atomic_directory(folder) as staging:
        model.to("cpu", torch.float16).save_pretrained(staging / "transformer", safe_serialization=True)
        sampling_scheduler(recipe).save_pretrained(staging / "scheduler")
        make_vae(recipe).save_config(staging / "vae")
        save_file({"table": table.cpu().to(torch.float16).contiguous()}, staging / "class_embeddings.safetensors")
        write_json_atomic(staging / "training.json", {
            "recipe": dataclasses.asdict(recipe), "seed": seed, "steps": history["steps"],
            "minutes": round(history["minutes"], 1), "torch": torch.__version__,
            "final_smoothed_loss": round(history["smoothed_loss"], 5),
            "per_frame_accuracy_during_training": {
                str(step): {str(g): round(acc, 3) for g, acc in scores.items()}
                for step, scores in history["evaluations"].items()
            },
        })


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=2800)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a Recipe field (repeatable), e.g. --set lr=1e-3")
    parser.add_argument("--eval-every", type=int, default=400, help="0: no evaluation during training")
    parser.add_argument("--eval-clips-per-class", type=int, default=1)
    parser.add_argument("--eval-guidance", type=float, action="append", default=[],
                        help="guidance scales to evaluate at (repeatable; default: the recipe's)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early after this long")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--history", type=Path, default=None, help="also write the training history JSON here")
    parser.add_argument("--no-save", action="store_true", help="train and evaluate only (recipe search)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_every < 0 or args.eval_clips_per_class < 1:
        parser.error("--steps and --eval-clips-per-class must be at least 1, --eval-every 0 or more")
    try:
        recipe = dataclasses.replace(RECIPE, **parse_overrides(args.overrides))
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    log_file = None if args.no_save else args.out.with_name(args.out.name + ".train.log")
    logger = get_logger("train_moving_digits", log_file)
    model, table, history = train(recipe, args.steps, seed=args.seed, device=args.device, eval_every=args.eval_every,
                                  eval_clips_per_class=args.eval_clips_per_class,
                                  eval_guidances=tuple(args.eval_guidance), max_minutes=args.max_minutes,
                                  logger=logger, progress=not args.no_save)
    if args.history is not None:
        write_json_atomic(args.history, {"recipe": dataclasses.asdict(recipe), "seed": args.seed,
                                         "device": args.device, **history})
    if not args.no_save:
        save(args.out, recipe, model, table, history, args.seed)
        logger.info("saved %s after %.1f minutes", args.out, history["minutes"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
