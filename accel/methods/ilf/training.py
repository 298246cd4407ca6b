"""``accel.train_feedback``: record the frozen model's trajectories at the base step count, then train F and the
scales so that the model's output at a step matches the teacher's output at the next base step."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry
from tqdm.auto import tqdm

from accel.hooks import context_of
from accel.pipelines.adapters import adapter_for

from ..trained import collate, detached, load_checkpoint, model_fingerprint, save_checkpoint
from .loop import install_loop
from .module import FORMAT, SCALE_SHAPES, FeedbackModule

CHECKPOINT_FORMAT = "accel-ilf-checkpoint/2"
_HOOK = "accel.ilf.training"


@dataclass
class FeedbackSettings:
    """How ``accel.train_feedback`` trains (AdamW, linear warm-up then cosine decay, gradient norm clipped at 1)."""

    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 50
    calls_per_batch: int = 1  # recorded denoiser calls per optimiser step
    seed: int = 0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for name in ("steps", "warmup_steps", "calls_per_batch", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name != "warmup_steps" else 0):
                raise ValueError(f"feedback training {name} must be a positive integer, got {value!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"feedback training lr must be a positive number, got {self.lr!r}.")


def _output(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value.sample


def _prediction(output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The part of the denoiser output a sampler reads: DiT-style models that also predict the variance return
    twice the input channels, and only the first half is the noise prediction."""
    if output.ndim >= 4 and sample.ndim == output.ndim and output.shape[1] == 2 * sample.shape[1]:
        return output[:, :sample.shape[1]]
    return output


def training_pairs(calls: list[list[list[tuple[tuple, dict, torch.Tensor]]]]):
    """(a recorded denoiser call, the teacher's output at the next step for the same branch) for every call;
    ``calls[c][j]`` holds step ``j``'s denoiser calls of pipeline call ``c`` in order. A step with no next step
    (the last one, or the last one this denoiser runs when another takes over) keeps its own output."""
    pairs = []
    for steps in calls:
        for j, step in enumerate(steps):
            later = steps[j + 1] if j + 1 < len(steps) else []
            for branch, (args, kwargs, output) in enumerate(step):
                target = later[branch][2] if len(later) == len(step) else output
                pairs.append(((args, kwargs), target))
    return pairs


def _clone_generators(kwargs: dict) -> dict:
    generator = kwargs.get("generator")

    def clone(g: torch.Generator) -> torch.Generator:
        return torch.Generator(g.device).set_state(g.get_state())

    if isinstance(generator, torch.Generator):
        return {**kwargs, "generator": clone(generator)}
    if isinstance(generator, (list, tuple)):
        return {**kwargs, "generator": [clone(g) for g in generator]}
    return dict(kwargs)


@torch.no_grad()
def record_trajectories(pipe, model, inputs, steps, progress) -> list[list[list[tuple[tuple, dict, torch.Tensor]]]]:
    """Sample every input at ``steps`` steps with the frozen model, keeping each denoiser call of ``model`` (its
    arguments and output, detached) under the scheduler step it belongs to. The inputs' generators are left as
    they were."""
    calls: list[list[list]] = []
    pending: list[tuple[tuple, dict]] = []
    scheduler = pipe.scheduler
    original_step = scheduler.step

    def counting_step(*args, **kwargs):
        calls[-1].append([])
        return original_step(*args, **kwargs)

    def before(module, args, kwargs):
        pending.append((detached(args), detached(kwargs)))

    def after(module, args, kwargs, output):
        stored_args, stored_kwargs = pending.pop()
        calls[-1][-1].append((stored_args, stored_kwargs, _output(output).detach().clone()))

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    scheduler.step = counting_step
    try:
        for kwargs in tqdm(inputs, desc="ILF: sampling the frozen model", disable=not progress):
            calls.append([[]])
            pipe(**{**_clone_generators(kwargs), "num_inference_steps": steps, "output_type": "np"})
            calls[-1] = [step for step in calls[-1] if step]
    finally:
        for handle in handles:
            handle.remove()
        del scheduler.step
    return calls


def _stream_dims(model, blocks, region, record) -> tuple[int, int | None]:
    found = {}
    last = blocks[region[1]]
    handle = last.module.register_forward_hook(lambda module, args, output: found.setdefault("out", output))
    try:
        with torch.no_grad():
            args, kwargs = record
            model(*args, **{**kwargs, "return_dict": False})
    finally:
        handle.remove()
    hidden, context = last.streams_out(found["out"])
    return hidden.shape[-1], None if context is None else context.shape[-1]


def _check(pipe, inputs, num_inference_steps, region, scale, denoiser):
    if context_of(pipe) is not None:
        raise ValueError("train_feedback needs the plain pipeline; accel.unwrap(pipe) first.")
    if not isinstance(inputs, (list, tuple)) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise ValueError("inputs must be a non-empty list of dicts of pipeline call arguments (prompts or labels, "
                         "generators).")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or \
            num_inference_steps < 2 or num_inference_steps % 2:
        raise ValueError(f"num_inference_steps is the base step count the module halves: an even integer >= 2, "
                         f"got {num_inference_steps!r}.")
    if scale not in SCALE_SHAPES:
        raise ValueError(f"scale must be one of {SCALE_SHAPES}, got {scale!r}.")
    adapter = adapter_for(pipe)
    if not adapter.sequential_blocks:
        raise ValueError(f"{adapter.name} models are not one chain of transformer blocks; ILF needs a DiT-family "
                         "denoiser (the loop region is a run of consecutive blocks).")
    model = getattr(pipe, denoiser, None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no denoiser {denoiser!r}.")
    blocks = adapter.blocks(model)
    if region is None:
        middle = len(blocks) // 2
        region = (middle, middle)
    if not (isinstance(region, (tuple, list)) and len(region) == 2 and all(isinstance(i, int) for i in region)):
        raise ValueError(f"region must be (first block, last block), both positions in the block list, got "
                         f"{region!r}.")
    first, last = int(region[0]), int(region[1])
    if not (0 <= first <= last < len(blocks)):
        raise ValueError(f"region {tuple(region)} is not a range of block positions within 0..{len(blocks) - 1}.")
    if blocks[first].group != blocks[last].group:
        raise ValueError(f"region {tuple(region)} spans two block lists ({blocks[first].group}, "
                         f"{blocks[last].group}); the loop region must lie within one.")
    return model, blocks, (first, last)


def train_feedback(pipe, inputs: list[dict], num_inference_steps: int = 20, *, region=None, scale: str = "block",
                   settings: FeedbackSettings | None = None, checkpoint_dir=None, denoiser: str = "transformer",
                   progress: bool = True) -> FeedbackModule:
    """Train an ILF feedback module for ``pipe`` at ``num_inference_steps`` base steps (it samples in half as many).
    See the package docstring for the method and the loss."""
    model, blocks, region = _check(pipe, inputs, num_inference_steps, region, scale, denoiser)
    settings = settings or FeedbackSettings()
    started = time.perf_counter()
    pairs = training_pairs(record_trajectories(pipe, model, list(inputs), num_inference_steps, progress))
    if not pairs:
        raise ValueError(f"Sampling the inputs never called the pipeline's {denoiser!r}; nothing to train on.")
    recorded_s = time.perf_counter() - started
    hidden_dim, context_dim = _stream_dims(model, blocks, region, pairs[0][0])
    module = FeedbackModule.create(model, blocks, region, scale, settings.seed, hidden_dim, context_dim)
    module.to(next(model.parameters()).device)
    key = json.dumps([model_fingerprint(model)["weights_sha256"], list(region), scale, asdict(settings),
                      len(pairs), num_inference_steps])
    optimizer = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=0.0)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    params = dict(module.named_parameters())
    start, losses = (0, []) if folder is None else \
        load_checkpoint(folder, CHECKPOINT_FORMAT, key, params, optimizer, what="feedback-training")
    registry = HookRegistry.check_if_exists_or_initialize
    names: list[tuple[torch.nn.Module, str]] = []

    def register(block_module, hook):
        name = f"{_HOOK}.{len(names)}"
        registry(block_module).register_hook(hook, name)
        names.append((block_module, name))

    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    model.requires_grad_(False)
    install_loop(module, blocks, lambda: True, register)
    module.train()
    try:
        bar = tqdm(total=settings.steps, initial=start, desc="ILF: training the feedback module", disable=not progress)
        for step in range(start, settings.steps):
            rng = np.random.default_rng([settings.seed, step])
            chosen = rng.choice(len(pairs), size=min(settings.calls_per_batch, len(pairs)), replace=False)
            args, kwargs = collate([pairs[i][0] for i in chosen])
            target = torch.cat([pairs[i][1] for i in chosen])
            factor = min(1.0, (step + 1) / max(1, settings.warmup_steps)) * \
                0.5 * (1 + math.cos(math.pi * step / settings.steps))
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * factor
            with torch.enable_grad():
                sample = args[0] if args else kwargs.get("hidden_states")
                output = _output(model(*args, **{**kwargs, "return_dict": False}))
                loss = F.mse_loss(_prediction(output, sample).float(), _prediction(target, sample).float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(module.parameters()), 1.0)
                optimizer.step()
            losses.append(round(float(loss.detach()), 6))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if folder is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
                save_checkpoint(folder, CHECKPOINT_FORMAT, key, step + 1, params, optimizer, losses)
        bar.close()
    finally:
        for block_module, name in names:
            registry(block_module).remove_hook(name, recurse=False)
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
    module.eval().requires_grad_(False)
    module.card = {
        "format": FORMAT, "region": list(region), "scale": scale,  # as save() writes them
        "model": model_fingerprint(model), "denoiser": denoiser, "scheduler": type(pipe.scheduler).__name__,
        "num_inference_steps": num_inference_steps, "ilf_steps": num_inference_steps // 2,
        "loss": "MSE of the noise prediction against the teacher's at the next base step",
        "training": {**asdict(settings), "pipeline_calls": len(inputs), "pairs": len(pairs),
                     "recording_s": round(recorded_s, 1), "seconds": round(time.perf_counter() - started, 1),
                     "first_losses": losses[:10], "last_losses": losses[-10:], "call_arguments":
                     _describe_inputs(inputs)},
    }
    return module


def _describe_inputs(inputs: list[dict]) -> dict[str, Any]:
    """What the card records of the training calls: their argument names, guidance and generator seeds."""
    seeds = []
    for kwargs in inputs:
        generator = kwargs.get("generator")
        generators = generator if isinstance(generator, (list, tuple)) else [generator] if generator else []
        seeds.extend(g.initial_seed() for g in generators if isinstance(g, torch.Generator))
    guidance = sorted({kwargs["guidance_scale"] for kwargs in inputs if "guidance_scale" in kwargs})
    return {"arguments": sorted({k for kwargs in inputs for k in kwargs if k != "generator"}),
            "guidance_scale": guidance, "seeds": seeds[:64]}
