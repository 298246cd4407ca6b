"""The reference models trained and shipped in this repository, loaded offline on the CPU.

* ``digits-dit``: class-conditional 8x8 digit images, a ``DiTPipeline`` (12-block ``DiTTransformer2DModel``) in
  pixel space. Call it as any DiTPipeline: ``pipe(class_labels=[3, 7], generator=g, output_type="np")``;
  ``DEFAULT_CALL[name]`` holds the steps and guidance its model card was measured with.
* ``moving-digits``: class-conditional 17-frame 16x16 clips of a bouncing digit, a ``WanPipeline`` (8-block
  ``WanTransformer3DModel``). It is conditioned through ``prompt_embeds``: ``class_prompt_embeds(pipe, labels)``
  returns them (and the null-class negative embeddings for guidance), and ``call_kwargs`` builds a whole call.
  Its per-frame class accuracy is 92.2% (model card; the bar set for it is 80%).
* ``classifier()``: the digit classifier / feature extractor behind every quality figure
  (``accel.pipelines.classifier``).

Weights are fp16 safetensors in diffusers ``save_pretrained`` layout under ``accel/pipelines/reference_models/<name>``;
``load`` also takes the path of such a folder (a retrained copy, say). Model cards sit next to the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .adapters import ready_for_inference
from .classifier import DigitClassifier
from .digits import CLASS_NAMES
from .pixel_space import FramePackingVAE, PixelSpaceVAE

MODELS_DIR = Path(__file__).resolve().parent / "reference_models"
MODELS: tuple[str, ...] = ("digits-dit", "moving-digits")
DEFAULT_CALL: dict[str, dict[str, Any]] = {
    "digits-dit": {"num_inference_steps": 20, "guidance_scale": 1.5},
    "moving-digits": {"num_inference_steps": 20, "guidance_scale": 6.0, "height": 16, "width": 16, "num_frames": 17},
}


def model_dir(name_or_path: str | Path) -> Path:
    """The folder of a shipped model name, or the given folder."""
    if str(name_or_path) in MODELS:
        folder = MODELS_DIR / str(name_or_path)
    else:
        folder = Path(name_or_path)
    if not (folder / "transformer" / "config.json").is_file():
        if str(name_or_path) in MODELS:
            raise ValueError(
                f"The weights of {name_or_path!r} are missing from {folder}; retrain them with "
                f"`python -m training.train_{str(name_or_path).replace('-', '_')}`."
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
        from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

        pipe = DiTPipeline(
            transformer=DiTTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype),
            vae=PixelSpaceVAE(),
            scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
            id2label=dict(enumerate(CLASS_NAMES)),
        )
    elif transformer_class == "WanTransformer3DModel":
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

        pipe = WanPipeline(
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
