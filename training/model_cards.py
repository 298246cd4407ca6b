"""Model cards written from the measured ``metrics.json`` and ``training.json`` beside the weights."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else {}


def _parameters_m(folder: Path) -> str:
    from safetensors import safe_open

    total = 0
    for path in (folder / "transformer").glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return f"{total / 1e6:.2f}"


def _uncontended_minutes(folder: Path, steps: int | None) -> str:
    """Projected training time at the fastest rate the training log shows between two progress lines.

    The wall-clock minutes in training.json include any time other jobs shared the 2 cores; this projection
    is what the script takes on its own.
    """
    import datetime
    import re

    log = folder.with_name(folder.name + ".train.log")
    if not steps or not log.exists():
        return "n/a"
    points = [
        (datetime.datetime.strptime(match[1], "%H:%M:%S"), int(match[2]))
        for match in re.finditer(r"^(\d\d:\d\d:\d\d) step (\d+) ", log.read_text(), flags=re.M)
    ]
    rates = [
        ((t1 - t0).total_seconds() % 86400) / (s1 - s0)
        for (t0, s0), (t1, s1) in zip(points, points[1:])
        if s1 > s0 and (t1 - t0).total_seconds() % 86400 > 0
    ]
    return f"{min(rates) * steps / 60:.0f}" if rates else "n/a"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


ABLATIONS = Path(__file__).with_name("digits_dit_ablations.json")


def _ablation_table(ablations: dict) -> str:
    cells = sorted({cell for row in ablations.get("rows", []) for cell in row["cells"]},
                   key=lambda cell: tuple(float(part) for part in cell.split(":")))
    header = "| variant | " + " | ".join(f"{c.replace(':', ' steps, g ')}" for c in cells) + " |"
    lines = [header, "| --- |" + " --- |" * len(cells)]
    for row in ablations.get("rows", []):
        values = []
        for cell in cells:
            fid, accuracy = row["cells"].get(cell, (None, None))
            values.append("" if fid is None else f"{fid:.1f}" + ("" if accuracy is None else f" ({_pct(accuracy)})"))
        lines.append(f"| {row['variant']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _bars(settings: dict, no_argument: dict) -> str:
    """The retraining issue's bars, checked on the measured grid."""
    def fid(steps, guidance):
        return settings.get(f"{steps}_steps_guidance_{guidance}", {}).get("fid_vs_held_out", float("nan"))

    lowest = min((s["class_accuracy"] for s in settings.values()), default=float("nan"))
    checks = [
        (f"FID at 50 steps <= 1.1 x FID at 20 steps (guidance 1.5): {fid(50, 1.5):.2f} vs {1.1 * fid(20, 1.5):.2f}",
         fid(50, 1.5) <= 1.1 * fid(20, 1.5)),
        (f"FID at 20 steps, guidance 1.5 <= 18: {fid(20, 1.5):.2f}", fid(20, 1.5) <= 18),
        (f"class accuracy >= 95% in every cell: lowest {_pct(lowest)}", lowest >= 0.95),
        (f"`pipe(class_labels=labels)` with nothing else >= 95% on {no_argument.get('samples')} samples: "
         f"{_pct(no_argument.get('class_accuracy', 0))}", no_argument.get("class_accuracy", 0) >= 0.95),
    ]
    return "\n".join(f"- {'met' if ok else '**not met**'}: {text}" for text, ok in checks)


def digits_dit_card(folder: Path) -> str:
    metrics, training = _load(folder, "metrics.json"), _load(folder, "training.json")
    ablations = json.loads(ABLATIONS.read_text()) if ABLATIONS.exists() else {}
    recipe, settings = training.get("recipe", {}), metrics.get("settings", {})
    rows = "\n".join(
        f"| {s['num_inference_steps']} | {s['guidance_scale']} | {_pct(s['class_accuracy'])} | "
        f"{s['fid_vs_held_out']:.2f} | {1000 * s['seconds_per_image']:.1f} |"
        for s in settings.values()
    )
    no_argument = metrics.get("no_argument_call", {})
    checks = "; ".join(f"step {c.get('step')}: {_pct(c.get('class_accuracy', 0))}, FID {c.get('fid')}"
                       for c in training.get("checks", [])) or "-"
    return f"""# digits-dit

A class-conditional image diffusion transformer for 8x8 handwritten digits, trained in this repository so that
accel's quality figures stand on a trained model. Loaded offline with `accel.pipelines.reference.load("digits-dit")`,
which returns a `DigitsDiTPipeline`: a diffusers `DiTPipeline` whose call defaults are the ones measured here, so
`pipe(class_labels=[3, 7])` needs nothing else.

## Model
- `DiTTransformer2DModel`: 12 blocks, 4 heads x 32 (hidden 128), AdaLN-Zero, patch 1 on native 8x8 pixels
  (64 tokens), 1 output channel ({recipe.get('prediction', 'v_prediction')}, no learned sigma);
  {_parameters_m(folder)}M parameters, fp16 safetensors.
- Pixel space: `PixelSpaceVAE` (no weights) stands in for the VAE; the pipeline maps [-1, 1] to [0, 1].
- Sampler: `DDIMScheduler`, 1,000 `{recipe.get('beta_schedule')}` betas
  {'rescaled to zero terminal SNR' if recipe.get('zero_terminal_snr') else ''}, trailing spacing (sampling starts at
  t = 999), **no x0 clipping**.
- Defaults (`accel.pipelines.reference.DEFAULT_CALL`, and the pipeline's own call): {recipe.get('num_inference_steps')}
  steps, guidance {recipe.get('guidance_scale')}. The grid below shows what other settings give.
- Classes 0..9; the null class for guidance is 1000, as DiTPipeline passes it.

## Data
scikit-learn's bundled `load_digits()` (1,797 digits), fixed stratified split (`accel.pipelines.digits.split`, seed 0):
1,347 train, 450 held-out. Held-out digits give the FID reference statistics.

## Training
`python -m training.train_digits_dit` (seed {training.get('seed', 0)}): {training.get('steps')} steps with the recipe
`{recipe}`: AdamW with a linear warm-up and a linear decay to 0 over the last `decay_steps`, EMA of the weights,
whole-sample label dropout to the null class, MSE on the prediction target. Final smoothed loss
{training.get('final_smoothed_loss')}; {training.get('minutes')} minutes on {training.get('threads')} CPU threads.
Quick checks of the EMA model during training (100 samples at the default call; a 100-sample FID reads far above
the 1,000-sample one, so compare these only with each other): {checks}. Log: `../digits-dit.train.log`.

## What caused the faults of the earlier checkpoint, and what fixed them
The checkpoint shipped until 2026-12 (epsilon target, linear betas, DDIM with x0 clipped to [-1, 1]) scored worse at
50 steps than at 20 and drew the wrong digit at guidance 4. Measured one change at a time.
{ablations.get('about', '')} One training run per recipe, no seed repeats: differences of a point or two
are not established. Cells are FID (class accuracy):

{_ablation_table(ablations)}

- **x0 clipping** caused the step and guidance failures: half of the real pixels are exactly black, on the clip
  boundary, and DDIM's clipped x0 drifts further each step; more steps or stronger guidance compound it. Without it
  the same weights are better at 50 steps than at 20 and keep 100% class accuracy at guidance 4. Diffusers'
  dynamic thresholding at `sample_max_value=1` is the same clip. It stays off.
- **v-prediction with zero terminal SNR** lowers FID at every cell against epsilon (kept).
- **Min-SNR-5 weighting** made every cell worse here (off).
- **The cosine schedule** lowers FID at low guidance and at guidance 4 (kept).
- Remaining: FID rises with guidance on any recipe (guidance trades the digits' variety for class fidelity, which a
  classifier-feature FID sees directly); the lowest FID is at guidance 1.0 (grid below).

## Measured (`python -m training.evaluate digits-dit`)
{metrics.get('samples')} samples per cell, 100 per class, seeds 1000+, scored by the digit classifier (held-out
accuracy {_pct(metrics.get('classifier_held_out_accuracy', 0))}); FID in its 64-d feature space against the 450
held-out digits (torchmetrics `FrechetInceptionDistance`, custom feature extractor).

| steps (DDIM) | guidance | class accuracy | FID vs held-out | ms / image |
| --- | --- | --- | --- | --- |
{rows}

Real-vs-real floor (1,000 train digits vs held-out): FID {metrics.get('fid_real_vs_real', float('nan')):.2f}.
`pipe(class_labels=labels)` with no other argument ({no_argument.get('samples')} samples, torch seed 3000): class
accuracy {_pct(no_argument.get('class_accuracy', 0))}.

Bars this model is held to:
{_bars(settings, no_argument)}

Measured on {metrics.get('measured_on', {}).get('date')} with torch {metrics.get('measured_on', {}).get('torch')},
{metrics.get('measured_on', {}).get('threads')} CPU threads.

![samples](../../../docs/digits-dit-samples.png)
"""


def _moving_digits_sweep(metrics: dict) -> str:
    sweep, plain = metrics.get("sweep", {}), metrics.get("no_argument_call", {})
    if not sweep:
        return "(not measured for this checkpoint)"
    guidances = sorted({cell["guidance_scale"] for cell in sweep.values()})
    lines = ["| steps | " + " | ".join(f"guidance {g:g}" for g in guidances) + " | clips per cell |",
             "| --- |" + " --- |" * (len(guidances) + 1)]
    for steps in sorted({cell["num_inference_steps"] for cell in sweep.values()}):
        row = {cell["guidance_scale"]: cell for cell in sweep.values() if cell["num_inference_steps"] == steps}
        clips = next(iter(row.values()))["clips"]
        lines.append(f"| {steps} | " + " | ".join(_pct(row[g]["per_frame_class_accuracy"]) if g in row else ""
                                                  for g in guidances) + f" | {clips} |")
    lines.append("")
    lines.append(f"`pipe(class_labels=labels)` with no other argument ({plain.get('clips')} clips, torch seed 3000): "
                 f"per-frame class accuracy {_pct(plain.get('per_frame_class_accuracy', 0))}.")
    return "\n".join(lines)


def moving_digits_card(folder: Path) -> str:
    metrics, training = _load(folder, "metrics.json"), _load(folder, "training.json")
    settings, recipe = metrics.get("settings", {}), training.get("recipe", {})
    frames, canvas, factor, patch = (recipe.get(k, 0) or 1 for k in ("frames", "canvas", "temporal_factor", "patch"))
    latent_frames, side = 1 + (frames - 1) // factor, canvas // patch
    tokens = latent_frames * side * side
    curve = ", ".join(f"step {step}: " + " / ".join(f"{_pct(acc)} (guidance {g})" for g, acc in scores.items())
                      for step, scores in sorted(training.get("per_frame_accuracy_during_training", {}).items(),
                                                 key=lambda item: int(item[0])))
    return f"""# moving-digits

A class-conditional video diffusion transformer: {frames}-frame {canvas}x{canvas} clips of one handwritten digit
moving and bouncing off the walls. Trained in this repository; loaded offline with
`accel.pipelines.reference.load("moving-digits")`, which returns a diffusers `WanPipeline`. Condition it with
`accel.pipelines.reference.class_prompt_embeds(pipe, labels)` (or `accel.pipelines.reference.call_kwargs`).

## Model
- `WanTransformer3DModel`: {recipe.get('layers')} blocks, {recipe.get('heads')} heads x {recipe.get('head_dim')},
  FFN {recipe.get('ffn')}, patch (1, {patch}, {patch}), RMS q/k norm, cross-attention to 4 learned tokens per class
  (`class_embeddings.safetensors`, row 10 = the null class used for guidance).
- Latents: `FramePackingVAE` (no weights) keeps frame 0 and folds each following group of {factor} frames into the
  channels of one latent frame, as Wan's VAE groups time: {frames} frames -> {latent_frames} latent frames x
  {side} x {side} = {tokens} tokens per clip ({tokens // 64} key blocks of 64 for sparse attention).
- Sampler: `FlowMatchEulerDiscreteScheduler`, shift {recipe.get('sampling_shift')}. Defaults:
  {settings.get('num_inference_steps')} steps, guidance {settings.get('guidance_scale')}.

## Data
Clips made by `accel.pipelines.digits.moving_digit_clips` from the train split of scikit-learn's digits: one digit,
random start and velocity (0.3 .. 0.9 px/frame per axis), bouncing; a fresh deterministic batch each step.

## Training
`python -m training.train_moving_digits` (seed {training.get('seed', 0)}): {training.get('steps')} steps.
A curriculum: the first {recipe.get('frames_only_steps', 0)} steps train on {recipe.get('frames_only_batch')}
one-latent-frame samples each (the digit shapes; {_pct(recipe.get('group_share', 0))} of them a pair of consecutive
frames, as later latent frames hold, the rest a still frame), every later step on {recipe.get('clips_per_step')}
clip(s) and {recipe.get('frames_per_step')} such samples (joint image-video training: the motion); rectified flow,
noise levels {recipe.get('timestep_sampling')}, pixels within one pixel of the digit's ink weighted
{1 + recipe.get('ink_loss_weight', 0):g}x in the loss; AdamW {recipe.get('lr')} with a {recipe.get('warmup_steps')}-step warm-up
and a linear decay to 0 over the last {recipe.get('decay_steps', 0)} steps, EMA {recipe.get('ema')},
{_pct(recipe.get('label_dropout', 0))} null-class dropout. Final smoothed loss
{training.get('final_smoothed_loss')}; {training.get('minutes')} minutes on 2 CPU cores.
Per-frame class accuracy of the EMA model during training (10 clips each): {curve or '-'}.
{training.get('guidance_scale_note', '')}
Log: `../moving-digits.train.log`.

## Measured (`python -m training.evaluate moving-digits`)
{metrics.get('clips')} clips, 10 per class, every frame classified by the digit classifier (the 8x8 window with the
most ink is cut out of each frame):

| figure | value |
| --- | --- |
| per-frame class accuracy | {_pct(metrics.get('per_frame_class_accuracy', 0))} |
| frame-label consistency (frames agreeing with the clip's majority class) | {_pct(metrics.get('frame_label_consistency', 0))} |
| motion smoothness: mean abs. 2nd difference of the ink centroid, generated | {metrics.get('centroid_jerk_generated', float('nan')):.3f} px/frame^2 |
| the same on real clips from held-out digits | {metrics.get('centroid_jerk_real', float('nan')):.3f} px/frame^2 |
| seconds per clip (2 CPU threads) | {metrics.get('seconds_per_clip', float('nan')):.2f} |

The bar this project set for the model is 80% per-frame class accuracy; this checkpoint is
**{'above' if metrics.get('per_frame_class_accuracy', 0) >= 0.8 else 'below'}** it.

Steps and guidance (the check that found the earlier digits-dit getting worse with more steps; seeds 2000+):

{_moving_digits_sweep(metrics)}

![frames](../../../docs/moving-digits-strip.png)

![clips](../../../docs/moving-digits.gif)
"""


def classifier_card(folder: Path) -> str:
    metrics = _load(folder, "metrics.json")
    return f"""# digit-classifier

The classifier / feature extractor behind every quality figure of the reference models
(`accel.pipelines.reference.classifier()`): a 3-layer CNN on 8x8 digits whose 64-d penultimate features feed
torchmetrics' FID and whose predictions give class accuracy. Trained with
`python -m training.train_classifier` (40 epochs, AdamW 1e-3, random shifts of up to 1 pixel) on the
1,347-digit train split.

Held-out accuracy: **{_pct(metrics.get('held_out_accuracy', 0))}** on {metrics.get('held_out_images')} digits
(`python -m training.evaluate classifier`).
"""


CARDS = {"digits-dit": digits_dit_card, "moving-digits": moving_digits_card, "digit-classifier": classifier_card}


def write_card(name: str, folder: Path) -> Path:
    path = folder / "README.md"
    path.write_text(CARDS[name](folder), encoding="utf-8")
    return path
