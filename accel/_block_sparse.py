"""What the two block-sparse attention accelerators (``adaspa``, ``vmoba``) share: where the image and text tokens
of an intercepted attention call sit, running a block selection through ``accel.kernels.block_sparse_attention`` with
text tokens kept, and the bookkeeping of density and recall.

Conventions: a *selection* is ``(kv_block_index [B, H, Qb, N] int32, kv_block_count [B, H, Qb] int32)`` over the
image tokens only, in the kernel's blocks of ``block_size`` tokens, optionally after a permutation ``order`` of
the image tokens (VMoBA gathers its partition blocks into contiguous runs). Text tokens of joint attention are
always kept, in both directions: text queries attend every token, image queries attend every text token besides
their selected image blocks; the two parts of an image row are merged exactly through their log-sum-exps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from accel.kernels import attention_with_lse, block_sparse_attention

from .attention import AttentionCall


@dataclass(frozen=True)
class TokenSplit:
    """Where the image tokens of one attention call sit, and the text tokens (joint attention) if any."""

    image: slice
    text: slice | None
    frames: int
    height: int
    width: int

    @property
    def image_tokens(self) -> int:
        return self.image.stop - self.image.start


class CallReport:
    """Per-layer figures of one pipeline call (``report``), published to ``accel.summary(pipe).extras[method]`` when
    the call ends: accel resets states on entry to a call and in its ``finally``, so the reset that ends a call
    publishes what it collected, and the one that starts the next call clears the previous report."""

    def __init__(self, published: dict) -> None:
        self.published = published  # the scope's extras
        self.report: dict = {}

    def reset(self) -> None:
        self.published.clear()
        self.published.update(self.report)
        self.report = {}


def token_split(call: AttentionCall) -> TokenSplit | None:
    """The token split of ``call``, or ``None`` for a call that must stay dense: an attention mask, causal or
    dropout attention, or a sequence that does not match the forward's token layout (the caller then computes the
    call unchanged and reports it as dense)."""
    if call.step is None or call.attn_mask is not None or call.is_causal or call.dropout_p or call.enable_gqa:
        return None
    length = call.query.shape[2]
    if call.key.shape[2] != length:
        return None
    layout = call.step.layout
    dims = (layout.frames, layout.height, layout.width)
    if call.kind == "self_attn" and length == layout.image_tokens:
        return TokenSplit(slice(0, length), None, *dims)
    if call.kind == "joint_attn" and layout.text_position is not None and length == layout.joint_tokens:
        image = layout.image_slice()
        text = slice(0, image.start) if layout.text_position == "first" else slice(image.stop, length)
        return TokenSplit(image, text, *dims)
    return None


def selected_key_tokens(kv_block_index, kv_block_count, image_tokens: int, block_size: int) -> torch.Tensor:
    """Keys each query block attends to under a selection (the ragged last block counted exactly) -> [B, H, Qb]."""
    key_blocks = math.ceil(image_tokens / block_size)
    sizes = torch.full((key_blocks,), block_size, dtype=torch.long, device=kv_block_index.device)
    sizes[-1] = image_tokens - block_size * (key_blocks - 1)
    used = torch.arange(kv_block_index.shape[-1], device=kv_block_index.device) < kv_block_count[..., None].long()
    return (sizes[kv_block_index.long().clamp(0, key_blocks - 1)] * used).sum(-1)


def selection_density(split: TokenSplit, kv_block_index, kv_block_count, block_size: int, total: int) -> float:
    """Share of the full (total x total) attention matrix a selection computes, text rows and columns included."""
    n = split.image_tokens
    keys = selected_key_tokens(kv_block_index, kv_block_count, n, block_size).double()  # [B, H, Qb]
    rows = torch.full((keys.shape[-1],), block_size, dtype=torch.float64, device=keys.device)
    rows[-1] = n - block_size * (keys.shape[-1] - 1)
    image_pairs = (keys * rows).sum(-1).mean()  # per (batch, head)
    text = total - n
    return float((image_pairs + n * text + text * total) / (total * total))


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


def image_parts(call: AttentionCall, split: TokenSplit, order: torch.Tensor | None = None):
    """(q, k, v) of the image tokens, in ``order`` if given."""
    parts = [tensor[:, :, split.image] for tensor in (call.query, call.key, call.value)]
    if order is not None:
        parts = [tensor.index_select(2, order) for tensor in parts]
    return parts


def dense_with_lse(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """The call's dense output and the natural-log LSE of every row (for searches)."""
    return attention_with_lse(call.query, call.key, call.value, scale=call.scale)


def sparse_attention(call: AttentionCall, split: TokenSplit, kv_block_index, kv_block_count, block_size: int,
                     order: torch.Tensor | None = None) -> torch.Tensor:
    """The call's attention with image queries restricted to their selected image key blocks (text kept)."""
    q_image, k_image, v_image = image_parts(call, split, order)
    scale = call.scale if call.scale is not None else 1.0 / math.sqrt(call.query.shape[-1])
    if split.text is None:
        image_out = block_sparse_attention(q_image, k_image, v_image, kv_block_index, kv_block_count,
                                           block_size=block_size, scale=scale)
    else:
        sparse_out, sparse_lse = block_sparse_attention(q_image, k_image, v_image, kv_block_index, kv_block_count,
                                                        block_size=block_size, scale=scale, return_lse=True)
        k_text, v_text = call.key[:, :, split.text], call.value[:, :, split.text]
        text_out, text_lse = attention_with_lse(q_image, k_text, v_text, scale=scale)
        total = torch.logaddexp(sparse_lse, text_lse)
        image_out = (sparse_out.float() * torch.exp(sparse_lse - total)[..., None]
                     + text_out.float() * torch.exp(text_lse - total)[..., None]).to(call.query.dtype)
    if order is not None:
        image_out = image_out.index_select(2, torch.argsort(order))
    if split.text is None:
        return image_out
    text_rows = F.scaled_dot_product_attention(call.query[:, :, split.text], call.key, call.value, scale=call.scale)
    pieces = [text_rows, image_out] if split.text.start == 0 else [image_out, text_rows]
    return torch.cat(pieces, dim=2)
