"""Training the aggregator: the members frozen in lock-step, the plain denoising loss on the training data
(``accel.train_aggregator``), with a progress bar and a resumable checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry
from tqdm.auto import tqdm

from accel.hooks import context_of
from accel.pipelines.adapters import adapter_for

from ..trained import load_checkpoint, model_fingerprint, save_checkpoint
from .aggregator import Aggregator
from .lockstep import install_lockstep
from .method import FAMILIES, condition_of, make_lockstep, member_models
from .unet import mixing_dims

CHECKPOINT_FORMAT = "accel-afa-checkpoint/1"
_HOOK = "accel.afa.training"


@dataclass(frozen=True)
class AggregatorSettings:
    """How the aggregator is trained (the paper: AdamW 1e-4, weight decay 0.01, 100 warm-up steps, batch 8)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    hidden: int = 64
    heads: int = 4
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden", "heads", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be positive, weight_decay and warmup_steps 0 or more.")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads}).")


def noised(scheduler, clean: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(noisy input, timesteps, target) of the denoising loss under ``scheduler``'s training noise: DDPM-style
    schedulers (epsilon, v or sample prediction) or flow matching (velocity noise - x0, also for a multistep solver
    configured with ``prediction_type="flow_prediction"``)."""
    noise = torch.randn(clean.shape, generator=generator).to(clean)
    train_steps = int(scheduler.config.num_train_timesteps)
    # UniPC or DPM-Solver with flow_prediction (Wan, SkyReels, Sana checkpoints) sample a flow-matching model
    prediction = getattr(scheduler.config, "prediction_type", None)
    flow = "FlowMatch" in type(scheduler).__name__ or prediction == "flow_prediction"
    if hasattr(scheduler, "alphas_cumprod") and not flow:
        timesteps = torch.randint(0, train_steps, (len(clean),), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = scheduler.config.prediction_type
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = scheduler.get_velocity(clean, noise, timesteps)
        elif prediction == "sample":
            target = clean
        else:
            raise ValueError(f"Unsupported prediction_type {prediction!r}; epsilon, v_prediction or sample.")
        return noisy, timesteps.to(clean.device), target
    if flow:
        sigmas = torch.rand(len(clean), generator=generator).to(clean)
        shaped = sigmas.reshape(-1, *([1] * (clean.ndim - 1)))
        return (1 - shaped) * clean + shaped * noise, sigmas * train_steps, noise - clean
    raise ValueError(f"train_aggregator knows DDPM-style and flow-matching training noise; "
                     f"{type(scheduler).__name__} is neither.")


def _dry_run(lead: torch.nn.Module, blocks, batch: dict[str, Any]) -> int:
    """The width of the first block's image stream."""
    found = {}

    def record(module, args, kwargs):
        found["hidden"] = blocks[0].streams_in(args, kwargs)[0]

    handle = blocks[0].module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            clean = batch["latents"][:1]
            kwargs = {k: (v[:1] if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in batch.items()
                      if k != "latents"}
            lead(clean, timestep=torch.zeros(1, dtype=torch.long), **kwargs, return_dict=False)
    finally:
        handle.remove()
    return found["hidden"].shape[-1]


@contextlib.contextmanager
def _in_lockstep(pipes: list, adapter, aggregator: Aggregator | None):
    """Within the block, every forward of the lead denoiser runs the members in lock-step (outside a pipeline
    call, as training needs); the members are frozen and get their requires_grad flags back after."""
    lead = adapter.denoisers(pipes[0])[next(iter(adapter.denoisers(pipes[0])))]
    models = member_models(pipes[0], pipes[1:], adapter)
    lockstep = make_lockstep(adapter, lead, models, aggregator)
    registry = HookRegistry.check_if_exists_or_initialize
    names: list[tuple[torch.nn.Module, str]] = []

    def register(module, hook, suffix):
        name = f"{_HOOK}.{suffix}.{len(names)}"
        registry(module).register_hook(hook, name)
        names.append((module, name))

    flags = [(p, p.requires_grad) for model in [lead, *models] for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        install_lockstep(lockstep, lead, lambda: True, register)
        yield lead
    finally:
        for module, name in names:
            registry(module).remove_hook(name, recurse=False)
        for p, flag in flags:
            p.requires_grad_(flag)


def _loss(lead, scheduler, batch: dict, generator: torch.Generator) -> torch.Tensor:
    clean = batch.pop("latents").to(next(lead.parameters()))
    noisy, timesteps, target = noised(scheduler, clean, generator)
    output = lead(noisy, timestep=timesteps, **batch, return_dict=False)[0]
    if output.shape[1] == 2 * clean.shape[1]:  # learned variance: the mean prediction is the first half
        output = output[:, :clean.shape[1]]
    return F.mse_loss(output.float(), target.float())


@torch.no_grad()
def validation_loss(pipes: list, batches: Callable[[torch.Generator, int], dict[str, Any]], aggregator=None, *,
                    count: int = 8, batch_size: int = 64, seed: int = 0) -> float:
    """The training loss on ``count`` fixed batches (noise and timesteps seeded by ``seed``): of ``pipes[0]``'s
    denoiser alone when ``pipes`` holds one pipeline, else of the ensemble mixed by ``aggregator`` (an
    ``Aggregator``, a folder, or None for the plain mean). Compare members, ensembles and aggregators on held-out
    batches with it."""
    pipes = list(pipes)
    adapter = adapter_for(pipes[0])
    if isinstance(aggregator, (str, os.PathLike)):
        aggregator = Aggregator.load(aggregator)
    losses = []
    with contextlib.ExitStack() as stack:
        lead = adapter.denoisers(pipes[0])[next(iter(adapter.denoisers(pipes[0])))]
        if len(pipes) > 1:
            stack.enter_context(_in_lockstep(pipes, adapter, aggregator))
        for index in range(count):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            losses.append(float(_loss(lead, pipes[0].scheduler, batches(generator, batch_size), generator)))
    return sum(losses) / len(losses)


def train_aggregator(pipes: list, batches: Callable[[torch.Generator, int], dict[str, Any]], *,
                     settings: AggregatorSettings | None = None, checkpoint_dir=None,
                     progress: bool = True) -> Aggregator:
    """Train an AFA aggregator for ``pipes`` (the first is the lead; all frozen). ``batches(generator, size)``
    returns one training batch: ``latents`` (clean samples in the denoiser's input space) and the denoiser's
    condition arguments (``class_labels`` or ``encoder_hidden_states``, with the null condition already dropped
    in at the rate guidance needs). The package docstring says what is trained and how."""
    settings = settings or AggregatorSettings()
    pipes = list(pipes)
    if len(pipes) < 2:
        raise ValueError(f"An ensemble needs 2 or more pipelines, got {len(pipes)}.")
    if any(context_of(pipe) is not None for pipe in pipes):
        raise ValueError("train_aggregator needs plain pipelines; accel.unwrap them first.")
    adapter = adapter_for(pipes[0])
    if adapter.name not in FAMILIES:
        raise ValueError(f"AFA supports the families {', '.join(FAMILIES)}; this is {adapter.name}.")
    if not callable(batches):
        raise ValueError("batches must be a function (generator, batch_size) -> dict(latents=..., <condition>=...).")
    models = member_models(pipes[0], pipes[1:], adapter)
    lead = adapter.denoisers(pipes[0])[next(iter(adapter.denoisers(pipes[0])))]
    blocks = adapter.blocks(lead)
    first = batches(torch.Generator().manual_seed(settings.seed), settings.batch_size)
    if not isinstance(first, dict) or not isinstance(first.get("latents"), torch.Tensor):
        raise ValueError("batches(generator, size) must return a dict with a 'latents' tensor and the denoiser's "
                         "condition arguments.")
    pick = condition_of(adapter)
    if adapter.conditioning == "class":
        condition = ("class", int(lead.config.num_embeds_ada_norm) + 1)
    else:
        condition = ("tokens", int(pick(first).shape[-1]))
    all_models = [lead, *models]
    card = {"family": adapter.name, "member_fingerprints": [model_fingerprint(m) for m in all_models],
            "scheduler": type(pipes[0].scheduler).__name__}
    dims = mixing_dims(lead) if adapter.name == "unet" else [_dry_run(lead, blocks, first)] * (len(blocks) + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        aggregator = Aggregator(len(all_models), len(dims), dims, settings.hidden, settings.heads, condition,
                                card=card)
    aggregator.to(next(lead.parameters()).device)
    params = dict(aggregator.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    key = json.dumps([[entry["weights_sha256"] for entry in card["member_fingerprints"]], asdict(settings)])
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, losses = (0, []) if folder is None else \
        load_checkpoint(folder, CHECKPOINT_FORMAT, key, params, optimizer, what="aggregator-training")
    started = time.perf_counter()
    aggregator.train()
    with _in_lockstep(pipes, adapter, aggregator):
        bar = tqdm(total=settings.steps, initial=start, desc="AFA: training the aggregator", disable=not progress)
        for step in range(start, settings.steps):
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
            batch = batches(generator, settings.batch_size)
            factor = min(1.0, (step + 1) / max(1, settings.warmup_steps))
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * factor
            with torch.enable_grad():
                loss = _loss(lead, pipes[0].scheduler, batch, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                optimizer.step()
            losses.append(round(float(loss.detach()), 6))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if folder is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
                save_checkpoint(folder, CHECKPOINT_FORMAT, key, step + 1, params, optimizer, losses)
        bar.close()
    aggregator.eval().requires_grad_(False)
    window = max(1, min(50, len(losses) // 10))
    aggregator.card["training"] = {
        **asdict(settings), "seconds_this_run": round(time.perf_counter() - started, 1), "resumed_from_step": start,
        "loss": "the members' own denoising loss (noise schedule of the lead's scheduler) on the training batches",
        "first_losses_mean": round(sum(losses[:window]) / window, 6) if losses else None,
        "last_losses_mean": round(sum(losses[-window:]) / window, 6) if losses else None,
        "parameters": sum(p.numel() for p in params.values()),
    }
    if math.isnan(losses[-1] if losses else 0.0):
        raise ValueError("The aggregator's loss became NaN; lower lr.")
    return aggregator
