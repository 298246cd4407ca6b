"""Block-sparse attention with log-sum-exp: one checked API, a Triton kernel on CUDA and a PyTorch path elsewhere.

``block_sparse_attention(q, k, v, kv_block_index, kv_block_count)`` computes, for every (batch, head, query block
of ``block_size`` rows), softmax attention over the key blocks listed in ``kv_block_index[b, h, m, :count]``
only, and optionally the natural-log LSE of each row over those keys. The last query / key block may be ragged
(sequence lengths need not be multiples of the block size); a row with no key block gets zeros and LSE ``-inf``.
q, k, v are [B, H, S, D] and may be strided views (diffusers holds [B, S, H, D] and transposes): nothing is
copied on the Triton path.

Triton kernel: one program per (query block, batch x head), online softmax over the listed key blocks (flash
attention forward), fp32 accumulation, int64 pointer offsets, plain pointer arithmetic (``tl.make_block_ptr`` is
gone in Triton 3.9). Tested under ``TRITON_INTERPRET=1`` on tiny shapes (fp32 and fp16; bf16 ``tl.dot`` is wrong
in the interpreter) against a dense masked reference; measured on an H200 by ``benchmarks/sparse_attention_gpu.py``.

PyTorch path: exact; the selected key/value blocks of a chunk of query blocks are gathered into one padded batch
and attended with a masked matmul + logsumexp, so the cost follows the density, not the sequence length squared.
"""

from __future__ import annotations

import math

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q, k, v, kv_block_index, kv_block_count, block_size: int) -> tuple[int, int]:
    """Raise ``ValueError`` for anything the kernels cannot take; return (query blocks, key blocks)."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D], got "
                             f"{getattr(tensor, 'shape', type(tensor).__name__)}.")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}; accepted: float16, bfloat16, float32.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device == kv_block_index.device == kv_block_count.device):
        raise ValueError("q, k, v, kv_block_index and kv_block_count must be on one device.")
    batch, heads, q_len, dim = q.shape
    if k.shape[:2] != (batch, heads) or v.shape[:2] != (batch, heads) or k.shape[3] != dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)} in batch, heads "
                         "and (k) head dim.")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got {k.shape[2]} and {v.shape[2]}.")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}.")
    q_blocks, k_blocks = math.ceil(q_len / block_size), math.ceil(k.shape[2] / block_size)
    if kv_block_index.dtype != torch.int32 or kv_block_count.dtype != torch.int32:
        raise ValueError(f"kv_block_index and kv_block_count must be int32, got {kv_block_index.dtype} and "
                         f"{kv_block_count.dtype}.")
    if kv_block_index.ndim != 4 or tuple(kv_block_index.shape[:3]) != (batch, heads, q_blocks):
        raise ValueError(f"kv_block_index must be [B, H, num_q_blocks={q_blocks}, max_kv_blocks], got "
                         f"{tuple(kv_block_index.shape)}.")
    if tuple(kv_block_count.shape) != (batch, heads, q_blocks):
        raise ValueError(f"kv_block_count must be [B, H, num_q_blocks] = {(batch, heads, q_blocks)}, got "
                         f"{tuple(kv_block_count.shape)}.")
    max_blocks = kv_block_index.shape[3]
    if kv_block_count.numel() and (int(kv_block_count.min()) < 0 or int(kv_block_count.max()) > max_blocks):
        raise ValueError(f"kv_block_count must be in 0..{max_blocks} (max_kv_blocks).")
    if kv_block_index.numel():
        used = torch.arange(max_blocks, device=kv_block_index.device) < kv_block_count[..., None]
        selected = kv_block_index[used]
        if selected.numel() and (int(selected.min()) < 0 or int(selected.max()) >= k_blocks):
            raise ValueError(f"kv_block_index entries in use must be key block ids in 0..{k_blocks - 1}.")
    return q_blocks, k_blocks


def block_sparse_attention(q, k, v, kv_block_index, kv_block_count, block_size: int = 64, scale: float | None = None,
                           return_lse: bool = False):
    """Attention of each query block over its listed key blocks. Returns the output [B, H, S, D] (q's dtype) and,
    if ``return_lse``, the fp32 LSE [B, H, S] (natural log; ``-inf`` for rows that attend to nothing)."""
    _check(q, k, v, kv_block_index, kv_block_count, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.is_cuda:
        from ._triton import block_sparse_attention_triton

        out, lse = block_sparse_attention_triton(q, k, v, kv_block_index, kv_block_count, block_size, scale)
    else:
        out, lse = block_sparse_attention_torch(q, k, v, kv_block_index, kv_block_count, block_size, scale,
                                                with_lse=return_lse)
    return (out, lse) if return_lse else out


def block_sparse_attention_torch(q, k, v, kv_block_index, kv_block_count, block_size: int, scale: float,
                                 chunk_elements: int = 2**25, with_lse: bool = True):
    """The PyTorch path: exact, with the selected blocks gathered per chunk of query blocks. Without ``with_lse``
    the gathered blocks go through SDPA (the fused kernel), and the returned LSE is ``None``."""
    batch, heads, q_len, dim = q.shape
    k_len, v_dim = k.shape[2], v.shape[3]
    q_blocks, k_blocks = math.ceil(q_len / block_size), math.ceil(k_len / block_size)
    pad_q, pad_k = q_blocks * block_size - q_len, k_blocks * block_size - k_len
    compute = torch.float32 if q.dtype != torch.float32 else q.dtype
    qb = torch.nn.functional.pad(q.to(compute), (0, 0, 0, pad_q)).reshape(batch * heads, q_blocks, block_size, dim)
    kb = torch.nn.functional.pad(k.to(compute), (0, 0, 0, pad_k)).reshape(batch * heads, k_blocks, block_size, dim)
    vb = torch.nn.functional.pad(v.to(compute), (0, 0, 0, pad_k)).reshape(batch * heads, k_blocks, block_size, v_dim)
    key_valid = (torch.arange(k_blocks * block_size, device=q.device) < k_len).reshape(k_blocks, block_size)
    index = kv_block_index.reshape(batch * heads, q_blocks, -1).long()
    count = kv_block_count.reshape(batch * heads, q_blocks).long()
    max_blocks = max(1, int(count.max())) if count.numel() else 1
    index = index[..., :max_blocks]
    out = torch.zeros(batch * heads, q_blocks, block_size, v_dim, dtype=compute, device=q.device)
    lse = torch.full((batch * heads, q_blocks, block_size), -math.inf, dtype=torch.float32, device=q.device)
    rows = batch * heads * q_blocks
    per_row = block_size * max_blocks * block_size * 3
    step = max(1, chunk_elements // max(1, per_row))
    flat_q = qb.reshape(rows, block_size, dim)
    flat_index = index.reshape(rows, max_blocks)
    flat_count = count.reshape(rows)
    head_of_row = torch.arange(batch * heads, device=q.device).repeat_interleave(q_blocks)
    flat_out, flat_lse = out.reshape(rows, block_size, v_dim), lse.reshape(rows, block_size)
    slots = torch.arange(max_blocks, device=q.device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        blocks = flat_index[start:stop].clamp(0, k_blocks - 1)  # [R, N]; unused slots are masked below
        heads_here = head_of_row[start:stop, None].expand_as(blocks)
        keys = kb[heads_here, blocks].reshape(stop - start, max_blocks * block_size, dim)
        values = vb[heads_here, blocks].reshape(stop - start, max_blocks * block_size, v_dim)
        allowed = (slots[None] < flat_count[start:stop, None])[..., None] & key_valid[blocks]  # [R, N, block]
        if not with_lse:
            mask = allowed.reshape(stop - start, 1, 1, -1)
            attended = torch.nn.functional.scaled_dot_product_attention(
                flat_q[start:stop, None], keys[:, None], values[:, None], attn_mask=mask, scale=scale)[:, 0]
            empty = (flat_count[start:stop] == 0).view(-1, 1, 1)
            flat_out[start:stop] = attended.masked_fill(empty, 0)
            continue
        scores = torch.baddbmm(torch.zeros((), dtype=compute, device=q.device), flat_q[start:stop],
                               keys.transpose(1, 2), alpha=scale)
        scores = scores.masked_fill(~allowed.reshape(stop - start, 1, -1), -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is allowed
        weights = torch.exp(scores - row_lse.masked_fill(torch.isinf(row_lse), 0)[..., None])
        flat_out[start:stop] = torch.bmm(weights, values)
        flat_lse[start:stop] = row_lse.float()
    out = out.reshape(batch, heads, q_blocks * block_size, v_dim)[:, :, :q_len].to(q.dtype)
    lse = lse.reshape(batch, heads, q_blocks * block_size)[:, :, :q_len] if with_lse else None
    return out, lse


def attention_with_lse(q, k, v, scale: float | None = None):
    """Dense attention and its fp32 LSE [B, H, S] (the first search step of AdaSpa needs both)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
    return out.to(q.dtype), lse


def block_mass(q, k, lse, block_size: int = 64, scale: float | None = None, chunk: int = 1024):
    """Attention mass per (query block, key block), given each row's LSE: sum over the block's rows and columns of
    exp(q.k * scale - lse), divided by the rows in the query block -> [B, H, num_q_blocks, num_k_blocks], rows sum
    to 1 (up to the ragged last block)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    q_blocks, k_blocks = math.ceil(q_len / block_size), math.ceil(k_len / block_size)
    key_block = torch.arange(k_len, device=q.device) // block_size
    mass = torch.zeros(batch, heads, q_blocks, k_blocks, dtype=torch.float32, device=q.device)
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        probs = torch.exp(torch.matmul(q[:, :, start:stop].float(), k.float().transpose(-1, -2)) * scale
                          - lse[:, :, start:stop, None])
        per_key_block = torch.zeros(batch, heads, stop - start, k_blocks, device=q.device)
        per_key_block.index_add_(3, key_block, probs)
        rows = torch.arange(start, stop, device=q.device) // block_size
        mass.index_add_(2, rows, per_key_block)
    rows_per_block = torch.bincount(torch.arange(q_len, device=q.device) // block_size, minlength=q_blocks)
    return mass / rows_per_block.view(1, 1, -1, 1).float()
