"""QuEST's artifact: the quantized layers of one model, saved as safetensors (weight codes packed two per byte at 4
bits, int8 at 8, per-channel scales and zero points, the finetuned biases, the step-group activation scales) plus a
JSON card of what it was calibrated on. Loading reads only those two files."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from accel.io import atomic_write
from accel.methods.bac.cache import weights_fingerprint
from accel.methods.bac.schedule import describe_models

from .quantizers import pack_int4, unpack_int4

if TYPE_CHECKING:
    from accel.hooks import MethodScope

FORMAT = "accel.quest/1"
TENSORS_FILE = "quest.safetensors"
CARD_FILE = "quest.json"


@dataclasses.dataclass
class QuantizedLayer:
    """One layer's quantized weight and its input's activation quantizer.

    ``codes``: uint8, packed two per byte when ``weight_bits`` is 4, else one per element; the weight is
    ``delta * (code - zero_point)`` per output channel. ``activation_delta`` / ``activation_zero_point``: [groups,
    1] (per tensor) or [groups, in_channels].
    """

    kind: str  # "linear" or "conv2d"
    shape: tuple[int, ...]
    weight_bits: int
    activation_bits: int
    codes: torch.Tensor
    delta: torch.Tensor  # float16 [out]
    zero_point: torch.Tensor  # uint8 [out]
    bias: torch.Tensor | None
    activation_delta: torch.Tensor
    activation_zero_point: torch.Tensor

    @classmethod
    def from_codes(cls, kind, shape, weight_bits, activation_bits, codes, delta, zero_point, bias, act_delta,
                   act_zero) -> QuantizedLayer:
        codes = pack_int4(codes) if weight_bits == 4 else codes.reshape(-1).to(torch.uint8)
        # a channel's step size in fp16 (relative error 5e-4, uniform over the channel) and its zero point, an
        # integer in [0, 2^bits - 1], in uint8: 3 bytes per output channel instead of 8
        return cls(kind, tuple(shape), weight_bits, activation_bits, codes.contiguous(),
                   delta.reshape(-1).to(torch.float16).contiguous(),
                   zero_point.reshape(-1).round().to(torch.uint8).contiguous(),
                   None if bias is None else bias.detach().clone(), act_delta.detach().abs().float().clone(),
                   act_zero.detach().float().clone())

    def weight_codes(self) -> torch.Tensor:
        """The unpacked uint8 codes, shaped as the weight."""
        if self.weight_bits == 4:
            return unpack_int4(self.codes, self.shape)
        return self.codes.reshape(self.shape)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        scale_shape = (self.shape[0],) + (1,) * (len(self.shape) - 1)
        codes = self.weight_codes().to(torch.float32)
        zero_point, delta = self.zero_point.reshape(scale_shape).float(), self.delta.reshape(scale_shape).float()
        weight = (codes - zero_point) * delta
        return weight.to(dtype)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the tensors this layer's weight is held in (codes, scales, zero points), bias excluded."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.delta, self.zero_point))


@dataclasses.dataclass
class QuESTArtifact:
    """What ``accel.calibrate(pipe, "quest-...", ...)`` returns: every quantized layer by qualified name
    (``"transformer.transformer_blocks.0.attn1.to_q"``) and a card (``settings``: bits and groups; ``metadata``:
    the models and weights it is valid for, the calibration inputs, times and losses)."""

    layers: dict[str, QuantizedLayer]
    settings: dict[str, Any]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def step_groups(self) -> int:
        return int(self.settings["step_groups"])

    @property
    def weight_bytes(self) -> int:
        return sum(layer.stored_bytes for layer in self.layers.values())

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``quest.safetensors`` and ``quest.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, layers = {}, {}
        for name, layer in self.layers.items():
            for field in ("codes", "delta", "zero_point", "bias", "activation_delta", "activation_zero_point"):
                value = getattr(layer, field)
                if value is not None:
                    tensors[f"{name}.{field}"] = value.contiguous()
            layers[name] = {"kind": layer.kind, "shape": list(layer.shape), "weight_bits": layer.weight_bits,
                            "activation_bits": layer.activation_bits}
        temporary = directory / f".{TENSORS_FILE}.partial"
        save_file(tensors, str(temporary))
        os.replace(temporary, directory / TENSORS_FILE)
        card = {"format": FORMAT, "settings": self.settings, "metadata": self.metadata, "layers": layers}
        atomic_write(directory / CARD_FILE, json.dumps(card, indent=1, default=str))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> QuESTArtifact:
        """Read a saved artifact; ``ValueError`` for a missing, foreign or inconsistent one."""
        directory = Path(directory)
        card_path, tensors_path = directory / CARD_FILE, directory / TENSORS_FILE
        if not card_path.is_file() or not tensors_path.is_file():
            raise ValueError(f"{directory} is not a QuEST artifact: it needs {CARD_FILE} and {TENSORS_FILE} "
                             "(written by artifact.save(dir)).")
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read {card_path}: {error}") from None
        if not isinstance(card, dict) or card.get("format") != FORMAT:
            raise ValueError(f"{card_path} is not a {FORMAT} card (format {card.get('format')!r}).")
        tensors = load_file(str(tensors_path))
        layers = {}
        for name, entry in card["layers"].items():
            try:
                layers[name] = QuantizedLayer(
                    entry["kind"], tuple(entry["shape"]), int(entry["weight_bits"]), int(entry["activation_bits"]),
                    tensors[f"{name}.codes"], tensors[f"{name}.delta"], tensors[f"{name}.zero_point"],
                    tensors.get(f"{name}.bias"), tensors[f"{name}.activation_delta"],
                    tensors[f"{name}.activation_zero_point"],
                )
            except KeyError as error:
                raise ValueError(f"{tensors_path} lacks {error.args[0]}: the artifact is incomplete.") from None
        return cls(layers, dict(card["settings"]), dict(card.get("metadata", {})))

    def check_matches(self, scope: MethodScope) -> None:
        """Raise ``ValueError`` unless this artifact was calibrated on this pipeline's denoiser(s): same class,
        config and weights, and every quantized layer present with its shape."""
        expected = self.metadata.get("models")
        actual = describe_models(scope.denoisers, scope.pipe.scheduler)["denoisers"]
        if expected is not None and expected != actual:
            raise ValueError(
                f"This QuEST artifact was calibrated on another model: {json.dumps(expected, sort_keys=True)}, not "
                f"this pipeline's {json.dumps(actual, sort_keys=True)}. Calibrate one for it with "
                "accel.calibrate(pipe, 'quest-w4a8', inputs, num_inference_steps=...)."
            )
        weights = self.metadata.get("weights")
        if weights is not None:
            mine = {name: weights_fingerprint(model) for name, model in scope.denoisers.items()}
            if mine != weights:
                raise ValueError("This QuEST artifact was calibrated on other weights of this model (a fine-tune or "
                                 "another checkpoint); calibrate one for these weights with accel.calibrate.")
        modules = {f"{attr}.{name}": module for attr, model in scope.denoisers.items()
                   for name, module in model.named_modules()}
        for name, layer in self.layers.items():
            module = modules.get(name)
            if module is None or tuple(getattr(module, "weight", torch.empty(0)).shape) != layer.shape:
                raise ValueError(f"This QuEST artifact quantizes {name} {list(layer.shape)}, which this pipeline's "
                                 "denoiser does not have; it was calibrated on another model.")
