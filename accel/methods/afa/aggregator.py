"""The trained part of AFA: one Spatial-Aware Block-Wise (SABW) mixer per mixing point (the members' first-block
inputs, then every block's outputs), the timestep and condition embeddings they share, and the card that says which
members (in which order) they were trained for; saved as safetensors + JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from safetensors.torch import load_file, save_file

from accel.io import atomic_write

FORMAT = "accel-afa/1"
# Mixing weights below this are set to 0: below 2^-24 a member's share is under the rounding of an fp32 mix whose
# weights sum to 1. A trained mix can route a token almost wholly to one member; the softmax then gives the others
# tiny weights (down to denormals), and their products with the gradients, denormal, made every matmul of the
# members' backward ~3x slower on CPU (training at lr 2e-3, docs/methods/afa.md); 1e-30 was not enough.
NEGLIGIBLE_WEIGHT = 2.0 ** -24
CONDITION_KINDS = ("class", "tokens")


class _Attention(torch.nn.Module):
    """Multi-head attention of ``query`` tokens to ``context`` tokens (itself when None)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = query if context is None else context

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(split(self.to_q(query)), split(self.to_k(context)),
                                               split(self.to_v(context)))
        return self.to_out(mixed.transpose(1, 2).flatten(2))


class BlockMixer(torch.nn.Module):
    """SABW for one mixing point: the N members' features [B, T, D] are concatenated per token and projected down,
    modulated by the timestep embedding (adaptive LayerNorm), run through self-attention, attention to the
    condition tokens and an MLP, and projected to N logits per token by a zero-initialised map; the output is the
    per-token softmax-weighted sum of the members' features (at initialisation, exactly their mean)."""

    def __init__(self, members: int, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.down = torch.nn.Linear(members * dim, hidden)
        self.modulation = torch.nn.Linear(hidden, 2 * hidden)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(hidden, elementwise_affine=False) for _ in range(3))
        self.self_attention = _Attention(hidden, heads)
        self.cross_attention = _Attention(hidden, heads)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
                                       torch.nn.Linear(4 * hidden, hidden))
        self.to_logits = torch.nn.Linear(hidden, members, bias=False)
        torch.nn.init.zeros_(self.to_logits.weight)

    def weights(self, features: list[torch.Tensor], time: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Per-token mixing weights [B, T, N] (they sum to 1 over the members)."""
        dtype = self.down.weight.dtype
        x = self.down(torch.cat(features, dim=-1).to(dtype))
        shift, scale = self.modulation(F.silu(time)).unsqueeze(1).chunk(2, dim=-1)
        x = x + self.self_attention(self.norms[0](x) * (1 + scale) + shift)
        x = x + self.cross_attention(self.norms[1](x), condition)
        x = x + self.mlp(self.norms[2](x))
        weights = self.to_logits(x).softmax(dim=-1)
        return weights.masked_fill(weights < NEGLIGIBLE_WEIGHT, 0.0)

    def mixing_weights(self, features: list[torch.Tensor], time: torch.Tensor, condition: torch.Tensor,
                       conditional_half: int | None = None) -> torch.Tensor:
        """Per-token weights [B, T, N] for token features [B, T, D] or U-Net maps [B, C, H, W] (one token per
        pixel). ``conditional_half`` (0 or 1): the batch is [half 0; half 1], the two classifier-free guidance
        branches of the same samples, and both take the weights of that half's rows."""
        if features[0].ndim == 4:
            features = [feature.flatten(2).transpose(1, 2) for feature in features]
        if conditional_half is None:
            return self.weights(features, time, condition)
        half = len(features[0]) // 2
        rows = slice(conditional_half * half, (conditional_half + 1) * half)
        weights = self.weights([feature[rows] for feature in features], time[rows], condition[rows])
        return torch.cat([weights, weights])

    @staticmethod
    def combine(features: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """The members' features summed with ``weights`` [B, T, N] (U-Net maps: T is height x width)."""
        if features[0].ndim == 4:
            batch, channels, height, width = features[0].shape
            tokens = [feature.flatten(2).transpose(1, 2) for feature in features]
            return BlockMixer.combine(tokens, weights).transpose(1, 2).reshape(batch, channels, height, width)
        weights = weights.to(features[0].dtype)
        mixed = weights[..., 0:1] * features[0]
        for index in range(1, len(features)):
            mixed = mixed + weights[..., index:index + 1] * features[index]
        return mixed

    def forward(self, features: list[torch.Tensor], time: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.combine(features, self.mixing_weights(features, time, condition))


class Aggregator(torch.nn.Module):
    """The mixers of every mixing point and the embeddings they share. ``condition`` is ``("class", classes)``
    (an embedding table; the pipeline's null class included) or ``("tokens", width)`` (a projection of the
    denoiser's ``encoder_hidden_states``)."""

    def __init__(self, members: int, points: int, dim: int | list[int], hidden: int = 64, heads: int = 4,
                 condition: tuple[str, int] = ("class", 1001), card: dict[str, Any] | None = None) -> None:
        super().__init__()
        kind, size = condition
        if kind not in CONDITION_KINDS or size < 1:
            raise ValueError(f"condition must be (kind, size) with kind one of {CONDITION_KINDS}, got {condition!r}.")
        dims = [int(dim)] * points if isinstance(dim, int) else [int(d) for d in dim]
        if members < 2 or points < 1 or len(dims) != points or min(dims) < 1 or hidden < 1 or heads < 1 or \
                hidden % heads:
            raise ValueError(f"An aggregator needs 2 or more members, a feature width per mixing point ({points}), "
                             f"and hidden ({hidden}) divisible by heads ({heads}).")
        self.members, self.condition_kind = members, kind
        self.time_projection = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(256, hidden)
        self.condition_embedding = torch.nn.Embedding(size, hidden) if kind == "class" else \
            torch.nn.Linear(size, hidden)
        self.mixers = torch.nn.ModuleList(BlockMixer(members, width, hidden, heads) for width in dims)
        self.card: dict[str, Any] = {**(card or {}), "members": members, "points": points, "dims": dims,
                                     "hidden": hidden, "heads": heads, "condition": [kind, size]}

    def embed(self, timestep: torch.Tensor, condition: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The timestep embedding [B, hidden] and the condition tokens [B, L, hidden] of one denoiser call."""
        dtype = self.time_embedding.linear_1.weight.dtype
        timestep = torch.as_tensor(timestep, device=self.time_embedding.linear_1.weight.device)
        # One timestep per sample (a scalar is broadcast; per-token timesteps give their first token's).
        timestep = timestep.reshape(-1)[:1].expand(batch) if timestep.numel() == 1 else \
            timestep.reshape(timestep.shape[0], -1)[:, 0]
        time = self.time_embedding(self.time_projection(timestep).to(dtype))
        if self.condition_kind == "class":
            labels = torch.as_tensor(condition, device=timestep.device).long().reshape(-1)
            tokens = self.condition_embedding(labels.expand(batch) if labels.numel() == 1 else labels).unsqueeze(1)
        else:  # text tokens [B, L, D]; Allegro passes them as [B, 1, L, D]
            tokens = self.condition_embedding(condition.reshape(condition.shape[0], -1, condition.shape[-1]).to(dtype))
        return time, tokens

    def save(self, folder: str | Path) -> Path:
        """Write ``aggregator.safetensors`` and ``aggregator.json`` (atomically) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in self.state_dict().items()}
        temporary = folder / ".aggregator.safetensors.tmp"
        save_file(tensors, str(temporary))
        temporary.replace(folder / "aggregator.safetensors")
        atomic_write(folder / "aggregator.json", json.dumps({"format": FORMAT, **self.card}, indent=2) + "\n")
        return folder

    @staticmethod
    def read_card(folder: str | Path) -> dict[str, Any]:
        path = Path(folder) / "aggregator.json"
        if not path.is_file() or not (Path(folder) / "aggregator.safetensors").is_file():
            raise ValueError(f"{folder} holds no saved aggregator (aggregator.json + aggregator.safetensors); save "
                             "one with accel.train_aggregator(...).save(dir).")
        card = json.loads(path.read_text())
        if card.get("format") != FORMAT:
            raise ValueError(f"{path} is not an accel AFA aggregator card (format {card.get('format')!r}, "
                             f"expected {FORMAT!r}).")
        return card

    @classmethod
    def load(cls, folder: str | Path) -> Aggregator:
        card = cls.read_card(folder)
        kind, size = card["condition"]
        aggregator = cls(card["members"], card["points"], card.get("dims", card.get("dim")), card["hidden"],
                         card["heads"], (kind, size),
                         card={k: v for k, v in card.items() if k not in ("format", "dim")})
        aggregator.load_state_dict(load_file(str(Path(folder) / "aggregator.safetensors")))
        return aggregator.eval().requires_grad_(False)
