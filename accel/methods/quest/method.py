"""QuEST's runtime: the config, the hook that runs a layer from its quantized weights, and ``apply_quest``. The
package docstring (``accel.methods.quest``) says what and why."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from accel.config import AccelConfig, check_bool, check_choice, check_float, check_int
from accel.hooks import MethodScope

from .artifact import QuantizedLayer, QuESTArtifact
from .quantizers import ActivationQuantizer

EXECUTIONS = ("auto", "dequantize")
PATH_INT8 = "int8 matmul (torch._int_mm)"
PATH_DEQUANTIZE = "dequantize per layer"


@dataclasses.dataclass
class QuESTConfig(AccelConfig):
    """Configuration of QuEST (arXiv 2402.03666).

    Args:
        weight_bits / activation_bits: 4 or 8 (the first and last layers always run at ``edge_bits``).
        artifact: a calibrated ``QuESTArtifact`` or the folder it was saved to (``accel.calibrate``); required by
            ``accel.wrap``.
        step_groups: timestep groups with their own activation scales (each call's steps split evenly).
        edge_bits: bits of the first layer (the one reading the latent) and the last one executed.
        search_clipping: per-channel weight clipping by L_2.4 error search; ``False`` is plain min/max (RTN).
        quantize_embeddings: quantize embedding tables (class-label embeddings) at ``weight_bits``, per row.
        activation_range: ``"percentile"`` (searched among percentiles) or ``"minmax"`` (RTN).
        stage_a_iterations: Stage A optimiser steps per step group (time-embedding / modulation layers).
        stage_b_epochs: Stage B passes over the step groups (FFN and q/k/v layers, activation scales).
        stage_b_iterations: Stage B optimiser steps per group and epoch.
        weight_lr / activation_lr: Adam learning rates of the finetuned weights and of the activation scales.
        quantize_attention: also quantize the attention matmuls' inputs (q, k, v; dynamic per-tensor ranges).
        release_originals: ``accel.wrap`` drops the float weights of the quantized layers to save their memory;
            ``unwrap`` then refuses and says to reload the pipeline.
        execution: ``"auto"`` runs W8A8 per-tensor layers as integer matmuls and dequantizes the others per
            layer; ``"dequantize"`` dequantizes every layer.
        seed: the calibration's sampling of inputs.
    """

    method = "quest"
    weight_bits: int = 4
    activation_bits: int = 8
    artifact: QuESTArtifact | str | None = None
    step_groups: int = 4
    edge_bits: int = 8
    search_clipping: bool = True
    quantize_embeddings: bool = True
    activation_range: str = "percentile"
    stage_a_iterations: int = 30
    stage_b_epochs: int = 3
    stage_b_iterations: int = 30
    weight_lr: float = 1e-5
    activation_lr: float = 1e-4
    quantize_attention: bool = False
    release_originals: bool = False
    execution: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        for name in ("weight_bits", "activation_bits", "edge_bits"):
            value = getattr(self, name)
            if value not in (4, 8) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is not accepted; QuEST quantizes to 4 or 8 bits.")
        check_int("step_groups", self.step_groups, minimum=1, maximum=1000)
        check_bool("search_clipping", self.search_clipping)
        check_bool("quantize_embeddings", self.quantize_embeddings)
        check_choice("activation_range", self.activation_range, ("percentile", "minmax"))
        check_int("stage_a_iterations", self.stage_a_iterations, minimum=0)
        check_int("stage_b_epochs", self.stage_b_epochs, minimum=0)
        check_int("stage_b_iterations", self.stage_b_iterations, minimum=0)
        check_float("weight_lr", self.weight_lr, minimum=0.0)
        check_float("activation_lr", self.activation_lr, minimum=0.0)
        check_bool("quantize_attention", self.quantize_attention)
        check_bool("release_originals", self.release_originals)
        check_choice("execution", self.execution, EXECUTIONS)
        check_int("seed", self.seed, minimum=0)
        if isinstance(self.artifact, os.PathLike):
            self.artifact = os.fspath(self.artifact)
        if isinstance(self.artifact, str):
            self.artifact = QuESTArtifact.load(self.artifact)
        elif self.artifact is not None and not isinstance(self.artifact, QuESTArtifact):
            raise ValueError(f"artifact={self.artifact!r} is not accepted; pass a QuESTArtifact, the folder it was "
                             "saved to, or None.")
        if self.artifact is not None:
            made = self.artifact.settings
            if (made.get("weight_bits"), made.get("activation_bits")) != (self.weight_bits, self.activation_bits):
                raise ValueError(
                    f"The artifact is W{made.get('weight_bits')}A{made.get('activation_bits')}; this config asks for "
                    f"W{self.weight_bits}A{self.activation_bits}. Use the matching preset, or calibrate anew."
                )

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON values; an artifact as its card's settings and metadata (its tensors are saved with
        ``artifact.save``)."""
        data = super().to_dict()
        if self.artifact is not None:
            data["artifact"] = None
        return data

    def __eq__(self, other) -> bool:  # the artifact (tensors) compares by identity
        if type(other) is not type(self):
            return NotImplemented
        fields = [field.name for field in dataclasses.fields(self) if field.name != "artifact"]
        return self.artifact is other.artifact and all(getattr(self, f) == getattr(other, f) for f in fields)


def step_group(step: int, num_steps: int | None, groups: int) -> int:
    """The activation-scale group of ``step`` of ``num_steps``: the steps split into ``groups`` even runs."""
    if not num_steps:
        return 0
    return min(groups - 1, step * groups // num_steps)


class CallPaths:
    """Per call: how many layer forwards ran on each execution path; published to the summary when a call ends."""

    def __init__(self, scope: MethodScope) -> None:
        self.scope = scope
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        if getattr(self, "counts", None):
            self.scope.extras["paths_last_call"] = dict(self.counts)
        self.counts = {}


class QuantizedLayerHook(ModelHook):
    """Runs a Linear or Conv2d from its quantized weight: its input through the step group's activation quantizer,
    then an int8 matmul (W8A8, per-tensor activations) or the weight dequantized for this forward. An Embedding
    (a label table) looks its rows up in the dequantized table."""

    def __init__(self, scope: MethodScope, layer: QuantizedLayer, groups: int, paths: CallPaths, execution: str,
                 released: bool) -> None:
        super().__init__()
        self.scope, self.layer, self.groups, self.paths, self.released = scope, layer, groups, paths, released
        channels = layer.activation_delta.shape[1]
        self.activation = None  # an embedding's input is indices
        if layer.activation_bits:
            self.activation = ActivationQuantizer(groups, layer.activation_bits, channels if channels > 1 else 0)
            self.activation.set_range(layer.activation_delta, layer.activation_zero_point)
            self.activation.requires_grad_(False)
        # the quantizer holds the ranges now: no second copy in the layer
        layer.activation_delta = layer.activation_zero_point = torch.empty(0)
        self.integer = (execution == "auto" and layer.kind == "linear" and layer.weight_bits == 8
                        and layer.activation_bits == 8 and channels == 1)
        if self.integer:
            codes = layer.weight_codes().to(torch.int16) - 128
            self.int_weight_t = codes.to(torch.int8).t().contiguous()  # [in, out] for torch._int_mm
            self.weight_sums = codes.sum(dim=1).to(torch.int32)  # per output channel
            self.weight_zero = layer.zero_point.to(torch.int32) - 128
            layer.codes = torch.empty(0, dtype=torch.uint8)  # held once, in the matmul layout
        self.path = PATH_INT8 if self.integer else PATH_DEQUANTIZE

    def new_forward(self, module, *args, **kwargs):
        group = self._group()
        if group is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        if self.integer:
            return self._integer_linear(x, group)
        if self.layer.kind == "embedding":
            weight = self.layer.dequantized_weight(module.weight.dtype).to(x.device)
            return F.embedding(x, weight, module.padding_idx, module.max_norm, module.norm_type,
                               module.scale_grad_by_freq, module.sparse)
        quantized = self.activation(x, group)
        weight = self.layer.dequantized_weight(x.dtype).to(x.device)
        bias = None if self.layer.bias is None else self.layer.bias.to(x.device, x.dtype)
        if self.layer.kind == "linear":
            return F.linear(quantized, weight, bias)
        return F.conv2d(quantized, weight, bias, module.stride, module.padding, module.dilation, module.groups)

    @torch.compiler.disable
    def _group(self) -> int | None:
        """The step group of this forward; ``None`` to run the float layer (outside this pipeline's calls)."""
        info = self.scope.current if self.scope.is_active() else None
        if info is None:
            return None if not self.released else self.groups // 2
        self.paths.counts[self.path] = self.paths.counts.get(self.path, 0) + 1
        return step_group(info.step, info.num_steps, self.groups)

    def _integer_linear(self, x: torch.Tensor, group: int) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        codes, delta, zero = self.activation.codes(rows, group)
        if codes.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.int_weight_t.shape[1])
        weight = self.int_weight_t.to(x.device)
        accumulated = torch._int_mm(codes, weight)  # sum_k xs * ws, int32
        # x ~ delta (xs - zero), w ~ dw (ws - zw): expand the product and correct with the row and column sums
        row_sums = codes.to(torch.int32).sum(dim=1, keepdim=True)
        weight_zero = self.weight_zero.to(x.device)
        corrected = (accumulated - zero * self.weight_sums.to(x.device)[None, :] - row_sums * weight_zero[None, :]
                     + rows.shape[1] * zero * weight_zero[None, :])
        output = corrected.to(torch.float32) * (delta * self.layer.delta.to(x.device, torch.float32))[None, :]
        if self.layer.bias is not None:
            output = output + self.layer.bias.to(x.device, torch.float32)
        return output.to(x.dtype).reshape(*shape[:-1], -1)


def _fake_quantize_dynamic(tensor: torch.Tensor, bits: int) -> torch.Tensor:
    low, high = tensor.amin().clamp(max=0), tensor.amax().clamp(min=0)
    delta = ((high - low) / (2**bits - 1)).clamp(min=1e-8)
    zero = (-low / delta).round()
    return (torch.clamp((tensor / delta).round() + zero, 0, 2**bits - 1) - zero) * delta


def quantized_attention(bits: int):
    """An attention replacement that quantizes q, k and v (dynamic per-tensor ranges) before the dense SDPA."""

    def replacement(call):
        query, key, value = (_fake_quantize_dynamic(t, bits) for t in (call.query, call.key, call.value))
        return F.scaled_dot_product_attention(query, key, value, attn_mask=call.attn_mask, dropout_p=call.dropout_p,
                                              is_causal=call.is_causal, scale=call.scale, enable_gqa=call.enable_gqa)

    return replacement


def apply_quest(scope: MethodScope, config: QuESTConfig) -> None:
    """Install the quantized layers of ``config.artifact`` on the pipeline behind ``scope``."""
    artifact = config.artifact
    if artifact is None:
        raise ValueError(
            f"QuEST needs a calibrated artifact: artifact = accel.calibrate(pipe, 'quest-w{config.weight_bits}"
            f"a{config.activation_bits}', inputs, num_inference_steps=...), then accel.wrap(pipe, ..., "
            "artifact=artifact) (or artifact.save(dir) and artifact=dir); accel.wrap_calibrated does both."
        )
    artifact.check_matches(scope)
    modules = {f"{attr}.{name}": module for attr, model in scope.denoisers.items()
               for name, module in model.named_modules()}
    paths = scope.add_state(CallPaths(scope))
    counts: dict[str, int] = {}
    for name, stored in artifact.layers.items():
        layer = dataclasses.replace(stored)  # the hook may re-lay the codes out; the artifact stays as saved
        hook = QuantizedLayerHook(scope, layer, artifact.step_groups, paths, config.execution,
                                  config.release_originals)
        scope.register_hook(modules[name], hook, f"layer.{name}")
        counts[hook.path] = counts.get(hook.path, 0) + 1
    if config.quantize_attention:
        replacement = quantized_attention(max(config.activation_bits, 8))
        for blocks in scope.blocks.values():
            for block in blocks:
                for kind, (name, module) in block.attentions.items():
                    scope.intercept_attention(module, replacement, kind=kind, name=name)
    scope.extras.update(
        bits=f"W{config.weight_bits}A{config.activation_bits}", layers=len(artifact.layers), paths=counts,
        weight_bytes=artifact.weight_bytes, calibration=artifact.metadata.get("calibration", {}),
    )
    if config.release_originals:
        scope.when_applied(lambda: release_float_weights(scope, [modules[name] for name in artifact.layers]))


def release_float_weights(scope: MethodScope, modules: list[torch.nn.Module]) -> None:
    """Replace each module's float weight (and bias) by an empty tensor of its dtype and device, and mark the
    pipeline as not unwrappable."""
    for module in modules:
        for name in ("weight", "bias"):
            value = getattr(module, name, None)
            if isinstance(value, torch.nn.Parameter):
                setattr(module, name, torch.nn.Parameter(value.new_empty(0), requires_grad=False))
    scope.unwrap_refusal = (
        "QuEST released this pipeline's float weights (release_originals=True), so it cannot be restored; "
        "reload it (e.g. DiffusionPipeline.from_pretrained(...)) to get the float model back."
    )
