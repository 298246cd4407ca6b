"""kernels: the block-sparse attention API against a dense masked reference, on both paths (the Triton kernel
under TRITON_INTERPRET=1, in a subprocess because the variable must be set before Triton is imported), and the
per-token block-choice attention against the same kind of reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accel import kernels
from accel.kernels.block_sparse import block_sparse_attention_torch

ROOT = Path(__file__).resolve().parents[1]


def dense_reference(q, k, v, index, count, block_size, scale):
    """Dense attention with every key outside a row's listed blocks masked; empty rows give zeros / -inf."""
    q_len, k_len = q.shape[2], k.shape[2]
    allowed = torch.zeros(*q.shape[:2], q_len, k_len, dtype=torch.bool)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for m in range(index.shape[2]):
                for slot in range(int(count[b, h, m])):
                    rows = slice(m * block_size, (m + 1) * block_size)
                    kb = int(index[b, h, m, slot])
                    allowed[b, h, rows, kb * block_size : (kb + 1) * block_size] = True
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0)[..., None]).masked_fill(~allowed, 0)
    return (weights @ v.double()), lse


def random_case(seed, batch=2, heads=3, q_len=70, k_len=90, dim=24, block=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # [B, S, H, D] storage viewed as [B, H, S, D], as diffusers hands it over: strided, not contiguous.
    q = torch.randn(batch, q_len, heads, dim, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(batch, k_len, heads, dim, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(batch, k_len, heads, dim, generator=g).to(dtype).transpose(1, 2)
    q_blocks, k_blocks = math.ceil(q_len / block), math.ceil(k_len / block)
    index = torch.zeros(batch, heads, q_blocks, k_blocks, dtype=torch.int32)
    count = torch.randint(0, k_blocks + 1, (batch, heads, q_blocks), generator=g, dtype=torch.int32)
    count[0, 0, 0] = 0  # an empty row
    for b in range(batch):
        for h in range(heads):
            for m in range(q_blocks):
                index[b, h, m] = torch.randperm(k_blocks, generator=g).to(torch.int32)
    return q, k, v, index, count, block


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_path_matches_the_dense_reference(seed, dtype):
    q, k, v, index, count, block = random_case(seed, dtype=dtype)
    assert not q.is_contiguous()
    out, lse = kernels.block_sparse_attention(q, k, v, index, count, block_size=block, return_lse=True)
    ref_out, ref_lse = dense_reference(q, k, v, index, count, block, 1 / math.sqrt(q.shape[-1]))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref_out, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    assert (out[0, 0, :block] == 0).all() and torch.isinf(lse[0, 0, :block]).all()  # the empty row
    assert not torch.isnan(out).any()
    without_lse = kernels.block_sparse_attention(q, k, v, index, count, block_size=block)  # the SDPA route
    torch.testing.assert_close(without_lse.double(), ref_out, atol=tolerance, rtol=tolerance)
    assert (without_lse[0, 0, :block] == 0).all() and not torch.isnan(without_lse).any()


def test_full_selection_equals_dense_sdpa_and_chunking_changes_nothing():
    q, k, v, _, _, block = random_case(3, q_len=64, k_len=64)
    blocks = 4
    index = torch.arange(blocks, dtype=torch.int32).expand(2, 3, blocks, blocks).contiguous()
    count = torch.full((2, 3, blocks), blocks, dtype=torch.int32)
    out = kernels.block_sparse_attention(q, k, v, index, count, block_size=block)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    small_chunks, _ = block_sparse_attention_torch(q, k, v, index, count, block, 1 / math.sqrt(24), chunk_elements=1)
    torch.testing.assert_close(small_chunks, out, atol=1e-6, rtol=1e-6)


def test_attention_with_lse_and_block_mass():
    q, k, v, _, _, block = random_case(4)
    out, lse = kernels.attention_with_lse(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    mass = kernels.block_mass(q, k, lse, block_size=block, chunk=32)
    assert mass.shape == (2, 3, 5, 6)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 3, 5), atol=1e-5, rtol=1e-5)
    # The mass of one (query block, key block) pair, computed by hand.
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(24), -1)
    torch.testing.assert_close(mass[1, 2, 1, 3], probs[1, 2, 16:32, 48:64].sum() / 16, atol=1e-5, rtol=1e-5)


def test_sampled_block_mass_is_the_exact_mass_of_its_rows():
    q, k, v, _, _, block = random_case(4)  # 5 query blocks of 16 (the last ragged), 6 key blocks
    text = torch.randn(2, 3, 7, 24)
    mass, text_mass = kernels.sampled_block_mass(q, k, block, rows_per_block=4, extra_keys=text, chunk=3)
    assert mass.shape == (2, 3, 5, 6) and text_mass.shape == (2, 3, 5)
    torch.testing.assert_close(mass.sum(-1) + text_mass, torch.ones(2, 3, 5), atol=1e-5, rtol=1e-5)
    probs = torch.softmax((q @ torch.cat([k, text], 2).transpose(-1, -2)) / math.sqrt(24), -1)
    rows = torch.tensor([18, 22, 26, 30])  # block 1: offsets 2, 6, 10, 14
    torch.testing.assert_close(mass[1, 2, 1, 3], probs[1, 2, rows, 48:64].sum(-1).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_mass[0, 1, 1], probs[0, 1, rows, k.shape[2]:].sum(-1).mean(), atol=1e-5,
                               rtol=1e-5)
    # Every row of every block sampled: the exact block mass (the ragged last block's rows repeat its last row).
    _, lse = kernels.attention_with_lse(q[:, :, :64], k, v)
    exact = kernels.block_mass(q[:, :, :64], k, lse, block_size=block)
    full, none = kernels.sampled_block_mass(q[:, :, :64], k, block, rows_per_block=block)
    assert none is None
    torch.testing.assert_close(full, exact, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "q": a["q"].double()}, "accepted: float16"),
    (lambda a: {**a, "q": a["q"][0]}, "4-D tensor"),
    (lambda a: {**a, "k": a["k"][:, :2]}, "must match q"),
    (lambda a: {**a, "kv_block_index": a["kv_block_index"].long()}, "int32"),
    (lambda a: {**a, "kv_block_index": a["kv_block_index"][:, :, :2]}, "num_q_blocks"),
    (lambda a: {**a, "kv_block_count": a["kv_block_count"] + 10}, "kv_block_count must be in"),
    (lambda a: {**a, "kv_block_index": a["kv_block_index"] + 6}, "key block ids in 0..5"),
    (lambda a: {**a, "block_size": 48}, "power of two"),
])
def test_bad_input_raises_before_any_kernel(change, match):
    q, k, v, index, count, block = random_case(5)
    count = torch.full_like(count, 2)
    arguments = change({"q": q, "k": k, "v": v, "kv_block_index": index, "kv_block_count": count, "block_size": block})
    with pytest.raises(ValueError, match=match):
        kernels.block_sparse_attention(**arguments)


def token_reference(q, k, v, chosen, sizes, scale):
    """Dense attention with each row allowed exactly the keys of the blocks it chose; empty rows give zeros."""
    block_of_key = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    allowed = chosen[..., block_of_key]
    scores = ((q.double() @ k.double().transpose(-1, -2)) * scale).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0)[..., None]).masked_fill(~allowed, 0)
    return weights @ v.double(), lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sizes", [[10, 7, 23, 30], [70]])
def test_token_sparse_attention_matches_the_dense_reference(sizes, dtype):
    q, k, v, *_ = random_case(3, q_len=50, k_len=70, dtype=dtype)
    chosen = torch.rand(*q.shape[:3], len(sizes), generator=torch.Generator().manual_seed(4)) < 0.4
    chosen[0, 0, 3] = False  # a row that chose nothing
    chosen[1, 2, :, 0] = True  # one (batch, head) where every row chose block 0: the widest gather
    out, lse = kernels.token_sparse_attention(q, k, v, chosen, sizes, return_lse=True)
    reference, reference_lse = token_reference(q, k, v, chosen, sizes, 1 / math.sqrt(q.shape[-1]))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse.double(), reference_lse, atol=1e-4, rtol=1e-4)
    assert (out[0, 0, 3] == 0).all() and torch.isinf(lse[0, 0, 3])
    every = torch.ones_like(chosen)
    torch.testing.assert_close(kernels.token_sparse_attention(q, k, v, every, sizes).float(),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v).float(),
                               atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "block_sizes": [30, 30]}, "add up to the key length 70"),
    (lambda a: {**a, "block_sizes": [0, 70]}, "positive"),
    (lambda a: {**a, "chosen": a["chosen"].float()}, "bool tensor"),
    (lambda a: {**a, "chosen": a["chosen"][..., :2]}, r"\[B, H, S_q, num_blocks\]"),
    (lambda a: {**a, "k": a["k"][..., :8]}, "must agree"),
    (lambda a: {**a, "q": a["q"][0]}, "4-D tensor"),
])
def test_token_sparse_attention_refuses_bad_input(change, match):
    q, k, v, *_ = random_case(5, q_len=50, k_len=70)
    arguments = change({"q": q, "k": k, "v": v, "chosen": torch.ones(*q.shape[:3], 3, dtype=torch.bool),
                        "block_sizes": [10, 30, 30]})
    with pytest.raises(ValueError, match=match):
        kernels.token_sparse_attention(**arguments)


TRITON_SCRIPT = """
import math, sys, torch
sys.path[:0] = [{tests!r}, {root!r}]
from test_kernels import dense_reference, random_case
from accel.kernels.triton_backend import block_sparse_attention_triton
for dtype, tolerance in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
    for seed in (0, 1):
        q, k, v, index, count, block = random_case(seed, heads=2, q_len=40, k_len=50, dim=24, dtype=dtype)
        out, lse = block_sparse_attention_triton(q, k, v, index, count, block, 1 / math.sqrt(24))
        ref_out, ref_lse = dense_reference(q, k, v, index, count, block, 1 / math.sqrt(24))
        torch.testing.assert_close(out.double(), ref_out, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-3)
        assert (out[0, 0, :block] == 0).all() and torch.isinf(lse[0, 0, :block]).all()
print("triton ok")
"""


def test_triton_kernel_under_the_interpreter():
    script = TRITON_SCRIPT.format(tests=str(ROOT / "tests"), root=str(ROOT))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "triton ok" in result.stdout, result.stderr[-3000:]
