"""The sparse-attention benchmark's oracle: the best recall any selection can reach at a density."""

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts, not a package

from benchmarks.sparse_attention import oracle_recall  # noqa: E402


def _random_probabilities(queries, keys, seed=0, sharpness=3.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(2, queries, keys, generator=generator) * sharpness, dim=-1)


def test_token_oracle_on_uniform_and_one_hot_rows():
    uniform = torch.full((3, 8, 8), 1 / 8)
    assert oracle_recall(uniform, 0.25) == pytest.approx(2 / 8)
    one_hot = torch.eye(8)[None]
    assert oracle_recall(one_hot, 0.125) == pytest.approx(1.0)


def test_token_oracle_is_the_best_subset_of_each_row():
    p = _random_probabilities(4, 6)
    best = sum(max(sum(row[list(keys)]).item() for keys in itertools.combinations(range(6), 2))
               for row in p.reshape(-1, 6)) / 8
    assert oracle_recall(p, 2 / 6) == pytest.approx(best, rel=1e-6)


def test_block_oracle_is_the_best_set_of_key_blocks_for_each_query_block():
    p = _random_probabilities(8, 8, seed=1)  # blocks of 2: 4 query blocks x 4 key blocks, keep 2 key blocks
    total = 0.0
    for batch, block in itertools.product(range(2), range(4)):
        rows = p[batch, 2 * block : 2 * block + 2]
        total += max(sum(rows[:, 2 * b : 2 * b + 2].sum().item() for b in blocks)
                     for blocks in itertools.combinations(range(4), 2))
    assert oracle_recall(p, 0.5, block_size=2) == pytest.approx(total / 16, rel=1e-6)
    assert oracle_recall(p, 0.5, block_size=2) <= oracle_recall(p, 0.5) + 1e-6  # coarser never beats per-token
    block_diagonal = torch.block_diag(*[torch.full((2, 2), 0.5)] * 4)[None]
    assert oracle_recall(block_diagonal, 0.25, block_size=2) == pytest.approx(1.0)


def test_block_oracle_with_a_ragged_last_block_and_bad_density():
    p = _random_probabilities(5, 5, seed=2)
    recall = oracle_recall(p, 1.0, block_size=2)  # keeping every key block keeps every row's whole mass
    assert recall == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="density"):
        oracle_recall(p, 0.0)
    with pytest.raises(ValueError, match="block_size"):
        oracle_recall(p, 0.5, block_size=0)


def test_intercept_sdpa_hands_each_call_over_and_returns_the_replacement():
    from accel.attention import intercept_sdpa

    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=generator) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    seen = []
    with intercept_sdpa(lambda call: seen.append(call) or call.dense()):
        output = torch.nn.functional.scaled_dot_product_attention(q, k, value=v, scale=None)
    assert len(seen) == 1 and seen[0].query is q and seen[0].value is v and seen[0].attn_mask is None
    torch.testing.assert_close(output, expected)
    assert torch.nn.functional.scaled_dot_product_attention(q, k, v).shape == expected.shape  # mode gone after
    assert len(seen) == 1
