"""QuEST calibration: record the float model's own sampling trajectories (both CFG branches), set the weight and
activation quantizers, then the two selective finetuning stages, each on local layer MSE plus final output MSE
against the float model. Backs ``accel.calibrate(pipe, "quest-w4a8", ...)``."""

from __future__ import annotations

import datetime
import fnmatch
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from tqdm.auto import tqdm

from accel.hooks import MethodScope, temporary_scope
from accel.methods.bac.cache import weights_fingerprint
from accel.methods.bac.schedule import describe_models

from ..trained import detached
from .artifact import QuantizedLayer, QuESTArtifact
from .method import QuESTConfig, step_group
from .quantizers import ACTIVATION_PERCENTILES, ActivationQuantizer, fake_quantize, quantize_weight, weight_ranges

_HOOK = "accel.quest.calibration"
QUANTIZABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
KINDS = {torch.nn.Linear: "linear", torch.nn.Conv2d: "conv2d", torch.nn.Embedding: "embedding"}
SAMPLED_ROWS = 1024  # activation rows kept per layer, group and recorded call for the range search
# Stage B's sensitive layers inside a block's branches: every layer of a feed-forward, the q/k/v projections of an
# attention (the paper's FFN and attention layers with skewed inputs)
QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


@dataclass
class Record:
    """One recorded denoiser call: which denoiser, the step and its group, its arguments."""

    denoiser: str
    group: int
    args: tuple
    kwargs: dict


class _RecordHook(ModelHook):
    def __init__(self, scope: MethodScope, attr: str, records: list[Record], groups: int) -> None:
        super().__init__()
        self.scope, self.attr, self.records, self.groups = scope, attr, records, groups

    def pre_forward(self, module, *args, **kwargs):
        info = self.scope.current if self.scope.is_active() else None
        if info is not None:
            group = step_group(info.step, info.num_steps, self.groups)
            self.records.append(Record(self.attr, group, detached(args), detached(kwargs)))
        return args, kwargs


def _output(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


@dataclass
class Session:
    """What the calibration hooks do on the forward running now."""

    mode: str = "float"  # "float", "order" (record execution order), "collect" (activation samples), "quant"
    group: int = 0
    capture: frozenset[str] = frozenset()
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    order: list[tuple[str, int]] = field(default_factory=list)  # (layer, data pointer of its input)
    samples: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    generator: torch.Generator | None = None


class CalibrationLayer(ModelHook):
    """A layer under calibration: float, or fake-quantized from its latent (finetuned) weight."""

    def __init__(self, session: Session, name: str, module: torch.nn.Module) -> None:
        super().__init__()
        self.session, self.name = session, name
        self.kind = next(kind for cls, kind in KINDS.items() if isinstance(module, cls))
        self.latent_weight = torch.nn.Parameter(module.weight.detach().float().clone(), requires_grad=False)
        bias = getattr(module, "bias", None)
        self.latent_bias = None if bias is None else torch.nn.Parameter(bias.detach().float().clone(),
                                                                        requires_grad=False)
        self.weight_bits = self.activation_bits = 8
        self.weight_delta = self.weight_zero = None
        self.activation: ActivationQuantizer | None = None
        self.frozen_weight: torch.Tensor | None = None  # the fake-quantized weight while not trained

    def setup(self, weight_bits: int, activation_bits: int, groups: int, search: bool) -> None:
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.weight_delta, self.weight_zero = weight_ranges(self.latent_weight, weight_bits, search)
        if self.kind == "embedding":  # a table lookup: its input is indices, only its weight is quantized
            self.activation_bits, self.activation = 0, None
            return
        channels = self.latent_weight.shape[1] if activation_bits == 4 else 0
        self.activation = ActivationQuantizer(groups, activation_bits, channels).to(self.latent_weight.device)

    def trainable(self, on: bool) -> list[torch.nn.Parameter]:
        self.frozen_weight = None
        params = [p for p in (self.latent_weight, self.latent_bias) if p is not None]
        for param in params:
            param.requires_grad_(on)
        return params

    def quantized_weight(self) -> torch.Tensor:
        if self.latent_weight.requires_grad:
            return fake_quantize(self.latent_weight, self.weight_delta, self.weight_zero, self.weight_bits)
        if self.frozen_weight is None:
            with torch.no_grad():
                self.frozen_weight = fake_quantize(self.latent_weight, self.weight_delta, self.weight_zero,
                                                   self.weight_bits)
        return self.frozen_weight

    def new_forward(self, module, *args, **kwargs):
        session = self.session
        x = args[0] if args else kwargs["input"]
        if session.mode == "quant" and self.kind == "embedding":
            output = F.embedding(x, self.quantized_weight().to(module.weight.dtype), module.padding_idx,
                                 module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse)
        elif session.mode == "quant":
            quantized = self.activation(x, session.group)
            weight = self.quantized_weight().to(x.dtype)
            bias = None if self.latent_bias is None else self.latent_bias.to(x.dtype)
            if self.kind == "linear":
                output = F.linear(quantized, weight, bias)
            else:
                output = F.conv2d(quantized, weight, bias, module.stride, module.padding, module.dilation,
                                  module.groups)
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.kind == "embedding":
                pass
            elif session.mode == "order":
                session.order.append((self.name, x.data_ptr()))
            elif session.mode == "collect":
                rows = x.detach().movedim(1, -1) if self.kind == "conv2d" else x.detach()
                rows = rows.reshape(-1, rows.shape[-1])
                if rows.shape[0] > SAMPLED_ROWS:
                    keep = torch.randperm(rows.shape[0], generator=session.generator)[:SAMPLED_ROWS]
                    rows = rows[keep.to(rows.device)]
                session.samples.setdefault(self.name, []).append(rows.float())
        if self.name in session.capture:
            session.captured[self.name] = output
        return output

    def to_artifact(self) -> QuantizedLayer:
        codes = quantize_weight(self.latent_weight, self.weight_delta, self.weight_zero, self.weight_bits)
        dtype = self.latent_weight.dtype
        bias = None if self.latent_bias is None else self.latent_bias.detach().to(dtype)
        return QuantizedLayer.from_codes(
            self.kind, tuple(self.latent_weight.shape), self.weight_bits, self.activation_bits, codes.cpu(),
            self.weight_delta.cpu(), self.weight_zero.cpu(), None if bias is None else bias.cpu(),
            *((self.activation.delta.cpu(), self.activation.zero_point.cpu()) if self.activation is not None
              else (torch.zeros(1, 1), torch.zeros(1, 1))),
        )


def quantizable_layers(denoisers: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Every Linear, Conv2d and Embedding of the denoisers, by qualified name (``"transformer.proj_out_2"``)."""
    return {f"{attr}.{name}": module for attr, model in denoisers.items() for name, module in model.named_modules()
            if isinstance(module, QUANTIZABLE) and module.weight is not None and module.weight.numel() > 0}


def stage_a_layers(scope: MethodScope, names: Iterable[str]) -> list[str]:
    """The quantized layers inside the adapter's time-embedding / AdaLN-modulation modules."""
    patterns = [f"{attr}.{pattern}" for attr in scope.denoisers for pattern in scope.adapter.modulation]
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*")
                                          for p in patterns)]


def stage_b_layers(scope: MethodScope, names: Iterable[str]) -> list[str]:
    """The quantized layers of every block's feed-forward branches and its attentions' q/k/v projections."""
    prefixes, qkv = [], []
    for attr, blocks in scope.blocks.items():
        for block in blocks:
            for kind, (name, _) in block.branches.items():
                if kind.startswith("ff"):
                    prefixes.append(f"{attr}.{name}.")
                else:
                    qkv.extend(f"{attr}.{name}.{projection}" for projection in QKV)
    wanted = set(qkv)
    return [name for name in names if name in wanted or any(name.startswith(p) for p in prefixes)]


def _records(scope: MethodScope, inputs: list[dict], steps: int, groups: int, progress: bool) -> list[Record]:
    records: list[Record] = []

    def install(temporary: MethodScope) -> None:
        for attr, model in temporary.denoisers.items():
            temporary.register_hook(model, _RecordHook(temporary, attr, records, groups), f"record.{attr}")

    with temporary_scope(scope.pipe, "quest.record", install):
        for kwargs in tqdm(inputs, desc="QuEST: sampling calibration trajectories", disable=not progress):
            scope.pipe(**{**kwargs, "num_inference_steps": steps})
    return records


def _forward(scope: MethodScope, record: Record) -> torch.Tensor:
    return _output(scope.denoisers[record.denoiser](*record.args, **record.kwargs))


def _latent_pointer(record: Record) -> int | None:
    hidden = record.args[0] if record.args else record.kwargs.get("hidden_states", record.kwargs.get("sample"))
    return hidden.data_ptr() if isinstance(hidden, torch.Tensor) else None


def _edge_layers(scope: MethodScope, session: Session, record: Record) -> set[str]:
    """The first layer (the one that reads the latent itself, else the first to run) and the last to run."""
    session.mode, session.order = "order", []
    with torch.no_grad():
        _forward(scope, record)
    session.mode = "float"
    if not session.order:
        return set()
    pointer = _latent_pointer(record)
    first = [name for name, ptr in session.order if ptr == pointer] or [session.order[0][0]]
    return {first[0], session.order[-1][0]}


def _loss(session: Session, targets: list[str], output: torch.Tensor, reference: torch.Tensor,
          references: dict[str, torch.Tensor]) -> torch.Tensor:
    """Local + global supervision: per target layer, its output MSE plus the model output MSE (the authors' sum)."""
    global_term = F.mse_loss(output.float(), reference.float())
    local = [F.mse_loss(session.captured[name].float(), references[name].float())
             for name in targets if name in session.captured and name in references]
    return sum(local) + global_term * max(1, len(local))


def _finetune(scope: MethodScope, session: Session, layers: dict[str, CalibrationLayer], records: list[Record],
              group: int, targets: list[str], iterations: int, optimizers: list[torch.optim.Optimizer],
              rng: random.Random, progress_bar) -> list[float]:
    losses = []
    session.group, session.capture = group, frozenset(targets)
    pool = [record for record in records if record.group == group]
    for _ in range(iterations):
        record = rng.choice(pool)
        session.mode, session.captured = "float", {}
        with torch.no_grad():
            reference = _forward(scope, record)
        references = dict(session.captured)
        session.mode, session.captured = "quant", {}
        with torch.enable_grad():
            loss = _loss(session, targets, _forward(scope, record), reference, references)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
        for name in targets:
            layers[name].frozen_weight = None
        losses.append(float(loss.detach()))
        progress_bar.update()
    session.mode, session.capture, session.captured = "float", frozenset(), {}
    return losses


def calibrate_quest(pipe, config: QuESTConfig, inputs, *, num_inference_steps: int, progress: bool = True
                    ) -> QuESTArtifact:
    """Calibrate ``config`` on ``pipe`` with ``inputs`` (call kwargs, or a list of them) sampled at
    ``num_inference_steps``; return the artifact (module docstring)."""
    inputs = [inputs] if isinstance(inputs, dict) else list(inputs)
    if not inputs or not all(isinstance(kwargs, dict) for kwargs in inputs):
        raise ValueError("QuEST calibration inputs must be a dict of call arguments or a non-empty list of them.")
    started = time.perf_counter()
    groups = min(config.step_groups, num_inference_steps)
    with temporary_scope(pipe, "quest.calibration", lambda scope: None) as scope:
        modules = quantizable_layers(scope.denoisers)
        if not config.quantize_embeddings:
            modules = {name: m for name, m in modules.items() if not isinstance(m, torch.nn.Embedding)}
        if not any(not isinstance(module, torch.nn.Embedding) for module in modules.values()):
            raise ValueError(f"{type(pipe).__name__}'s denoiser has no Linear or Conv2d layer to quantize.")
        models = describe_models(scope.denoisers, pipe.scheduler)["denoisers"]
        weights = {name: weights_fingerprint(model) for name, model in scope.denoisers.items()}
        records = _records(scope, inputs, num_inference_steps, groups, progress)
        recorded = time.perf_counter()

        session = Session(generator=torch.Generator().manual_seed(config.seed))
        layers = {name: CalibrationLayer(session, name, module) for name, module in modules.items()}
        frozen = {name: [p for p in model.parameters() if p.requires_grad] for name, model in scope.denoisers.items()}
        for params in frozen.values():
            for param in params:
                param.requires_grad_(False)
        registries = []
        try:
            for name, module in modules.items():
                registry = HookRegistry.check_if_exists_or_initialize(module)
                registry.register_hook(layers[name], _HOOK)
                registries.append(registry)
            artifact = _calibrate(scope, config, session, layers, records, groups, progress)
        finally:
            for registry in registries:
                registry.remove_hook(_HOOK, recurse=False)
            for params in frozen.values():
                for param in params:
                    param.requires_grad_(True)
        for module in modules.values():  # leave no empty hook registry behind
            if getattr(module, "_diffusers_hook", None) is not None and not module._diffusers_hook.hooks:
                del module._diffusers_hook
                forward = module.__dict__.get("forward")
                if getattr(forward, "__self__", None) is module:
                    del module.forward
    calibration = artifact.metadata.setdefault("calibration", {})
    calibration.update(
        inputs=len(inputs), num_inference_steps=num_inference_steps, recorded_calls=len(records),
        seconds={"sampling": round(recorded - started, 2), **calibration.get("seconds", {}),
                 "total": round(time.perf_counter() - started, 2)},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    artifact.metadata.update(models=models, weights=weights, family=scope.family, pipeline=type(pipe).__name__)
    return artifact


def _calibrate(scope: MethodScope, config: QuESTConfig, session: Session, layers: dict[str, CalibrationLayer],
               records: list[Record], groups: int, progress: bool) -> QuESTArtifact:
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    edges = _edge_layers(scope, session, records[0])
    for name, layer in layers.items():
        bits = (config.edge_bits, config.edge_bits) if name in edges else (config.weight_bits,
                                                                             config.activation_bits)
        layer.setup(*bits, groups=groups, search=config.search_clipping)
    percentiles = ACTIVATION_PERCENTILES if config.activation_range == "percentile" else (1.0,)
    for group in tqdm(range(groups), desc="QuEST: activation ranges", disable=not progress):
        session.mode, session.samples = "collect", {}
        with torch.no_grad():
            for record in [r for r in records if r.group == group]:
                _forward(scope, record)
        session.mode = "float"
        for name, rows in session.samples.items():  # (embeddings collect none)
            layers[name].activation.initialize(group, torch.cat(rows), percentiles)
        session.samples = {}
    seconds["ranges"] = round(time.perf_counter() - started, 2)

    rng = random.Random(config.seed)
    losses: dict[str, list[float]] = {}
    names = [name for name, layer in layers.items() if layer.activation is not None]  # embeddings: weights only
    stage_a, stage_b = stage_a_layers(scope, names), stage_b_layers(scope, names)
    total = groups * config.stage_a_iterations * bool(stage_a) + \
        config.stage_b_epochs * groups * config.stage_b_iterations * bool(stage_b)
    with tqdm(total=total, desc="QuEST: selective finetuning", disable=not progress or not total) as bar:
        started = time.perf_counter()
        if stage_a and config.stage_a_iterations:  # time-embedding / modulation layers, group by group
            weights = [p for name in stage_a for p in layers[name].trainable(True)]
            weight_optimizer = torch.optim.Adam(weights, lr=config.weight_lr)
            for group in range(groups):
                deltas = [layers[name].activation.deltas[group] for name in stage_a]
                delta_optimizer = torch.optim.Adam(deltas, lr=config.weight_lr)
                losses.setdefault("stage_a", []).extend(_finetune(
                    scope, session, layers, records, group, stage_a, config.stage_a_iterations,
                    [weight_optimizer, delta_optimizer], rng, bar))
            for name in stage_a:
                layers[name].trainable(False)
        seconds["stage_a"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        if stage_b and config.stage_b_epochs and config.stage_b_iterations:  # sensitive layers + activation scales
            weights = [p for name in stage_b for p in layers[name].trainable(True)]
            weight_optimizer = torch.optim.Adam(weights, lr=config.weight_lr)
            delta_optimizers = {
                group: torch.optim.Adam([layer.activation.deltas[group] for name, layer in layers.items()
                                         if name not in stage_a and layer.activation is not None],
                                        lr=config.activation_lr)
                for group in range(groups)
            }
            for _ in range(config.stage_b_epochs):
                for group in range(groups):
                    losses.setdefault("stage_b", []).extend(_finetune(
                        scope, session, layers, records, group, stage_b, config.stage_b_iterations,
                        [weight_optimizer, delta_optimizers[group]], rng, bar))
            for name in stage_b:
                layers[name].trainable(False)
        seconds["stage_b"] = round(time.perf_counter() - started, 2)

    settings = {"weight_bits": config.weight_bits, "activation_bits": config.activation_bits,
                "quantize_embeddings": config.quantize_embeddings,
                "step_groups": groups, "edge_bits": config.edge_bits, "search_clipping": config.search_clipping,
                "activation_range": config.activation_range}
    metadata: dict[str, Any] = {"calibration": {
        "edge_layers": sorted(edges), "stage_a_layers": len(stage_a), "stage_b_layers": len(stage_b),
        "stage_a_iterations": config.stage_a_iterations, "stage_b_epochs": config.stage_b_epochs,
        "stage_b_iterations": config.stage_b_iterations, "weight_lr": config.weight_lr,
        "activation_lr": config.activation_lr, "seed": config.seed, "seconds": seconds,
        "loss": {stage: {"first": values[0], "last": values[-1], "mean_last_10": sum(values[-10:]) / len(values[-10:])}
                 for stage, values in losses.items() if values},
    }}
    return QuESTArtifact({name: layer.to_artifact() for name, layer in layers.items()}, settings, metadata)
