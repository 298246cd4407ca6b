"""What the two block-sparse attention accelerators (``adaspa``, ``vmoba``) share, not an accelerator itself: where
the image and text tokens of an intercepted attention call sit, running a block selection through
``accel.kernels.block_sparse_attention`` with text tokens kept, the density of a selection and the per-call report.
The selection ops themselves (top-k, masks, recall) are kernels' (``accel.kernels.selection``).

Conventions: a *selection* is ``(kv_block_index [B, H, Qb, N] int32, kv_block_count [B, H, Qb] int32)`` over the
image tokens only, in the kernel's blocks of ``block_size`` tokens, optionally after a permutation ``order`` of
the image tokens (VMoBA gathers its partition blocks into contiguous runs); a *per-token choice* is a bool
``chosen [B, H, image tokens, blocks]`` over contiguous key blocks of given sizes. Text tokens of joint attention are
always kept, in both directions: text queries attend every token, image queries attend every text token besides
their selected image blocks; the two parts of an image row are merged exactly through their log-sum-exps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from accel import kernels
from accel.attention import AttentionCall
from accel.kernels import (
    attention_with_lse,
    block_mass,
    block_sparse_attention,
    mask_from_selection,
    recall,
    selected_key_tokens,
)
from accel.pipelines.adapters import ADAPTERS

# The families both methods declare: the DiT families with softmax self- or joint attention. A U-Net attends at
# several resolutions, none of which the token layout describes; a linear self-attention (Sana's) has no softmax to
# make sparse; where the pipeline masks every call, every call stays dense (token_split): nothing to save.
FAMILIES = tuple(adapter.name for adapter in ADAPTERS
                 if adapter.sequential_blocks and not adapter.attention_always_masked and any(
                     {"self_attn", "joint_attn"} & set(group.branches) for group in adapter.block_groups))


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


def masks_nothing(mask: torch.Tensor | None) -> bool:
    """Whether an SDPA ``attn_mask`` leaves every score as it is: none, all ``True``, or all zeros (additive). Some
    pipelines (HunyuanVideo) always pass a mask, which masks nothing when no text token is padding."""
    if mask is None:
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any())


def token_split(call: AttentionCall) -> TokenSplit | None:
    """The token split of ``call``, or ``None`` for a call that must stay dense: an attention mask that masks
    something, causal or dropout attention, or a sequence that does not match the forward's token layout (the
    caller then computes the call unchanged and reports it as dense)."""
    if call.step is None or not masks_nothing(call.attn_mask) or call.is_causal or call.dropout_p or call.enable_gqa:
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


def selection_density(split: TokenSplit, kv_block_index, kv_block_count, block_size: int, total: int) -> float:
    """Share of the full (total x total) attention matrix a selection computes, text rows and columns included."""
    n = split.image_tokens
    keys = selected_key_tokens(kv_block_index, kv_block_count, n, block_size).double()  # [B, H, Qb]
    rows = torch.full((keys.shape[-1],), block_size, dtype=torch.float64, device=keys.device)
    rows[-1] = n - block_size * (keys.shape[-1] - 1)
    image_pairs = (keys * rows).sum(-1).mean()  # per (batch, head)
    text = total - n
    return float((image_pairs + n * text + text * total) / (total * total))


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
    return _image_restricted(call, split, order, lambda q, k, v, scale, lse: block_sparse_attention(
        q, k, v, kv_block_index, kv_block_count, block_size=block_size, scale=scale, return_lse=lse))


def token_sparse_attention(call: AttentionCall, split: TokenSplit, chosen: torch.Tensor, block_sizes,
                           order: torch.Tensor | None = None) -> torch.Tensor:
    """The call's attention with each image query restricted to the contiguous image key blocks (of
    ``block_sizes`` tokens, after ``order``) it chose in ``chosen`` [B, H, image tokens, blocks] (text kept)."""
    return _image_restricted(call, split, order, lambda q, k, v, scale, lse: kernels.token_sparse_attention(
        q, k, v, chosen, block_sizes, scale=scale, return_lse=lse))


def _image_restricted(call: AttentionCall, split: TokenSplit, order, image_attention) -> torch.Tensor:
    """The call's attention, image rows over the image keys through ``image_attention(q, k, v, scale, lse)``
    merged with their attention over the text keys through the two LSEs; text rows dense."""
    q_image, k_image, v_image = image_parts(call, split, order)
    scale = call.scale if call.scale is not None else 1.0 / math.sqrt(call.query.shape[-1])
    if split.text is None:
        image_out = image_attention(q_image, k_image, v_image, scale, False)
    else:
        sparse_out, sparse_lse = image_attention(q_image, k_image, v_image, scale, True)
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


def token_selection_density(split: TokenSplit, chosen: torch.Tensor, block_sizes: torch.Tensor, total: int) -> float:
    """Share of the full (total x total) attention matrix a per-token choice computes, text rows and columns
    included."""
    n = split.image_tokens
    image_pairs = (chosen.double() @ block_sizes.to(chosen.device, torch.float64)).sum(-1).mean()
    text = total - n
    return float((image_pairs + n * text + text * total) / (total * total))


def measured_recall(call: AttentionCall, split: TokenSplit, kv_block_index, kv_block_count, block_size: int,
                    order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: the attention mass a selection keeps, and the most any selection with the same number of key blocks
    in each query-block row keeps (the oracle's: each row's heaviest blocks), text tokens' mass included in both.
    Costs a dense pass and a block-mass pass: for measurement only."""
    _, lse = dense_with_lse(call)
    q_image, k_image, _ = image_parts(call, split, order)
    image_lse = lse[:, :, split.image]
    if order is not None:
        image_lse = image_lse.index_select(2, order)
    mass = block_mass(q_image, k_image, image_lse, block_size, scale=call.scale)
    text_mass = (1 - mass.sum(-1)).clamp_min(0) if split.text is not None else None
    kept = recall(mass, mask_from_selection(kv_block_index, kv_block_count, mass.shape[-1]), text_mass)
    heaviest_first = torch.cumsum(torch.sort(mass, dim=-1, descending=True).values, dim=-1)
    count = kv_block_count.long()
    best = heaviest_first.gather(-1, (count - 1).clamp_min(0)[..., None])[..., 0] * (count > 0)
    if text_mass is not None:
        best = best + text_mass
    return kept, best.mean(dim=(0, 2))


def measured_token_recall(call: AttentionCall, split: TokenSplit, chosen: torch.Tensor, block_sizes: torch.Tensor,
                          order: torch.Tensor | None = None, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``measured_recall`` for a per-token choice: per head, the mean over image queries of the attention mass on
    their chosen blocks, and of the most the same number of blocks could keep (each query's heaviest blocks), text
    tokens' mass included in both. Costs a dense pass: for measurement only."""
    _, lse = dense_with_lse(call)
    q_image, k_image, _ = image_parts(call, split, order)
    image_lse = lse[:, :, split.image]
    if order is not None:
        image_lse = image_lse.index_select(2, order)
    scale = call.scale if call.scale is not None else 1.0 / math.sqrt(call.query.shape[-1])
    sizes = block_sizes.to(q_image.device)
    one_hot = F.one_hot(torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes),
                        sizes.numel()).float()  # [image keys, blocks]
    kept, best = [], []
    for start in range(0, q_image.shape[2], chunk):
        rows = slice(start, start + chunk)
        probs = torch.exp(torch.matmul(q_image[:, :, rows].float(), k_image.float().transpose(-1, -2)) * scale
                          - image_lse[:, :, rows, None])
        mass = probs @ one_hot  # [B, H, rows, blocks]
        text_mass = (1 - mass.sum(-1)).clamp_min(0) if split.text is not None else 0.0
        picks = chosen[:, :, rows]
        kept.append((mass * picks).sum(-1) + text_mass)
        heaviest_first = torch.cumsum(torch.sort(mass, dim=-1, descending=True).values, dim=-1)
        count = picks.sum(-1, keepdim=True)
        best.append(heaviest_first.gather(-1, (count - 1).clamp_min(0))[..., 0] * (count[..., 0] > 0) + text_mass)
    return torch.cat(kept, 2).mean(dim=(0, 2)), torch.cat(best, 2).mean(dim=(0, 2))
