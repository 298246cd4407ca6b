"""The reference models trained and shipped in this repository, loaded offline on the CPU.

* ``digits-dit``: class-conditional 8x8 digit images, a ``DiTPipeline`` (12-block ``DiTTransformer2DModel``) in
  pixel space. ``pipe(class_labels=[3, 7])`` needs nothing else: the loaded pipeline is a ``DigitsDiTPipeline``, a
  ``DiTPipeline`` whose call defaults are the documented call (``DEFAULT_CALL[name]``: the steps and guidance its
  model card was measured with).
* ``moving-digits``: class-conditional 17-frame 16x16 clips of a bouncing digit, a ``WanPipeline`` (8-block
  ``WanTransformer3DModel``) conditioned through ``prompt_embeds``. The loaded ``MovingDigitsPipeline`` (a
  ``WanPipeline``) also takes ``class_labels=[3, 7]`` and builds them (with the null-class negative embeddings for
  guidance), and defaults to the documented call; ``class_prompt_embeds(pipe, labels)`` gives the embeddings alone.
* ``classifier()``: the digit classifier / feature extractor behind every quality figure
  (``accel.pipelines.classifier``).

``call_kwargs`` builds a complete, seeded call with ``output_type="np"``. Weights are fp16 safetensors in diffusers
``save_pretrained`` layout under ``accel/pipelines/reference_models/<name>``; ``load`` also takes the path of such
a folder (a retrained copy, say). Model cards sit next to the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiTPipeline, WanPipeline
from safetensors.torch import load_file

from .adapters import ready_for_inference
from .classifier import DigitClassifier
from .digits import CLASS_NAMES
from .pixel_space import FramePackingVAE, PixelSpaceVAE

MODELS_DIR = Path(__file__).resolve().parent / "reference_models"
MODELS: tuple[str, ...] = ("digits-dit", "moving-digits")
# Fine-tunes of digits-dit on disjoint halves of its data (training/train_members.py): AFA's ensemble members.
ENSEMBLE_MEMBERS: tuple[str, ...] = ("digits-dit-a", "digits-dit-b")
DEFAULT_CALL: dict[str, dict[str, Any]] = {
    "digits-dit": {"num_inference_steps": 20, "guidance_scale": 1.5},
    "moving-digits": {"num_inference_steps": 20, "guidance_scale": 6.0, "height": 16, "width": 16, "num_frames": 17},
}


class DigitsDiTPipeline(DiTPipeline):
    """A ``DiTPipeline`` whose call defaults are digits-dit's documented call (20 steps, its card's guidance)."""

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        guidance_scale: float = DEFAULT_CALL["digits-dit"]["guidance_scale"],
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = DEFAULT_CALL["digits-dit"]["num_inference_steps"],
        output_type: str | None = "pil",
        return_dict: bool = True,
    ):
        # The undecorated parent, so that this __call__'s own __wrapped__ runs with gradients when asked to.
        return DiTPipeline.__call__.__wrapped__(self, class_labels, guidance_scale=guidance_scale, generator=generator,
                                                num_inference_steps=num_inference_steps, output_type=output_type,
                                                return_dict=return_dict)


class MovingDigitsPipeline(WanPipeline):
    """A ``WanPipeline`` that also takes ``class_labels`` (digit classes 0..9, instead of prompt embeddings) and whose
    call defaults are moving-digits' documented call (17 frames of 16x16, 20 steps, its card's guidance)."""

    @torch.no_grad()
    def __call__(
        self,
        *args,
        class_labels: list[int] | None = None,
        height: int = DEFAULT_CALL["moving-digits"]["height"],
        width: int = DEFAULT_CALL["moving-digits"]["width"],
        num_frames: int = DEFAULT_CALL["moving-digits"]["num_frames"],
        num_inference_steps: int = DEFAULT_CALL["moving-digits"]["num_inference_steps"],
        guidance_scale: float = DEFAULT_CALL["moving-digits"]["guidance_scale"],
        **kwargs,
    ):
        if class_labels is not None:
            given = [name for name in ("prompt", "prompt_embeds", "negative_prompt", "negative_prompt_embeds")
                     if kwargs.get(name) is not None] + (["a positional prompt"] if args else [])
            if given:
                raise ValueError(f"Pass class_labels or prompt embeddings, not both (also given: {', '.join(given)}).")
            kwargs.update(class_prompt_embeds(self, class_labels))
        elif kwargs.get("prompt_embeds") is None:
            raise ValueError("moving-digits has no text encoder: pass class_labels=[...] (digit classes 0..9) or "
                             "prompt_embeds (see class_prompt_embeds).")
        return WanPipeline.__call__.__wrapped__(self, *args, height=height, width=width, num_frames=num_frames,
                                                num_inference_steps=num_inference_steps,
                                                guidance_scale=guidance_scale, **kwargs)


def model_dir(name_or_path: str | Path) -> Path:
    """The folder of a shipped model name, or the given folder."""
    if str(name_or_path) in MODELS + ENSEMBLE_MEMBERS:
        folder = MODELS_DIR / str(name_or_path)
    else:
        folder = Path(name_or_path)
    if not (folder / "transformer" / "config.json").is_file():
        if str(name_or_path) in MODELS + ENSEMBLE_MEMBERS:
            script = "train_members" if str(name_or_path) in ENSEMBLE_MEMBERS else \
                f"train_{str(name_or_path).replace('-', '_')}"
            raise ValueError(
                f"The weights of {name_or_path!r} are missing from {folder}; retrain them with "
                f"`python -m training.{script}`."
            )
        raise ValueError(
            f"{name_or_path!r} is neither a reference model ({', '.join(MODELS)}) nor a folder with "
            "transformer/config.json and scheduler/ in diffusers save_pretrained layout."
        )
    return folder


def load(name_or_path: str | Path = "digits-dit", *, dtype: torch.dtype = torch.float32):
    """A ready pipeline (eval mode, CPU, progress bar off) for a reference model name or folder."""
    import json

    folder = model_dir(name_or_path)
    transformer_class = json.loads((folder / "transformer" / "config.json").read_text())["_class_name"]
    if transformer_class == "DiTTransformer2DModel":
        from diffusers import DDIMScheduler, DiTTransformer2DModel

        pipe = DigitsDiTPipeline(
            transformer=DiTTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype),
            vae=PixelSpaceVAE(),
            scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
            id2label=dict(enumerate(CLASS_NAMES)),
        )
    elif transformer_class == "WanTransformer3DModel":
        from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

        pipe = MovingDigitsPipeline(
            tokenizer=None,
            text_encoder=None,
            transformer=WanTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=dtype),
            vae=FramePackingVAE.from_config(FramePackingVAE.load_config(folder / "vae")),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        )
        pipe.digit_class_embeddings = load_file(folder / "class_embeddings.safetensors")["table"].to(dtype)
    else:
        raise ValueError(f"{folder} holds a {transformer_class}; reference folders hold a DiT or Wan transformer.")
    return ready_for_inference(pipe)


def class_prompt_embeds(pipe, labels) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` / ``negative_prompt_embeds`` for ``moving-digits`` and a list of digit classes."""
    table = getattr(pipe, "digit_class_embeddings", None)
    if table is None:
        raise ValueError("This pipeline has no digit class embeddings; load it with accel.pipelines.reference.load().")
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if labels.ndim != 1 or len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"labels must be a non-empty list of digit classes 0..9, got {labels.tolist()}.")
    null = torch.full_like(labels, table.shape[0] - 1)
    return {"prompt_embeds": table[labels], "negative_prompt_embeds": table[null]}


def call_kwargs(name: str, pipe, labels, seed: int = 0, **overrides) -> dict[str, Any]:
    """Complete call kwargs for a reference pipeline: its default settings, the classes and a seeded generator."""
    if name not in MODELS:
        raise ValueError(f"Unknown reference model {name!r}; choose one of {', '.join(MODELS)}.")
    kwargs: dict[str, Any] = {**DEFAULT_CALL[name], "output_type": "np",
                              "generator": torch.Generator("cpu").manual_seed(seed)}
    kwargs.update(class_prompt_embeds(pipe, labels) if name == "moving-digits" else {"class_labels": list(labels)})
    kwargs.update(overrides)
    return kwargs


def classifier(path: str | Path | None = None) -> DigitClassifier:
    """The digit classifier: ``predict(images)`` -> class ids, ``features(images)`` -> [N, 64] for FID."""
    folder = Path(path) if path is not None else MODELS_DIR / "digit-classifier"
    if not (folder / "model.safetensors").is_file():
        raise ValueError(
            f"No classifier weights in {folder}; retrain with `python -m training.train_classifier`."
        )
    return DigitClassifier.from_pretrained(folder)
