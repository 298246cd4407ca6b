"""AdaSpa and VMoBA: the tester mixin on every DiT family, the shared sparse-attention plumbing against a dense
masked reference, each method's selection rules, its schedule, and what ``accel.summary`` reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerator_tester import AcceleratorTesterMixin

import accel
from accel import kernels
from accel.attention import AttentionCall
from accel.hooks import BranchStates
from accel.methods import sparse_tokens as sparse
from accel.methods.adaspa import AdaSpaAttention, AdaSpaConfig, blocks_kept, head_sparsities
from accel.methods.vmoba import (
    VMoBAAttention,
    VMoBAConfig,
    block_selection,
    make_partition,
    partition_means,
    token_choice,
)
from accel.pipelines import tiny
from accel.pipelines.adapters import TokenLayout
from accel.steps import StepInfo

# Sana's self-attention is linear attention (no SDPA call); every attention call of chroma's pipeline carries a float
# text mask, which keeps it dense: AdaSpa and VMoBA exclude both (accel.methods.adaspa)
FAMILIES = tuple(f for f in tiny.FAMILIES if f not in ("sd15", "sdxl", "sana", "chroma"))
# inputs with at least two 16-token key blocks per attention call, so that both methods drop some (measured: the
# attention density of each then lies between 0.83 and 0.997); DiT's size is its transformer's (SparseInputs.build)
SPARSE_SIZES: dict[str, dict] = {
    "pixart-alpha": {"size": 16}, "pixart-sigma": {"size": 16}, "sd3": {"size": 16}, "flux": {"size": 32},
    "wan": {"size": 64, "num_frames": 9}, "wan2.2": {"size": 64, "num_inference_steps": 6},
    "cogvideox": {"size": 64}, "hunyuan-video": {"size": 32}, "skyreels-v2": {"size": 64, "num_frames": 9},
    "ltx-video": {"size": 64, "num_frames": 9}, "allegro": {"size": 16}, "flux2": {"size": 32},
    "lumina2": {"size": 128}, "aura-flow": {"size": 16}, "qwen-image": {"size": 48}, "bria": {"size": 32},
    "ovis-image": {"size": 32}, "cogview3plus": {"size": 32}, "easyanimate": {"size": 32, "num_frames": 9},
}


class SparseInputs:
    """Inputs with more image tokens than one 16-token block, so the sparse methods have blocks to drop."""

    saves = "attention"

    def build(self, family):
        pipe = tiny.build(family)
        if family == "dit":  # DiTPipeline's latent size is the transformer's sample_size (8: 16 tokens)
            pipe.transformer.register_to_config(sample_size=16)
        return pipe

    def call_kwargs(self, family):
        return SPARSE_SIZES.get(family, {})


class TestAdaSpa(SparseInputs, AcceleratorTesterMixin):
    families = FAMILIES

    def make_config(self):
        return AdaSpaConfig(sparsity=0.5, block_size=16, search_rows=4)


class TestVMoBA(SparseInputs, AcceleratorTesterMixin):
    families = FAMILIES

    def make_config(self):  # dense_above=1.0: tiny selections are dense enough that the default would run dense
        return VMoBAConfig(block_size=16, measure_recall=True, dense_above=1.0)


class TestVMoBATokenExact(SparseInputs, AcceleratorTesterMixin):
    families = ("wan", "sd3", "flux")  # self-attention, joint attention with text first / last

    def make_config(self):
        return VMoBAConfig(gate="token-exact", measure_recall=True, dense_above=1.0)


# ------------------------------------------------------------------------------------------- synthetic calls
def make_call(layout: TokenLayout, kind: str, *, step: int = 5, num_steps: int = 10, batch: int = 1, heads: int = 2,
              dim: int = 16, seed: int = 0, attn_mask=None) -> AttentionCall:
    generator = torch.Generator().manual_seed(seed)
    length = layout.joint_tokens if kind == "joint_attn" else layout.image_tokens
    q, k, v = (torch.randn(batch, heads, length, dim, generator=generator) for _ in range(3))
    info = StepInfo(step=step, num_steps=num_steps, branch="cond", call_in_step=0, denoiser="transformer",
                    _layout_fn=lambda: layout)
    return AttentionCall(q, k, v, attn_mask, 0.0, False, None, False, module_name="blocks.0.attn1", kind=kind,
                         index=0, step=info)


def dense_reference(call: AttentionCall, split, index, count, block_size, order=None) -> torch.Tensor:
    """Dense SDPA with a boolean mask that allows exactly what the selection promises."""
    batch, heads, length, _ = call.query.shape
    image = torch.arange(length)[split.image]
    permuted = image[order] if order is not None else image  # token at each permuted position
    key_blocks = math.ceil(len(image) / block_size)
    allowed = torch.ones(batch, heads, length, length, dtype=torch.bool)
    allowed[:, :, image[:, None], image[None, :]] = False
    for b in range(batch):
        for h in range(heads):
            for m in range(index.shape[2]):
                rows = permuted[m * block_size : (m + 1) * block_size]
                for slot in range(int(count[b, h, m])):
                    block = int(index[b, h, m, slot])
                    assert 0 <= block < key_blocks
                    cols = permuted[block * block_size : (block + 1) * block_size]
                    allowed[b, h, rows[:, None], cols[None, :]] = True
    return F.scaled_dot_product_attention(call.query, call.key, call.value, attn_mask=allowed)


def random_selection(batch, heads, query_blocks, key_blocks, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, heads, query_blocks, key_blocks, generator=generator) < 0.4
    mask[..., 0] = True
    return kernels.selection_from_mask(mask)


VIDEO = TokenLayout(frames=3, height=4, width=6)  # 72 image tokens: 5 blocks of 16, the last ragged


@pytest.mark.parametrize("text_position", [None, "first", "last"])
def test_sparse_attention_matches_a_dense_masked_reference(text_position):
    layout = TokenLayout(3, 4, 6, text_tokens=7 if text_position else 0, text_position=text_position)
    call = make_call(layout, "joint_attn" if text_position else "self_attn", batch=2)
    split = sparse.token_split(call)
    assert (split.text is not None) == bool(text_position)
    index, count = random_selection(2, 2, 5, 5)
    expected = dense_reference(call, split, index, count, 16)
    actual = sparse.sparse_attention(call, split, index, count, 16)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    order = torch.randperm(72, generator=torch.Generator().manual_seed(3))
    expected = dense_reference(call, split, index, count, 16, order)
    torch.testing.assert_close(sparse.sparse_attention(call, split, index, count, 16, order=order), expected,
                               atol=1e-5, rtol=1e-5)


def test_selection_density_counts_text_and_ragged_blocks():
    layout = TokenLayout(3, 4, 6, text_tokens=8, text_position="first")
    call = make_call(layout, "joint_attn")
    split = sparse.token_split(call)
    index, count = kernels.selection_from_mask(torch.ones(1, 2, 5, 5, dtype=torch.bool))
    assert sparse.selection_density(split, index, count, 16, 80) == pytest.approx(1.0)
    only_first = torch.zeros(1, 2, 5, 5, dtype=torch.bool)
    only_first[..., 0] = True
    index, count = kernels.selection_from_mask(only_first)
    expected = (72 * 16 + 72 * 8 + 8 * 80) / 80**2
    assert sparse.selection_density(split, index, count, 16, 80) == pytest.approx(expected)


def test_calls_that_cannot_be_sparsified_stay_dense():
    masked = torch.ones(72, 72, dtype=torch.bool)
    masked[:, -1] = False  # a padded token: the mask changes the result
    assert sparse.token_split(make_call(VIDEO, "self_attn", attn_mask=masked)) is None
    assert sparse.token_split(make_call(VIDEO, "self_attn", attn_mask=torch.full((72, 72), -1.0))) is None
    assert sparse.token_split(make_call(VIDEO, "cross_attn")) is None
    wrong = make_call(TokenLayout(2, 4, 6), "self_attn")
    wrong.step = make_call(VIDEO, "self_attn").step  # the layout says 72 tokens, the call has 48
    assert sparse.token_split(wrong) is None


# ------------------------------------------------------------------------------------------- AdaSpa
def test_head_adaptive_sparsity_follows_the_paper_rule():
    recalls = torch.tensor([0.95, 0.5, 0.9, 0.3])
    result = head_sparsities(recalls, 0.6)  # n = 2: heads 0, 2 drop (1 + s)/2, heads 1, 3 drop (3s - 1)/2
    torch.testing.assert_close(result, torch.tensor([0.8, 0.4, 0.8, 0.4], dtype=torch.float64))
    assert float(result.mean()) == pytest.approx(0.6)
    capped = head_sparsities(torch.tensor([0.9, 0.95, 0.99, 0.85]), 0.5)  # n capped at half the heads
    assert sorted(capped.tolist()) == pytest.approx([0.25, 0.25, 0.75, 0.75])
    assert head_sparsities(recalls, 0.2).tolist() == [0.2] * 4  # below 1/3: no adaptation
    assert blocks_kept(torch.tensor([0.0, 0.7, 1.0]), 10).tolist() == [10, 3, 1]


def test_top_k_selection_keeps_the_heaviest_blocks_of_every_row():
    mass = torch.rand(1, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    index, count = kernels.top_k_selection(mass, torch.tensor([2, 4]))
    assert count[0, 0].tolist() == [2] * 4 and count[0, 1].tolist() == [4] * 4
    for h, keep in ((0, 2), (1, 4)):
        for row in range(4):
            chosen = sorted(index[0, h, row, :keep].tolist())
            assert chosen == sorted(torch.topk(mass[0, h, row], keep).indices.tolist())
            assert index[0, h, row, :keep].tolist() == chosen  # ascending


class _Recorder:
    """A stand-in scope for driving a replacement directly."""

    def __init__(self):
        self.densities = []

    def record_attention_density(self, density):
        self.densities.append(density)


def test_adaspa_schedule_dense_search_sparse_research():
    config = AdaSpaConfig(sparsity=0.6, warmup=0.2, research=(0.6,), block_size=16, search_rows=None)  # the paper's
    state, searches = sparse.CallReport({}), BranchStates(dict)
    scope = _Recorder()
    attention = AdaSpaAttention(scope, state, searches, config, "transformer", "blocks.0.attn1")
    outputs = []
    for step in range(10):
        call = make_call(VIDEO, "self_attn", step=step, num_steps=10, seed=step)
        outputs.append((call, attention(call)))
    assert scope.densities[:3] == [1.0, 1.0, 1.0]  # two warm-up steps, then the (dense) search step
    assert all(d < 1.0 for d in scope.densities[3:])
    entries = state.report["layers"]["blocks.0.attn1"]
    assert [(e["step"], e["exact"]) for e in entries] == [(2, True), (6, False)]
    for entry in entries:
        assert all(0.0 <= r <= 1.0 + 1e-6 for r in entry["recall_per_head"])
        assert np.mean(entry["density_per_head"]) == pytest.approx(0.4, abs=0.11)
    for call, output in outputs[:3]:
        torch.testing.assert_close(output, call.dense(), atol=1e-5, rtol=1e-5)
    call, output = outputs[4]  # a sparse step: exactly the block-sparse attention of the stored selection
    searched = searches.get(call.step)["blocks.0.attn1"]  # the state of the call's denoiser and CFG branch
    assert searched.step == 6
    assert not torch.allclose(output, call.dense(), atol=1e-3)


def test_adaspa_sampled_search_runs_sparse_and_measures_against_the_oracle():
    config = AdaSpaConfig(sparsity=0.6, warmup=0.2, research=(0.6,), block_size=16, search_rows=4, measure_recall=True)
    state, searches = sparse.CallReport({}), BranchStates(dict)
    scope = _Recorder()
    attention = AdaSpaAttention(scope, state, searches, config, "transformer", "blocks.0.attn1")
    outputs = []
    for step in range(10):
        call = make_call(VIDEO, "self_attn", step=step, num_steps=10, seed=step)
        outputs.append((call, attention(call)))
    assert scope.densities[:2] == [1.0, 1.0] and all(d < 1.0 for d in scope.densities[2:])  # the search step too
    assert scope.densities[2] > scope.densities[3]  # it pays for the sampled rows' scores
    entries = state.report["layers"]["blocks.0.attn1"]
    assert [(e["step"], e["exact"]) for e in entries] == [(2, False), (6, False)]
    assert "changed" not in entries[0] and 0.0 <= entries[1]["changed"] <= 1.0
    searched = searches.get(outputs[2][0].step)["blocks.0.attn1"]
    assert searched.lse is None and searched.step == 6
    call, output = outputs[7]  # after the re-search: the block-sparse attention of the stored selection
    split = sparse.token_split(call)
    expected = sparse.sparse_attention(call, split, searched.index, searched.count, 16)
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-6)
    measured = state.report["recall"]["blocks.0.attn1"]
    assert [e["step"] for e in measured] == list(range(2, 10))
    assert [e["searched"] for e in measured] == [s in (2, 6) for s in range(2, 10)]
    for entry in measured:
        for kept, best in zip(entry["recall_per_head"], entry["oracle_recall_per_head"]):
            assert 0.0 < kept <= best + 1e-4 <= 1.0 + 2e-4  # no selection of that size keeps more than the oracle


def test_measured_recall_of_the_oracle_selection_is_the_oracle():
    call = make_call(TokenLayout(3, 4, 6, text_tokens=5, text_position="last"), "joint_attn")
    split = sparse.token_split(call)
    _, lse = sparse.dense_with_lse(call)
    q_image, k_image, _ = sparse.image_parts(call, split)
    from accel.kernels import block_mass

    mass = block_mass(q_image, k_image, lse[:, :, split.image], 16)
    index, count = kernels.top_k_selection(mass, torch.tensor([2, 3]))
    kept, oracle = sparse.measured_recall(call, split, index, count, 16)
    torch.testing.assert_close(kept, oracle, atol=1e-5, rtol=0)
    worst, _ = kernels.top_k_selection(-mass, torch.tensor([2, 3]))
    kept_worst, oracle_again = sparse.measured_recall(call, split, worst, count, 16)
    assert (kept_worst < oracle_again - 1e-3).all()
    torch.testing.assert_close(oracle_again, oracle)


@pytest.mark.parametrize("rows", [0, 65, 2.5])
def test_adaspa_refuses_search_rows_outside_one_block(rows):
    with pytest.raises(ValueError, match="search_rows"):
        AdaSpaConfig(search_rows=rows)


def test_adaspa_at_zero_sparsity_equals_dense():
    config = AdaSpaConfig(sparsity=0.0, block_size=16)
    state = sparse.CallReport({})
    attention = AdaSpaAttention(_Recorder(), state, BranchStates(dict), config, "transformer", "blocks.0.attn1")
    for step in range(5):
        call = make_call(TokenLayout(3, 4, 6, text_tokens=5, text_position="last"), "joint_attn", step=step,
                         num_steps=5, seed=step)
        torch.testing.assert_close(attention(call), call.dense(), atol=1e-5, rtol=1e-5)
    first = state.report["layers"]["blocks.0.attn1"][0]
    assert first["recall_per_head"] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_recall_is_the_exact_mass_kept():
    from accel.kernels import block_mass

    call = make_call(VIDEO, "self_attn")
    _, lse = sparse.dense_with_lse(call)
    mass = block_mass(call.query, call.key, lse, 16)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 2, 5), atol=1e-5, rtol=0)
    index, count = kernels.top_k_selection(mass, torch.tensor([2, 2]))
    selected = kernels.mask_from_selection(index, count, 5)  # [1, 2, 5, 5]
    probabilities = torch.softmax(call.query @ call.key.transpose(-1, -2) / 4, dim=-1)[0]  # [2, 72, 72]
    block = torch.arange(72) // 16
    allowed = selected[0][:, block][:, :, block]  # [2, 72, 72]: row token's block selects key token's block
    kept_per_row = (probabilities * allowed).sum(-1)  # [2, 72]
    per_block = torch.zeros(2, 5).index_add_(1, block, kept_per_row) / torch.bincount(block).float()
    torch.testing.assert_close(kernels.recall(mass, selected), per_block.mean(-1), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- VMoBA
def test_partitions_cover_every_token_once_and_pick_the_kernel_block():
    temporal = make_partition("temporal", 9, 8, 8, (8, 1, 1), 64)
    assert sorted(temporal.order.tolist()) == list(range(576))
    assert temporal.sizes.tolist() == [128] + [64] * 7 and temporal.kernel_block == 64
    spatial = make_partition("spatial", 9, 8, 8, (1, 4, 4), 64)
    assert spatial.sizes.tolist() == [36] * 16 and spatial.kernel_block == 16  # 36 is no multiple of 16: superset
    tokens = spatial.order.view(16, 36)
    rows, cols = (tokens % 64) // 8, tokens % 8
    assert ((rows // 2).unique(dim=1).shape[1], (cols // 2).unique(dim=1).shape[1]) == (1, 1)  # one 2x2 tile each
    assert VMoBAConfig().splits("temporal", 1, 8, 8) == (1, 8, 1)  # images: runs of rows
    assert VMoBAConfig(cube_blocks=(4, 16, 16)).splits("spatiotemporal", 2, 4, 4) == (2, 4, 4)  # capped


def threshold_reference(normalised: torch.Tensor, threshold: float) -> set[tuple[int, int]]:
    """VMoBA's global selection by hand: (query, key block) pairs from the highest score down until they reach
    ``threshold`` of the total."""
    values = sorted(((float(normalised[q, j]), q, j) for q in range(normalised.shape[0])
                     for j in range(normalised.shape[1])), reverse=True)
    total, running, chosen = float(normalised.sum()), 0.0, set()
    for value, q, j in values:
        if running >= threshold * total:
            break
        chosen.add((q, j))
        running += value
    return chosen


def test_vmoba_token_gate_matches_a_token_by_token_reference():
    partition = make_partition("temporal", 4, 4, 4, (4, 1, 1), 16)  # 4 blocks of 16 tokens
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 64, 8, generator=generator), torch.randn(1, 2, 64, 8, generator=generator)
    threshold = 0.3
    chosen = token_choice(q, k, partition, threshold)
    for h in range(2):
        means = torch.stack([k[0, h, j * 16 : (j + 1) * 16].mean(0) for j in range(4)])
        scores = q[0, h] @ means.T
        normalised = (scores - scores.min()) / (scores.max() - scores.min())
        pairs = threshold_reference(normalised, threshold) | {(t, t // 16) for t in range(64)}  # own block
        expected = torch.zeros(64, 4, dtype=torch.bool)
        for t, j in pairs:
            expected[t, j] = True
        assert torch.equal(chosen[0, h], expected)
    assert not chosen.all() and chosen.any(-1).all()


@pytest.mark.parametrize("threshold", [0.05, 0.25, 0.6, 0.95])
def test_vmoba_gate_without_a_full_sort_keeps_what_the_sorted_rule_keeps(threshold):
    """The histogram search for the crossing value against the rule as written: every (token, block) pair sorted,
    kept while the running sum (float64 here) is below the threshold's share of the total."""
    partition = make_partition("spatial", 4, 16, 16, (1, 4, 4), 64)  # 1024 tokens x 16 blocks per head
    generator = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 1024, 8, generator=generator), torch.randn(2, 3, 1024, 8, generator=generator)
    scores = (q @ partition_means(k, partition).transpose(-1, -2)).double()
    low, high = scores.amin(dim=(-1, -2), keepdim=True), scores.amax(dim=(-1, -2), keepdim=True)
    normalised = ((scores - low) / (high - low)).flatten(2)
    ranked, position = torch.sort(normalised, dim=-1, descending=True)
    keep = torch.cumsum(ranked, -1) - ranked < threshold * ranked.sum(-1, keepdim=True)
    expected = torch.zeros_like(keep).scatter_(-1, position, keep).view(2, 3, 1024, 16)
    expected[:, :, torch.arange(1024), partition.block_of] = True
    assert torch.equal(token_choice(q, k, partition, threshold), expected)


@pytest.mark.parametrize("layer, kind", [(0, "temporal"), (1, "spatial"), (2, "spatiotemporal")])
def test_vmoba_token_gate_attends_exactly_each_tokens_choice(layer, kind):
    """The default gate's output is dense attention masked token by token to the chosen partition blocks (not the
    union of a query block's picks), text kept both ways, image tokens in the partition's order."""
    config = VMoBAConfig(threshold=0.3, dense_steps=0.0, spatial_blocks=(2, 3), cube_blocks=(3, 2, 2),
                         gate="token-exact", dense_above=1.0)
    layout = TokenLayout(3, 4, 6, text_tokens=5, text_position="first")
    call = make_call(layout, "joint_attn", batch=2, heads=2)
    scope, state = _Recorder(), sparse.CallReport({})
    output = VMoBAAttention(scope, state, config, "transformer", "blocks.0.attn1", layer=layer)(call)
    split = sparse.token_split(call)
    partition = make_partition(kind, 3, 4, 6, config.splits(kind, 3, 4, 6), config.block_size)
    assert kind == "temporal" or not torch.equal(partition.order, torch.arange(72))
    q_image, k_image, _ = sparse.image_parts(call, split, partition.order)
    chosen = token_choice(q_image, k_image, partition, config.threshold)
    assert not chosen.all()
    image = torch.arange(call.query.shape[2])[split.image][partition.order]  # token at each permuted position
    key_block = torch.repeat_interleave(torch.arange(partition.blocks), partition.sizes)
    allowed = torch.ones(2, 2, call.query.shape[2], call.key.shape[2], dtype=torch.bool)
    allowed[:, :, image[:, None], image[None, :]] = chosen[..., key_block]
    expected = F.scaled_dot_product_attention(call.query, call.key, call.value, attn_mask=allowed)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    (entry,) = state.report["layers"]["blocks.0.attn1"]
    pairs = (chosen.double() @ partition.sizes.double()).sum(-1).mean() + 72 * 5 + 5 * 77
    assert entry["attention_density"] == pytest.approx(float(pairs) / 77**2, abs=1e-4)
    assert scope.densities == [pytest.approx(entry["attention_density"], abs=1e-4)]


def test_vmoba_runs_dense_from_the_break_even_density_and_says_so():
    layout = TokenLayout(3, 4, 6)
    outputs, entries = {}, {}
    for dense_above in (1.0, 0.05):
        config = VMoBAConfig(threshold=0.2, dense_steps=0.0, block_size=16, gate="block", dense_above=dense_above)
        scope, state = _Recorder(), sparse.CallReport({})
        call = make_call(layout, "self_attn", batch=2, heads=2)
        outputs[dense_above] = VMoBAAttention(scope, state, config, "transformer", "blocks.0.attn1", layer=1)(call)
        (entries[dense_above],) = state.report["layers"]["blocks.0.attn1"]
        assert scope.densities == [pytest.approx(entries[dense_above]["attention_density"], abs=1e-4)]
    assert entries[1.0]["selected_density"] == entries[0.05]["selected_density"] < 1.0
    assert entries[1.0]["attention_density"] < 1.0 and entries[0.05]["attention_density"] == 1.0
    assert not torch.allclose(outputs[1.0], call.dense(), atol=1e-4)
    torch.testing.assert_close(outputs[0.05], call.dense())
    assert VMoBAConfig().dense_from(torch.device("cpu")) == kernels.dense_break_even("cpu") < 1.0
    assert kernels.dense_break_even("meta") == 1.0  # unmeasured devices: only a full selection runs dense
    with pytest.raises(ValueError, match="dense_above"):
        VMoBAConfig(dense_above=0.0)


def test_token_recall_of_the_heaviest_blocks_is_the_oracle():
    call = make_call(TokenLayout(3, 4, 6, text_tokens=5, text_position="last"), "joint_attn")
    split = sparse.token_split(call)
    sizes = torch.tensor([24, 24, 24])
    _, lse = sparse.dense_with_lse(call)
    q_image, k_image, _ = sparse.image_parts(call, split)
    probs = torch.exp(q_image @ k_image.transpose(-1, -2) / math.sqrt(16) - lse[:, :, split.image, None])
    mass = probs.view(*probs.shape[:3], 3, 24).sum(-1)
    heaviest = mass.argsort(-1, descending=True)[..., :2]
    best = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, heaviest, True)
    kept, oracle = sparse.measured_token_recall(call, split, best, sizes)
    torch.testing.assert_close(kept, oracle, atol=1e-5, rtol=0)
    text_mass = 1 - mass.sum(-1)
    expected = (mass * best).sum(-1) + text_mass
    torch.testing.assert_close(kept, expected.mean(dim=(0, 2)), atol=1e-5, rtol=0)
    worst = torch.zeros_like(best).scatter_(-1, mass.argsort(-1)[..., :2], True)
    kept_worst, oracle_again = sparse.measured_token_recall(call, split, worst, sizes)
    assert (kept_worst < oracle_again - 1e-3).all()
    torch.testing.assert_close(oracle_again, oracle)


def test_vmoba_block_gate_scores_each_query_block_by_its_mean_query():
    partition = make_partition("temporal", 4, 4, 4, (2, 1, 1), 16)  # 2 partition blocks of 32 = 4 kernel blocks
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 64, 8, generator=generator), torch.randn(1, 2, 64, 8, generator=generator)
    threshold = 0.3
    selected = block_selection(q, k, partition, threshold)
    for h in range(2):
        means = torch.stack([k[0, h, j * 32 : (j + 1) * 32].mean(0) for j in range(2)])
        pooled = q[0, h].view(4, 16, 8).mean(1)
        normalised = pooled @ means.T
        normalised = (normalised - normalised.min()) / (normalised.max() - normalised.min())
        chosen = threshold_reference(normalised, threshold) | {(b, b // 2) for b in range(4)}  # own partition block
        expected = torch.zeros(4, 4, dtype=torch.bool)
        for b, j in chosen:
            expected[b, 2 * j : 2 * j + 2] = True  # a partition block of 32 is two kernel key blocks
        assert torch.equal(selected[0, h], expected)
    assert VMoBAConfig().gate == "token"
    with pytest.raises(ValueError, match="gate must be one of 'token', 'token-exact', 'block'"):
        VMoBAConfig(gate="tokens")


def test_vmoba_at_full_threshold_equals_dense_and_layers_cycle_partitions():
    from diffusers import WanPipeline, WanTransformer3DModel

    from accel.pipelines.adapters import ready_for_inference
    from training.train_moving_digits import RECIPE, make_vae, sampling_scheduler

    def build():
        torch.manual_seed(0)
        model = WanTransformer3DModel(**{**RECIPE.transformer_config(), "num_layers": 3})
        return ready_for_inference(WanPipeline(tokenizer=None, text_encoder=None, transformer=model,
                                               vae=make_vae(), scheduler=sampling_scheduler()))

    embeds = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1))
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=4,
                  guidance_scale=3.0, height=16, width=16, num_frames=17, output_type="np")
    baseline = build()(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    pipe = accel.wrap(build(), VMoBAConfig(threshold=1.0, measure_recall=True))
    output = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_allclose(output, baseline, atol=1e-4)
    summary = accel.summary(pipe)
    layers = summary.extras["vmoba"]["layers"]
    assert [entries[0]["partition"] for entries in layers.values()] == ["temporal", "spatial", "spatiotemporal"]
    assert all(e["recall_per_head"] == pytest.approx([1.0] * 4, abs=1e-4) for e in layers["blocks.0.attn1"])
    assert [r.attention_density for r in summary.steps if r.step == 0] == [1.0, 1.0]  # dense first steps
    sparse_pipe = accel.wrap(build(), VMoBAConfig(threshold=0.1, measure_recall=True, dense_above=1.0))
    sparse_pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    sparse_summary = accel.summary(sparse_pipe)
    assert sparse_summary.attention_density < 1.0
    entries = [e for layer in sparse_summary.extras["vmoba"]["layers"].values() for e in layer]
    assert all(0 < e["attention_density"] <= 1 and max(e["recall_per_head"]) <= 1 + 1e-5 for e in entries)
    accel.unwrap(sparse_pipe)
    np.testing.assert_array_equal(sparse_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames,
                                  build()(**kwargs, generator=torch.Generator().manual_seed(0)).frames)


@pytest.mark.parametrize("bad", [
    (AdaSpaConfig, {"sparsity": 1.5}), (AdaSpaConfig, {"block_size": 48}), (AdaSpaConfig, {"research": "0.6"}),
    (AdaSpaConfig, {"research": (1.2,)}), (AdaSpaConfig, {"head_adaptive": "yes"}), (AdaSpaConfig, {"warmup": -0.1}),
    (VMoBAConfig, {"threshold": 0.0}), (VMoBAConfig, {"spatial_blocks": (0, 2)}),
    (VMoBAConfig, {"cube_blocks": (2, 2)}),
    (VMoBAConfig, {"block_size": 8}), (VMoBAConfig, {"temporal_blocks": 0}), (VMoBAConfig, {"measure_recall": 1}),
])
def test_bad_configs_raise_value_error(bad):
    config_class, fields = bad
    with pytest.raises(ValueError, match=next(iter(fields))):
        config_class(**fields)


def test_presets_and_config_round_trip():
    for name in ("adaspa", "adaspa-fast", "adaspa-quality", "vmoba", "vmoba-quality"):
        (config,) = accel.registry.resolve(name)
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_a_mask_that_masks_nothing_does_not_force_dense():
    # HunyuanVideo passes a mask on every call; with no padded text token it keeps every score
    for mask in (torch.ones(72, 72, dtype=torch.bool), torch.zeros(1, 1, 1, 72)):
        assert sparse.token_split(make_call(VIDEO, "self_attn", attn_mask=mask)) is not None
