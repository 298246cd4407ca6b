"""QuEST's quantizers: per-output-channel weight quantization with a searched clipping range, packed storage (two
4-bit codes per byte), and the activation quantizer with one learnable step size per group of timesteps.

Both are asymmetric uniform quantizers, ``x ~ delta * (q - zero_point)`` with ``q`` in ``[0, 2^bits - 1]``.
"""

from __future__ import annotations

import torch

# Q-Diffusion's weight search: shrink the channel's [min, max] by 0, 1, ..., 79 hundredths and keep the ratio with
# the least L_p error, p = 2.4 (BRECQ / Q-Diffusion's ``UniformAffineQuantizer``, scale_method "mse").
CLIP_RATIOS = tuple(1.0 - 0.01 * i for i in range(80))
CLIP_NORM = 2.4
# the activation range candidates (RepQ-ViT style percentiles, as QuEST's ``ActUniformQuantizer``); 1.0 is min/max
ACTIVATION_PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)
RANGE_SAMPLES = 1 << 16  # rows (values, per tensor) an activation range is searched on


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` with a straight-through gradient."""
    return (x.round() - x).detach() + x


def _range_params(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, zero point) of the asymmetric quantizer covering [low, high] (which always contains 0)."""
    low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    delta = ((high - low) / (2**bits - 1)).clamp(min=1e-8)
    zero_point = (-low / delta).round()
    return delta, zero_point


def fake_quantize(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize and dequantize ``x`` (straight-through in ``x`` and differentiable in ``delta``, as LSQ)."""
    q = torch.clamp(round_ste(x / delta) + zero_point, 0, 2**bits - 1)
    return (q - zero_point) * delta


@torch.no_grad()
def weight_ranges(weight: torch.Tensor, bits: int, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (delta, zero point) for ``weight`` [out, ...], each shaped [out, 1, ...].

    ``search``: the clipping ratio with the least L_2.4 error per channel (module constants); else plain min/max
    (round-to-nearest, the baseline).
    """
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    best_delta, best_zero = _range_params(low, high, bits)
    if search:
        best_error = torch.full_like(low, float("inf"))
        for ratio in CLIP_RATIOS:
            delta, zero = _range_params(low * ratio, high * ratio, bits)
            q = torch.clamp((flat / delta[:, None]).round() + zero[:, None], 0, 2**bits - 1)
            error = ((q - zero[:, None]) * delta[:, None] - flat).abs().pow(CLIP_NORM).sum(dim=1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_delta = torch.where(better, delta, best_delta)
            best_zero = torch.where(better, zero, best_zero)
    shape = (weight.shape[0],) + (1,) * (weight.ndim - 1)
    return best_delta.reshape(shape), best_zero.reshape(shape)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes of ``weight`` as uint8 (one code per element)."""
    q = torch.clamp((weight.float() / delta).round() + zero_point, 0, 2**bits - 1)
    return q.to(torch.uint8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, along the flattened tensor (low nibble first); odd lengths get a zero pad."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The codes ``pack_int4`` packed, as uint8 shaped ``shape``."""
    numel = 1
    for size in shape:
        numel *= size
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel]
    return codes.reshape(shape)


class ActivationQuantizer(torch.nn.Module):
    """Quantizes a layer's input with one learnable step size per timestep group and a fixed zero point (QuEST's
    ``TimewiseUniformQuantizer``). ``channels`` > 0 gives one range per input channel (the last dimension of a
    linear layer's input, the channel dimension of a convolution's; QuEST's choice at 4 bits), 0 one per tensor.
    Each group's step size is its own parameter, so an optimiser of one group leaves the others alone."""

    def __init__(self, groups: int, bits: int, channels: int = 0) -> None:
        super().__init__()
        self.bits = bits
        shape = (channels,) if channels else (1,)
        self.deltas = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(shape)) for _ in range(groups)])
        self.register_buffer("zero_point", torch.zeros(groups, *shape))

    @property
    def per_channel(self) -> bool:
        return self.deltas[0].numel() > 1

    @property
    def delta(self) -> torch.Tensor:
        """Every group's step size, [groups, channels or 1]."""
        return torch.stack([delta.detach() for delta in self.deltas])

    @torch.no_grad()
    def set_range(self, delta: torch.Tensor, zero_point: torch.Tensor) -> None:
        for group, value in enumerate(delta):
            self.deltas[group].copy_(value)
        self.zero_point.copy_(zero_point)

    @torch.no_grad()
    def initialize(self, group: int, samples: torch.Tensor, percentiles: tuple[float, ...]) -> None:
        """Set ``group``'s range from ``samples`` [rows, channels]: the candidate percentile range with the least
        squared error (``percentiles`` of (1.0,) is min/max)."""
        samples = samples.float()
        if not self.per_channel:
            samples = samples.reshape(-1, 1)
        if samples.shape[0] > RANGE_SAMPLES:  # an evenly strided subset: sorting millions of values costs seconds
            samples = samples[:: samples.shape[0] // RANGE_SAMPLES + 1]
        best = None
        # the order statistics the percentiles need, from the top and bottom k values alone (a full sort is slow)
        last = samples.shape[0] - 1
        k = min(samples.shape[0], round((1 - min(percentiles)) * last) + 1)
        top = samples.topk(k, dim=0).values  # descending: top[0] is the maximum
        bottom = samples.topk(k, dim=0, largest=False).values  # ascending
        for p in percentiles:
            index = round((1 - p) * last)
            low, high = bottom[index], top[index]
            delta, zero = _range_params(low, high, self.bits)
            error = (fake_quantize(samples, delta, zero, self.bits) - samples).pow(2).sum()
            if best is None or error < best[0]:
                best = (error, delta, zero)
        self.deltas[group].copy_(best[1])
        self.zero_point[group] = best[2]

    def _range(self, x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        delta, zero = self.deltas[group].abs().clamp(min=1e-8), self.zero_point[group]
        if self.per_channel and x.ndim == 4 and x.shape[-1] != delta.numel():
            delta, zero = delta[:, None, None], zero[:, None, None]  # a convolution's input [B, C, H, W]
        return delta.to(x.dtype), zero.to(x.dtype)

    def forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        delta, zero = self._range(x, group)
        return fake_quantize(x, delta, zero, self.bits)

    @torch.no_grad()
    def codes(self, x: torch.Tensor, group: int) -> tuple[torch.Tensor, float, int]:
        """Per-tensor only: (int8 codes shifted by -128, delta, shifted zero point) for the integer matmul."""
        delta = float(self.deltas[group].abs().clamp(min=1e-8))
        zero = int(self.zero_point[group])
        q = torch.clamp((x / delta).round() + zero, 0, 2**self.bits - 1)
        return (q - 128).to(torch.int8), delta, zero - 128
