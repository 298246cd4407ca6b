"""Block selections for block-sparse attention, and how much attention mass they keep.

A *selection* is ``(kv_block_index [B, H, Qb, N] int32, kv_block_count [B, H, Qb] int32)``: for each query block,
the key blocks it attends to (ascending, the first ``count`` entries used), as ``block_sparse_attention`` takes it.
"""

from __future__ import annotations

import math

import torch


def selected_key_tokens(kv_block_index, kv_block_count, image_tokens: int, block_size: int) -> torch.Tensor:
    """Keys each query block attends to under a selection (the ragged last block counted exactly) -> [B, H, Qb]."""
    key_blocks = math.ceil(image_tokens / block_size)
    sizes = torch.full((key_blocks,), block_size, dtype=torch.long, device=kv_block_index.device)
    sizes[-1] = image_tokens - block_size * (key_blocks - 1)
    used = torch.arange(kv_block_index.shape[-1], device=kv_block_index.device) < kv_block_count[..., None].long()
    return (sizes[kv_block_index.long().clamp(0, key_blocks - 1)] * used).sum(-1)


def selection_from_mask(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean [B, H, Qb, Kb] block mask -> (kv_block_index, kv_block_count), indices ascending."""
    count = selected.sum(-1)
    width = max(1, int(count.max())) if count.numel() else 1
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)[..., :width]
    return order.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()


def top_k_selection(scores: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``scores`` [B, H, Qb, Kb], the ``keep[h]`` highest-scoring key blocks (row-wise, so every row
    keeps the same number) -> (kv_block_index sorted ascending, kv_block_count)."""
    key_blocks = scores.shape[-1]
    keep = keep.clamp(1, key_blocks).to(scores.device)
    width = int(keep.max())
    index = torch.topk(scores, width, dim=-1).indices  # [B, H, Qb, width], best first
    slots = torch.arange(width, device=scores.device)
    in_use = slots.view(1, 1, 1, -1) < keep.view(1, -1, 1, 1)
    index = torch.where(in_use, index, torch.full_like(index, key_blocks))  # unused slots sort last
    index = torch.sort(index, dim=-1).values.clamp_max(key_blocks - 1)
    count = keep.view(1, -1, 1).expand(*scores.shape[:3])
    return index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()


def recall(mass: torch.Tensor, selected: torch.Tensor, text_mass: torch.Tensor | None = None) -> torch.Tensor:
    """Attention mass kept per head: mean over batch and query blocks of the selected blocks' mass (plus the text
    tokens' mass, which is always kept). mass, selected: [B, H, Qb, Kb] -> [H]."""
    kept = (mass * selected).sum(-1)
    if text_mass is not None:
        kept = kept + text_mass
    return kept.mean(dim=(0, 2))


def mask_from_selection(kv_block_index, kv_block_count, key_blocks: int) -> torch.Tensor:
    used = torch.arange(kv_block_index.shape[-1], device=kv_block_index.device) < kv_block_count[..., None].long()
    mask = torch.zeros(*kv_block_index.shape[:3], key_blocks + 1, dtype=torch.bool, device=kv_block_index.device)
    mask.scatter_(-1, torch.where(used, kv_block_index.long(), key_blocks), True)
    return mask[..., :key_blocks]
