"""What the eval harness knows about a model: how to build it, how to condition it, how to read its outputs.

``load_model(name)`` takes a reference model name (``digits-dit``, ``moving-digits``), ``tiny:<family>`` (random
weights, for plumbing tests), or a local diffusers pipeline folder (``model_index.json``; loaded with
``local_files_only``). Class-conditional models (DiT, the reference models) take class ids; the others take
prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accel.pipelines.adapters import adapter_for, adapter_for_pipeline_class, ready_for_inference


@dataclass
class ModelHandle:
    name: str
    build: Callable[[], Any]  # a fresh pipeline (CPU, eval mode, progress bar off)
    conditioning: str  # "class", "prompt", or "prompt_embeds" (no text encoder: accel-eval refuses it)
    video: bool
    steps: int  # defaults for the call
    guidance_scale: float
    num_classes: int | None = None  # class-conditional models
    digit_metrics: bool = False  # the digit classifier applies (class accuracy, digit-feature FID)
    extra_call: dict[str, Any] | None = None  # fixed call kwargs (size, frames)
    # (pipe, seed, steps or None) -> one complete seeded call as ``accel-run`` makes it (reference and tiny models)
    example: Callable[[Any, int, int | None], dict[str, Any]] | None = None

    @property
    def random_weights(self) -> bool:
        """A ``tiny:`` model: its speed and quality figures say nothing about a trained one."""
        return self.name.startswith("tiny:")

    @property
    def example_labels(self) -> list[int] | None:
        """The classes of ``example`` calls on models the digit classifier reads (one of each digit)."""
        return list(range(10)) if self.digit_metrics else None

    def call_kwargs(self, pipe, conditions: list, seeds: list[int], steps: int, guidance_scale: float) -> dict:
        """Call kwargs for one batch: one condition and one seeded generator per sample."""
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance_scale,
                                  "generator": generators, "output_type": "np", **(self.extra_call or {})}
        if self.name == "moving-digits" or getattr(pipe, "digit_class_embeddings", None) is not None:
            from accel.pipelines.reference import class_prompt_embeds

            kwargs.update(class_prompt_embeds(pipe, conditions))
        elif self.conditioning == "class":
            kwargs["class_labels"] = [int(c) for c in conditions]
        else:
            kwargs["prompt"] = list(conditions)
        return kwargs


def load_model(name: str) -> ModelHandle:
    from accel.pipelines import reference

    if name in reference.MODELS:
        reference.model_dir(name)  # a clear error now if the weights are missing
        call = reference.DEFAULT_CALL[name]
        extra = {k: v for k, v in call.items() if k not in ("num_inference_steps", "guidance_scale")}

        def example(pipe, seed: int, steps: int | None) -> dict[str, Any]:
            overrides = {"num_inference_steps": steps} if steps else {}
            return reference.call_kwargs(name, pipe, list(range(10)), seed=seed, **overrides)

        return ModelHandle(name, lambda: reference.load(name), "class", name == "moving-digits",
                           call["num_inference_steps"], call["guidance_scale"], 10, True, extra, example)
    if name.startswith("tiny:"):
        from accel.pipelines import tiny

        family = name.split(":", 1)[1]
        if family not in tiny.FAMILIES:
            raise ValueError(f"Unknown tiny family {family!r}; choose one of {', '.join(tiny.FAMILIES)}.")
        example = tiny.example_inputs(family)
        extra = {k: v for k, v in example.items()
                 if k not in ("num_inference_steps", "guidance_scale", "generator", "output_type", "prompt",
                              "class_labels", "prompt_embeds", "negative_prompt_embeds")}
        # tiny hunyuan-video has no text encoder: it takes prompt_embeds only (accel-run can, accel-eval cannot)
        conditioning = ("prompt_embeds" if family in tiny.PROMPT_EMBEDS_FAMILIES
                        else adapter_for(tiny.build(family)).conditioning)
        return ModelHandle(name, lambda: tiny.build(family), conditioning, family in tiny.VIDEO_FAMILIES,
                           example["num_inference_steps"], example.get("guidance_scale", 4.0),
                           10 if conditioning == "class" else None, False, extra,
                           lambda pipe, seed, steps: tiny.example_inputs(family, seed=seed,
                                                                          num_inference_steps=steps or 10))
    folder = Path(name)
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"Unknown model {name!r}: use a reference model ({', '.join(reference.MODELS)}), tiny:<family>, or a "
            "local diffusers pipeline folder (one with model_index.json)."
        )
    import json

    from diffusers import DiffusionPipeline

    class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    adapter = adapter_for_pipeline_class(class_name)  # a clear error for a pipeline accel does not support
    conditioning, video = adapter.conditioning, adapter.video

    def build():
        return ready_for_inference(DiffusionPipeline.from_pretrained(folder, local_files_only=True))

    return ModelHandle(str(folder), build, conditioning, video, 28, 4.5 if conditioning == "prompt" else 1.5,
                       1000 if conditioning == "class" else None, False, {})
