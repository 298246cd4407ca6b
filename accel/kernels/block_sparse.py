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

PyTorch path: exact; the selected key/value blocks of a chunk of query blocks (taken in order of their block
counts) are gathered into one padded batch and attended by torch's fused CPU flash kernel (which also gives the
LSE), padding masked through an extra head column rather than an attention mask, so the cost follows the density,
not the sequence length squared.
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
        from .triton_backend import block_sparse_attention_triton

        out, lse = block_sparse_attention_triton(q, k, v, kv_block_index, kv_block_count, block_size, scale)
    else:
        out, lse = block_sparse_attention_torch(q, k, v, kv_block_index, kv_block_count, block_size, scale,
                                                with_lse=return_lse)
    return (out, lse) if return_lse else out


# Selection density above which block_sparse_attention is slower than dense SDPA, per device type, from the op
# benchmark at 16K tokens (docs/benchmarks/sparse_attention_cpu.md: 1.43x at 0.25, 0.62x at 0.5 on 2 CPU threads;
# sparse_attention_gpu.md: 1.9x at 0.5 on an H200, time about proportional to density).
DENSE_BREAK_EVEN = {"cpu": 0.33, "cuda": 0.9}


def dense_break_even(device: torch.device | str) -> float:
    """The density at or above which a selection is better run dense on ``device`` (1.0 where unmeasured)."""
    return DENSE_BREAK_EVEN.get(torch.device(device).type, 1.0)


_MASKED_KEY_BIAS = -1e9  # scale * this underflows exp() to exactly 0 in fp32


def _fused_cpu_attention():
    """torch's fused CPU flash-attention op that also returns the LSE, if this build has it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def block_sparse_attention_torch(q, k, v, kv_block_index, kv_block_count, block_size: int, scale: float,
                                 chunk_elements: int = 2**21, with_lse: bool = True, width_multiple: int = 8):
    """The PyTorch path: exact, with the selected key/value blocks gathered per chunk of query blocks into one
    padded batch and attended by torch's fused (flash) CPU kernel, which also returns the LSE.

    No attention mask is needed, so the fused kernel always applies: q, k, v get one extra column; a query's is 1,
    a real key's is 0 and that of a padded key (the ragged last block, or the all-padding null block that unused
    slots point to) is -1e9, so its score underflows to exactly zero weight. Values of padded keys are 0. Without the
    fused op (or off the CPU) the same tensors go through SDPA, and the LSE, if asked for, through an unfused pass.
    """
    batch, heads, q_len, dim = q.shape
    k_len, v_dim = k.shape[2], v.shape[3]
    rows_bh = batch * heads
    q_blocks, k_blocks = math.ceil(q_len / block_size), math.ceil(k_len / block_size)
    # the fused kernel wants one head size for q, k and v; a multiple of 8 keeps its inner loops vectorised
    width = -(-(max(dim, v_dim) + 1) // width_multiple) * width_multiple
    compute = torch.float32
    qa = torch.zeros(rows_bh, q_blocks * block_size, width, dtype=compute, device=q.device)
    qa[:, :q_len, :dim] = q.reshape(rows_bh, q_len, dim)
    qa[:, :, -1] = 1.0
    ka = torch.zeros(rows_bh, (k_blocks + 1) * block_size, width, dtype=compute, device=q.device)
    ka[:, :k_len, :dim] = k.reshape(rows_bh, k_len, dim)
    ka[:, k_len:, -1] = _MASKED_KEY_BIAS  # ragged padding and the null block k_blocks
    va = torch.zeros(rows_bh, (k_blocks + 1) * block_size, width, dtype=compute, device=q.device)
    va[:, :k_len, :v_dim] = v.reshape(rows_bh, k_len, v_dim)
    ka, va = ka.view(rows_bh, k_blocks + 1, block_size, width), va.view(rows_bh, k_blocks + 1, block_size, width)

    count = kv_block_count.reshape(rows_bh, q_blocks).long()
    max_blocks = max(1, int(count.max())) if count.numel() else 1
    index = kv_block_index.reshape(rows_bh, q_blocks, -1)[..., :max_blocks].long()
    if index.shape[-1] < max_blocks:
        index = torch.nn.functional.pad(index, (0, max_blocks - index.shape[-1]))
    used = torch.arange(max_blocks, device=q.device) < count[..., None]
    index = torch.where(used, index.clamp(0, k_blocks - 1), k_blocks)  # unused slots -> the null block

    rows = rows_bh * q_blocks
    flat_q = qa.view(rows, block_size, width)
    flat_index = index.reshape(rows, max_blocks)
    head_of_row = torch.arange(rows_bh, device=q.device).repeat_interleave(q_blocks)
    out = torch.empty(rows, block_size, width, dtype=compute, device=q.device)
    lse = torch.empty(rows, block_size, dtype=torch.float32, device=q.device)
    fused = _fused_cpu_attention() if q.device.type == "cpu" else None
    # Rows in order of their block count, chunked, each chunk padded to its own largest count: rows that keep few
    # blocks (VMoBA's vary per query block) cost their own count, not the busiest row's.
    row_counts = count.reshape(rows)
    by_count = torch.argsort(row_counts, stable=True)
    sorted_counts = row_counts[by_count].clamp_min(1).tolist()
    budget = max(1, chunk_elements // (2 * block_size * width))  # gathered key blocks per chunk
    start = 0
    while start < rows:
        widest = sorted_counts[min(rows, start + max(1, budget // sorted_counts[start])) - 1]
        stop = min(rows, start + max(1, budget // widest))
        slots = sorted_counts[stop - 1]
        chunk_rows = by_count[start:stop]
        blocks = flat_index[chunk_rows, :slots]
        heads_here = head_of_row[chunk_rows, None].expand_as(blocks)
        keys = ka[heads_here, blocks].reshape(stop - start, 1, slots * block_size, width)
        values = va[heads_here, blocks].reshape(stop - start, 1, slots * block_size, width)
        queries = flat_q[chunk_rows, None]
        if fused is not None:
            chunk_out, chunk_lse = fused(queries, keys, values, 0.0, False, scale=scale)
            lse[chunk_rows] = chunk_lse[:, 0]
        else:
            chunk_out = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, scale=scale)
            if with_lse:
                scores = torch.matmul(queries, keys.transpose(-1, -2)) * scale
                lse[chunk_rows] = torch.logsumexp(scores, dim=-1)[:, 0]
        out[chunk_rows] = chunk_out[:, 0]
        start = stop
    empty = (count == 0).reshape(rows, 1)
    out = out[..., :v_dim].masked_fill(empty[..., None], 0)
    out = out.reshape(batch, heads, q_blocks * block_size, v_dim)[:, :, :q_len].to(q.dtype)
    if not with_lse:
        return out, None
    lse = lse.masked_fill(empty, -math.inf)
    return out, lse.reshape(batch, heads, q_blocks * block_size)[:, :, :q_len]


def attention_with_lse(q, k, v, scale: float | None = None, chunk: int = 1024):
    """Dense attention and its fp32 LSE [B, H, S] (the first search step of AdaSpa needs both). On the CPU this is
    torch's fused flash kernel, which returns the LSE; elsewhere it runs over chunks of ``chunk`` query rows so memory
    stays O(chunk x S)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    fused = _fused_cpu_attention() if q.device.type == "cpu" else None
    if fused is not None and q.shape[-1] == v.shape[-1]:
        out, lse = fused(q.float(), k.float(), v.float(), 0.0, False, scale=scale)
        return out.to(q.dtype), lse
    outputs, lses = [], []
    for start in range(0, q.shape[2], chunk):
        scores = torch.matmul(q[:, :, start : start + chunk].float(), k.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outputs.append(torch.matmul(torch.exp(scores - lse[..., None]), v.float()))
        lses.append(lse)
    return torch.cat(outputs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def block_mass(q, k, lse, block_size: int = 64, scale: float | None = None, chunk: int = 1024):
    """Attention mass per (query block, key block), given each row's LSE: sum over the block's rows and columns of
    exp(q.k * scale - lse), divided by the rows in the query block -> [B, H, num_q_blocks, num_k_blocks], rows sum
    to 1 (up to the ragged last block)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    q_blocks, k_blocks = math.ceil(q_len / block_size), math.ceil(k_len / block_size)
    keys = torch.nn.functional.pad(k.float(), (0, 0, 0, k_blocks * block_size - k_len))  # zero keys ...
    key_valid = (torch.arange(k_blocks * block_size, device=q.device) < k_len).float()  # ... given no mass
    mass = torch.zeros(batch, heads, q_blocks, k_blocks, dtype=torch.float32, device=q.device)
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        probs = torch.exp(torch.matmul(q[:, :, start:stop].float(), keys.transpose(-1, -2)) * scale
                          - lse[:, :, start:stop, None]) * key_valid
        per_key_block = probs.view(batch, heads, stop - start, k_blocks, block_size).sum(-1)
        rows = torch.arange(start, stop, device=q.device) // block_size
        mass.index_add_(2, rows, per_key_block)
    rows_per_block = torch.bincount(torch.arange(q_len, device=q.device) // block_size, minlength=q_blocks)
    return mass / rows_per_block.view(1, 1, -1, 1).float()


def sampled_rows(q_len: int, block_size: int, rows_per_block: int, device=None) -> torch.Tensor:
    """``rows_per_block`` evenly spaced row indices in every query block of ``block_size`` rows (the ragged last
    block's clamped into the sequence) -> [num_q_blocks * rows_per_block], block by block."""
    q_blocks = math.ceil(q_len / block_size)
    offsets = (torch.arange(rows_per_block, device=device) * block_size + block_size // 2) // rows_per_block
    rows = torch.arange(q_blocks, device=device)[:, None] * block_size + offsets
    return rows.clamp_max(q_len - 1).flatten()


def sampled_block_mass(q, k, block_size: int, rows_per_block: int, scale: float | None = None,
                       extra_keys: torch.Tensor | None = None, chunk: int = 1024):
    """Block mass estimated from ``rows_per_block`` sampled rows of every query block, each with its exact LSE.

    The rows' scores against every key (``k`` and, if given, ``extra_keys`` such as joint attention's text tokens)
    give their exact LSE and attention probabilities in one pass; a (query block, key block)'s mass is the mean over
    its sampled rows of the probabilities summed over the key block. Costs ``rows_per_block / block_size`` of the
    score matrix and no value product. Returns (mass [B, H, num_q_blocks, num_k_blocks], extra [B, H, num_q_blocks]:
    each query block's mean mass on ``extra_keys``, or None).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    q_blocks, k_blocks = math.ceil(q_len / block_size), math.ceil(k_len / block_size)
    rows = sampled_rows(q_len, block_size, rows_per_block, q.device)
    keys = k.float()
    if extra_keys is not None:
        keys = torch.cat([keys, extra_keys.float()], dim=2)
    pad = k_blocks * block_size - k_len
    mass = torch.empty(batch, heads, rows.numel(), k_blocks, dtype=torch.float32, device=q.device)
    extra = torch.empty(batch, heads, rows.numel(), dtype=torch.float32, device=q.device)
    for start in range(0, rows.numel(), chunk):
        stop = min(rows.numel(), start + chunk)
        queries = q[:, :, rows[start:stop]].float()
        probs = torch.softmax(torch.matmul(queries, keys.transpose(-1, -2)) * scale, dim=-1)
        image = torch.nn.functional.pad(probs[..., :k_len], (0, pad))
        mass[:, :, start:stop] = image.view(batch, heads, stop - start, k_blocks, block_size).sum(-1)
        extra[:, :, start:stop] = probs[..., k_len:].sum(-1)
    mass = mass.view(batch, heads, q_blocks, rows_per_block, k_blocks).mean(3)
    extra = extra.view(batch, heads, q_blocks, rows_per_block).mean(3)
    return mass, (extra if extra_keys is not None else None)
