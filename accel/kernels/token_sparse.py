"""Token-sparse attention: each query token attends its own choice of contiguous key blocks, exactly.

``token_sparse_attention(q, k, v, chosen, block_sizes)`` computes, for every (batch, head, query token ``i``),
softmax attention over the key blocks ``j`` with ``chosen[b, h, i, j]``, where key block ``j`` is the contiguous run
of ``block_sizes[j]`` keys after the blocks before it, and optionally the natural-log LSE of each row.

VMoBA's per-token gate picks blocks per query token, which a query-block kernel can only serve as the union of a
block's tokens' picks (denser than the selection, often every block). This path works key block by key block
instead: the query rows that chose block ``j`` (in every batch x head, padded to the most any has) are gathered,
attended over that block alone by the fused attention op (torch's CPU flash kernel, which also gives the LSE), and
merged into running (output, LSE) accumulators, an online softmax over blocks. The cost follows the pairs
selected, plus one gather and one merge of a query row per (row, chosen block).
"""

from __future__ import annotations

import math

import torch

from .block_sparse import attention_with_lse


def _check(q, k, v, chosen, block_sizes) -> list[int]:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D], got "
                             f"{getattr(tensor, 'shape', type(tensor).__name__)}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads, "
                         "key length and (q, k) head dim.")
    sizes = [int(size) for size in (block_sizes.tolist() if isinstance(block_sizes, torch.Tensor) else block_sizes)]
    if not sizes or min(sizes) < 1 or sum(sizes) != k.shape[2]:
        raise ValueError(f"block_sizes must be positive and add up to the key length {k.shape[2]}, got {sizes}.")
    expected = (*q.shape[:3], len(sizes))
    if not isinstance(chosen, torch.Tensor) or chosen.dtype != torch.bool or tuple(chosen.shape) != expected:
        raise ValueError(f"chosen must be a bool tensor [B, H, S_q, num_blocks] = {expected}, got "
                         f"{getattr(chosen, 'dtype', None)} {tuple(getattr(chosen, 'shape', ()))}.")
    return sizes


def token_sparse_attention(q, k, v, chosen, block_sizes, scale: float | None = None, return_lse: bool = False):
    """Attention of each query row over the key blocks it chose. Returns the output [B, H, S_q, D_v] (q's dtype)
    and, if ``return_lse``, the fp32 LSE [B, H, S_q] (natural log; ``-inf`` for rows that chose nothing, whose
    output is zeros)."""
    sizes = _check(q, k, v, chosen, block_sizes)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    batch, heads, q_len, dim = q.shape
    rows_bh, v_dim = batch * heads, v.shape[-1]
    queries = q.reshape(rows_bh, q_len, dim)
    keys, values = k.reshape(rows_bh, -1, dim), v.reshape(rows_bh, -1, v_dim)
    # accumulators with one spare row (index q_len) that padded gathers write to and nothing reads
    out = torch.zeros(rows_bh, q_len + 1, v_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((rows_bh, q_len + 1), -math.inf, dtype=torch.float32, device=q.device)
    queries = torch.cat([queries, queries.new_zeros(rows_bh, 1, dim)], 1)
    # row table [BH, blocks, widest]: the rows that chose each block, in order, then the spare row
    picks = chosen.reshape(rows_bh, q_len, len(sizes)).transpose(1, 2)
    slot = torch.cumsum(picks, dim=2, dtype=torch.int64) - 1
    widest = [int(width) for width in picks.sum(2).amax(0).tolist()]
    table = torch.full((rows_bh, len(sizes), max(widest) + 1), q_len, dtype=torch.int64, device=q.device)
    rows_everywhere = torch.arange(q_len, device=q.device).expand_as(slot)
    table.scatter_(2, torch.where(picks, slot, max(widest)), rows_everywhere)  # unpicked rows: the last column
    start = 0
    for block, size in enumerate(sizes):
        stop = start + size
        if widest[block]:
            rows = table[:, block, : widest[block]]
            gathered = queries.gather(1, rows[..., None].expand(-1, -1, dim))
            block_out, block_lse = attention_with_lse(gathered[:, None], keys[:, None, start:stop],
                                                      values[:, None, start:stop], scale=scale)
            block_out, block_lse = block_out[:, 0].float(), block_lse[:, 0].float()
            before = lse.gather(1, rows)
            merged = torch.logaddexp(before, block_lse)
            keep_before = torch.exp(before - merged).nan_to_num(0.0)[..., None]  # -inf - -inf: nothing before
            index = rows[..., None].expand(-1, -1, v_dim)
            block_out.mul_(torch.exp(block_lse - merged)[..., None])
            update = out.gather(1, index).mul_(keep_before).add_(block_out)
            out.scatter_(1, index, update)
            lse.scatter_(1, rows, merged)
        start = stop
    out = out[:, :q_len].reshape(batch, heads, q_len, v_dim).to(q.dtype)
    return (out, lse[:, :q_len].reshape(batch, heads, q_len)) if return_lse else out
