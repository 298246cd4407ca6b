"""Fine-tune the AFA ensemble members: copies of ``digits-dit`` that differ as community fine-tunes of one base do.

    python -m training.train_members [--steps N] [--max-minutes M] [--member NAME ...]

Each member starts from the shipped digits-dit weights and is fine-tuned on its own half of the train split with
its own seed, under the digits-dit recipe with a fine-tuning learning rate, a short warm-up and a linear decay over
the whole run. The halves split the classes (digits 0-4 and 5-9), so the members specialise as community
fine-tunes of one base do (a style, a subject); a split of every class in two (``--split random``) gives members
that differ by little more than noise (docs/methods/afa.md). Each run is capped at ``--max-minutes`` (10 by default)
on 2 CPU cores. Saved like the other reference models (fp16 safetensors in ``save_pretrained`` layout, the
sampler, ``training.json``, a ``README.md`` card, written atomically) under
``accel/pipelines/reference_models/<member>``; what the members measure is in ``docs/benchmarks/ensemble.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DiTTransformer2DModel

from accel.io import atomic_write
from accel.pipelines.digits import split
from accel.pipelines.reference import ENSEMBLE_MEMBERS, MODELS_DIR, model_dir
from training.common import atomic_directory, get_logger, write_json_atomic
from training.train_digits_dit import RECIPE, train

FINE_TUNE = dataclasses.replace(RECIPE, lr=2e-4, warmup_steps=50, decay_steps=10**6, ema=0.995)
SEEDS = {"digits-dit-a": 1, "digits-dit-b": 2}
HALVES = {"digits-dit-a": 0, "digits-dit-b": 1}
SPLITS = ("classes", "random")


def half_of_train_split(half: int, how: str = "classes") -> np.ndarray:
    """Indices of one half of the train split: digits 0-4 (half 0) or 5-9 (half 1) with ``how="classes"``; within
    each class, every other image (by index) from ``half`` with ``how="random"``."""
    labels = split()["train"].labels
    if how == "classes":
        return np.flatnonzero((labels >= 5) == bool(half))
    return np.sort(np.concatenate([np.flatnonzero(labels == digit)[half::2] for digit in range(10)]))


def write_card(name: str, folder: Path) -> None:
    """``README.md`` beside the weights: what the member is, how it was trained, its size on disk."""
    info = json.loads((folder / "training.json").read_text())
    size = sum(path.stat().st_size for path in (folder / "transformer").glob("*.safetensors")) / 2**20
    recipe = info["recipe"]
    text = f"""# {name}: an AFA ensemble member (digits-dit fine-tune)

A copy of `digits-dit` (the shipped 12-block class-conditional DiT on 8x8 digits) fine-tuned on **{info['data']}**
with seed {info['seed']}: the other member (`{', '.join(n for n in ENSEMBLE_MEMBERS if n != name)}`) saw the other,
disjoint half. Members that specialise like this, as community fine-tunes of one base do, are what AFA ensembles
(`accel.ensemble`, `benchmarks/ensemble.py`). It still draws every digit (the base's knowledge), those outside
its half less well.

- Training: {info['steps']} steps, batch {recipe['batch_size']}, lr {recipe['lr']} (warm-up {recipe['warmup_steps']},
  linear decay to 0), EMA {recipe['ema']}, label dropout {recipe['label_dropout']}; {info['minutes']} min on
  {info['threads']} CPU threads (wall clock, other jobs included); torch {info['torch']}.
- Weights: fp16 safetensors, {size:.1f} MB (`transformer/`); the sampler in `scheduler/` is digits-dit's.
- Measured (FID, class accuracy, side by side with the other member and the ensembles):
  `docs/benchmarks/ensemble.md`.
- Rebuild: `python -m training.train_members --member {name}`.
"""
    atomic_write(folder / "README.md", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--member", action="append", choices=ENSEMBLE_MEMBERS, help="default: all members")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--max-minutes", type=float, default=10.0)
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--check-every", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="classes", help="how the train split is halved")
    parser.add_argument("--cards-only", action="store_true", help="rewrite the members' README.md and stop")
    args = parser.parse_args(argv)
    if args.cards_only:
        for name in args.member or ENSEMBLE_MEMBERS:
            write_card(name, args.out_dir / name)
        return 0
    if args.steps < 1 or args.max_minutes <= 0:
        parser.error("--steps and --max-minutes must be positive")
    recipe = dataclasses.replace(FINE_TUNE, decay_steps=args.steps)
    base_folder = model_dir("digits-dit")
    base = DiTTransformer2DModel.from_pretrained(base_folder / "transformer")
    for name in args.member or ENSEMBLE_MEMBERS:
        out = args.out_dir / name
        logger = get_logger(f"train_{name}", out.with_name(out.name + ".train.log"))
        subset = half_of_train_split(HALVES[name], args.split)
        model, checks, loss, minutes, steps_run = train(
            recipe, args.steps, seed=SEEDS[name], check_every=args.check_every, logger=logger,
            max_minutes=args.max_minutes, init=base, subset=subset, name=name)
        with atomic_directory(out) as folder:
            model.to(torch.float16).save_pretrained(folder / "transformer", safe_serialization=True)
            recipe.sampling_scheduler().save_pretrained(folder / "scheduler")
            write_json_atomic(folder / "training.json", {
                "base": "digits-dit", "split": args.split, "data": (
                    f"digits {'0-4' if HALVES[name] == 0 else '5-9'} of the train split ({len(subset)} images)"
                    if args.split == "classes" else
                    f"half {HALVES[name]} of every class of the train split ({len(subset)} images)"),
                "steps": steps_run, "seed": SEEDS[name], "recipe": dataclasses.asdict(recipe), "checks": checks,
                "minutes": round(minutes, 1), "torch": torch.__version__, "final_smoothed_loss": round(loss, 5),
                "threads": torch.get_num_threads(),
            })
        write_card(name, out)
        logger.info("saved %s after %.1f minutes (%d steps)", out, minutes, steps_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
