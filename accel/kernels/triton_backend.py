"""The Triton block-sparse flash-attention forward behind ``accel.kernels.block_sparse_attention`` (CUDA, or the CPU
interpreter with ``TRITON_INTERPRET=1`` set before Triton is imported). Inputs are checked by the caller."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _block_sparse_forward(
    Q, K, V, OUT, LSE, INDEX, COUNT,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_ib, stride_ih, stride_im, stride_in,
    stride_cb, stride_ch, stride_cm,
    heads, q_len, k_len, scale,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    query_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)
    rows = query_block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    row_ok = rows < q_len

    q_ptr = Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs + dims[None, :] * stride_qd
    q = tl.load(q_ptr, mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)

    best = tl.full([BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
    count = tl.load(COUNT + batch * stride_cb + head * stride_ch + query_block * stride_cm)
    index_base = INDEX + batch * stride_ib + head * stride_ih + query_block * stride_im
    for slot in range(0, count):
        key_block = tl.load(index_base + slot * stride_in).to(tl.int64)
        keys = key_block * BLOCK + cols
        key_ok = keys < k_len
        k_ptr = K + batch * stride_kb + head * stride_kh + keys[None, :] * stride_ks + dims[:, None] * stride_kd
        k = tl.load(k_ptr, mask=key_ok[None, :] & (dims[:, None] < HEAD_DIM), other=0.0)
        scores = tl.dot(q, k, input_precision=PRECISION, out_dtype=tl.float32) * scale
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        correction = tl.exp(best - new_best)
        p = tl.exp(scores - new_best[:, None])
        total = total * correction + tl.sum(p, 1)
        v_ptr = V + batch * stride_vb + head * stride_vh + keys[:, None] * stride_vs + vdims[None, :] * stride_vd
        v = tl.load(v_ptr, mask=key_ok[:, None] & (vdims[None, :] < V_DIM), other=0.0)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=tl.float32)
        best = new_best

    empty = total == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, total)[:, None])
    lse = tl.where(empty, float("-inf"), best + tl.log(tl.where(empty, 1.0, total)))
    o_ptr = OUT + batch * stride_ob + head * stride_oh + rows[:, None] * stride_os + vdims[None, :] * stride_od
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (vdims[None, :] < V_DIM))
    tl.store(LSE + batch * stride_lb + head * stride_lh + rows * stride_ls, lse, mask=row_ok)


def block_sparse_attention_triton(q, k, v, kv_block_index, kv_block_count, block_size: int, scale: float,
                                  num_warps: int = 4, num_stages: int = 2):
    batch, heads, q_len, dim = q.shape
    k_len, v_dim = k.shape[2], v.shape[3]
    out = torch.empty(batch, heads, q_len, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    grid = (math.ceil(q_len / block_size), batch * heads)
    _block_sparse_forward[grid](
        q, k, v, out, lse, kv_block_index, kv_block_count,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *kv_block_index.stride(), *kv_block_count.stride(),
        heads, q_len, k_len, scale,
        HEAD_DIM=dim, V_DIM=v_dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(v_dim)), BLOCK=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact; fp16/bf16 ignore it
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
