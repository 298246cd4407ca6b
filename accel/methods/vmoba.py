"""VMoBA: mixture-of-block attention for video, training-free: every query token picks the key blocks whose mean
key it matches best, over partitions that cycle through 1D, 2D and 3D from layer to layer.

Paper: Wu et al., "VMoBA: Mixture-of-Block Attention for Video Diffusion Models", arXiv 2506.23858.

What it does, in three lines: the image tokens of layer ``l`` are partitioned into blocks along time (1D: runs of
frames), space (2D: tiles of the frame, through all frames) or both (3D: cubes), cycling with ``l % 3``, and
permuted so each block is contiguous. Each key block is mean-pooled into one representative; every query token
scores every block of its head; per head, the min-max-normalised scores of all (token, block) pairs are kept from
the highest down until they add up to ``threshold`` of their total (global selection), and each token always keeps
its own block. The first ``dense_steps`` share of the steps runs dense.

Where this implementation departs from the paper, and why:
* The shared kernel works on query blocks of ``kernel block`` tokens: with the per-token gate (default) a query
  block attends the union of its tokens' picks. ``gate="token-exact"`` attends each token's own picks
  (``accel.kernels.token_sparse_attention``): the paper's attention, but on our trained video model far worse
  than the union at the same density; ``gate="block"`` (``"vmoba-fast"``) gates each query block by its mean
  query (docs/methods/vmoba.md). The kernel block is the largest power of two <= ``block_size`` dividing every
  partition block's size; when none >= 16 does, a partition block brings in the 16-token blocks it overlaps.
* A selection whose density reaches ``dense_above`` (default: where the kernel is slower than dense SDPA on the
  device) runs dense: on random weights at 16K tokens the union covers nearly every block.
* The 2D tiles span every frame, the 1D runs every row and column; on images (one frame) the 1D partition runs
  over rows. Split counts are capped by the token grid.
* Text tokens of joint attention are always kept in both directions; cross-attention is never touched; calls
  whose mask masks something run dense.
* Recall (attention mass kept) costs a dense pass, so it is measured only with ``measure_recall=True``.

Measured: ``docs/benchmarks/sparse_attention.md`` (``python benchmarks/sparse_attention.py``): end-to-end speed
against dense, and recall against the oracle's best at the same block budget, on every step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from accel.attention import AttentionCall
from accel.config import AccelConfig, check_block_size, check_bool, check_float, check_int
from accel.hooks import MethodScope
from accel.kernels import dense_break_even, selection_from_mask
from accel.registry import register_accelerator

from . import sparse_tokens as sparse

PARTITIONS = ("temporal", "spatial", "spatiotemporal")
GATES = ("token", "token-exact", "block")


def _check_splits(name: str, value, length: int) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != length:
        raise ValueError(f"{name} must be a tuple of {length} positive split counts, got {value!r}.")
    for count in value:
        check_int(name, count, minimum=1)

FAMILIES = sparse.FAMILIES  # the families with softmax self-attention to make sparse


@dataclasses.dataclass
class VMoBAConfig(AccelConfig):
    """Configuration of VMoBA (arXiv 2506.23858), training-free.

    Args:
        threshold: share of the summed normalised scores the kept (token, block) pairs reach (paper: 0.25); 1 keeps
            every pair.
        dense_steps: share of the steps run dense first (paper: 0.25).
        temporal_blocks: runs of frames in the 1D partition.
        spatial_blocks: (rows, columns) of tiles in the 2D partition.
        cube_blocks: (frames, rows, columns) splits of the 3D partition.
        block_size: largest kernel block of the block gate, in tokens (a power of two from 16 to 1024).
        gate: "token" scores each query token (the paper's gate), a kernel query block attending the union of its
            tokens' picks; "token-exact" attends each token's own picks (sparser, per-token kernel); "block" scores
            each kernel query block by its mean query (sparser, coarser).
        dense_above: selection density at or above which a call runs dense (every key: nothing chosen is lost and
            nothing saved); None: where the kernel is measured slower than dense SDPA on the call's device
            (``accel.kernels.dense_break_even``); 1.0: only a full selection.
        measure_recall: also run a dense pass per sparse call to report the attention mass kept, and the most any
            selection with the same number of key blocks per query block could keep (the oracle's).
    """

    method = "vmoba"
    threshold: float = 0.25
    dense_steps: float = 0.25
    temporal_blocks: int = 8
    spatial_blocks: tuple[int, int] = (4, 4)
    cube_blocks: tuple[int, int, int] = (4, 4, 4)
    block_size: int = 64
    gate: str = "token"
    dense_above: float | None = None
    measure_recall: bool = False

    def validate(self) -> None:
        check_float("threshold", self.threshold, minimum=0.0, maximum=1.0, open_min=True)
        check_float("dense_steps", self.dense_steps, minimum=0.0, maximum=1.0)
        check_int("temporal_blocks", self.temporal_blocks, minimum=1)
        _check_splits("spatial_blocks", self.spatial_blocks, 2)
        _check_splits("cube_blocks", self.cube_blocks, 3)
        self.spatial_blocks, self.cube_blocks = tuple(self.spatial_blocks), tuple(self.cube_blocks)  # JSON: lists
        check_block_size("block_size", self.block_size)
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(map(repr, GATES))}, got {self.gate!r}.")
        if self.dense_above is not None:
            check_float("dense_above", self.dense_above, minimum=0.0, maximum=1.0, open_min=True)
        check_bool("measure_recall", self.measure_recall)

    def dense_from(self, device: torch.device) -> float:
        return dense_break_even(device) if self.dense_above is None else self.dense_above

    def splits(self, partition: str, frames: int, height: int, width: int) -> tuple[int, int, int]:
        if partition == "temporal":
            wanted = (self.temporal_blocks, 1, 1) if frames > 1 else (1, self.temporal_blocks, 1)
        elif partition == "spatial":
            wanted = (1, *self.spatial_blocks)
        else:
            wanted = tuple(self.cube_blocks)
        return tuple(min(count, size) for count, size in zip(wanted, (frames, height, width)))


@dataclasses.dataclass(frozen=True)
class Partition:
    """Image tokens grouped into blocks: ``order`` puts each block's tokens together (block by block)."""

    kind: str
    order: torch.Tensor  # [n] original token index at each permuted position
    block_of: torch.Tensor  # [n] block id at each permuted position
    sizes: torch.Tensor  # [J] tokens per block
    kernel_block: int

    @property
    def blocks(self) -> int:
        return self.sizes.numel()


@functools.lru_cache(maxsize=64)
def make_partition(kind: str, frames: int, height: int, width: int, splits: tuple[int, int, int],
                   max_block: int) -> Partition:
    split_t, split_h, split_w = splits
    f = torch.arange(frames).view(-1, 1, 1) * split_t // frames
    r = torch.arange(height).view(1, -1, 1) * split_h // height
    c = torch.arange(width).view(1, 1, -1) * split_w // width
    block = ((f * split_h + r) * split_w + c).flatten()
    order = torch.argsort(block, stable=True)
    sizes = torch.bincount(block, minlength=split_t * split_h * split_w)
    common = math.gcd(*sizes.tolist())
    kernel_block = 16
    for candidate in (max_block >> shift for shift in range(max_block.bit_length())):
        if 16 <= candidate and common % candidate == 0:
            kernel_block = candidate
            break
    return Partition(kind, order, block[order], sizes, kernel_block)


def partition_means(k: torch.Tensor, partition: Partition) -> torch.Tensor:
    """Each partition block's mean key [B, H, J, D] (fp32), k permuted into block order."""
    block_of = partition.block_of.to(k.device)
    means = torch.zeros(*k.shape[:2], partition.blocks, k.shape[-1], dtype=torch.float32, device=k.device)
    means.index_add_(2, block_of, k.float())
    return means / partition.sizes.to(k.device).view(1, 1, -1, 1)


def token_choice(q: torch.Tensor, k: torch.Tensor, partition: Partition, threshold: float) -> torch.Tensor:
    """VMoBA's per-token gate: which partition blocks each query token attends, [B, H, n, J] bool (q, k permuted
    into block order)."""
    scores = torch.matmul(q.float(), partition_means(k, partition).transpose(-1, -2))
    return _threshold_pairs(scores, threshold, partition.block_of.to(q.device))


def union_selection(chosen: torch.Tensor, partition: Partition) -> torch.Tensor:
    """The per-token gate's picks ``chosen`` [B, H, n, J] as a kernel-block mask [B, H, Qb, Kb]: each kernel query
    block attends the union of its tokens' picks."""
    batch, heads, n, blocks = chosen.shape
    query_blocks = math.ceil(n / partition.kernel_block)
    padded = torch.nn.functional.pad(chosen, (0, 0, 0, query_blocks * partition.kernel_block - n))
    return _kernel_mask(padded.view(batch, heads, query_blocks, -1, blocks).any(dim=3), partition, n)


def block_selection(q: torch.Tensor, k: torch.Tensor, partition: Partition, threshold: float) -> torch.Tensor:
    """The block gate: kernel-block mask [B, H, Qb, Kb], each kernel query block gated as one query by its mean
    query (q, k permuted into block order)."""
    batch, heads, n, dim = q.shape
    block_of, size = partition.block_of.to(q.device), partition.kernel_block
    query_blocks = math.ceil(n / size)
    pooled = torch.nn.functional.pad(q.float(), (0, 0, 0, query_blocks * size - n))
    rows = torch.bincount(torch.arange(n, device=q.device) // size, minlength=query_blocks)
    pooled = pooled.view(batch, heads, query_blocks, size, dim).sum(3) / rows.view(1, 1, -1, 1)
    gated_block_of = block_of[torch.clamp(torch.arange(query_blocks, device=q.device) * size, max=n - 1)]
    scores = torch.matmul(pooled, partition_means(k, partition).transpose(-1, -2))
    return _kernel_mask(_threshold_pairs(scores, threshold, gated_block_of), partition, n)


def _kernel_mask(per_query_block: torch.Tensor, partition: Partition, n: int) -> torch.Tensor:
    """Partition blocks picked per kernel query block [B, H, Qb, J] -> the kernel key blocks they cover."""
    size = partition.kernel_block
    overlap = torch.zeros(partition.blocks, math.ceil(n / size), dtype=torch.float32, device=per_query_block.device)
    overlap[partition.block_of.to(overlap.device), torch.arange(n, device=overlap.device) // size] = 1.0
    return torch.matmul(per_query_block.float(), overlap) > 0


THRESHOLD_BINS = 4096


def _threshold_pairs(scores: torch.Tensor, threshold: float, own_block: torch.Tensor) -> torch.Tensor:
    """VMoBA's global selection over (query, key block) ``scores`` [B, H, Q, J]: per head, min-max-normalised scores
    kept from the highest down until they reach ``threshold`` of their total (1: every pair, zero-scored ones too);
    each query keeps ``own_block``.

    Without sorting every pair: a histogram of the scores' sums by value finds, per head, the one value bin where
    the running sum crosses the threshold; bins above it are kept whole, below it not at all, and only the pairs in
    that bin are sorted (sums in float64)."""
    batch, heads, queries, blocks = scores.shape
    if threshold >= 1.0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    low = scores.amin(dim=(-1, -2), keepdim=True)
    high = scores.amax(dim=(-1, -2), keepdim=True)
    normalised = ((scores - low) / (high - low).clamp_min(1e-12)).flatten(2).double()  # [B, H, N] in [0, 1]
    target = threshold * normalised.sum(-1, keepdim=True)
    bin_of = (normalised * THRESHOLD_BINS).long().clamp_(max=THRESHOLD_BINS - 1)
    sums = torch.zeros(batch, heads, THRESHOLD_BINS, dtype=torch.float64, device=scores.device)
    sums.scatter_add_(-1, bin_of, normalised)
    above = sums.flip(-1).cumsum(-1).flip(-1) - sums  # [B, H, bins] the sum of every higher bin
    crossing = ((above < target) & (above + sums >= target)).long().argmax(-1, keepdim=True)  # [B, H, 1]
    keep = bin_of > crossing
    # the crossing bin's pairs, gathered per head (padded with -1), sorted, kept while the running sum is below
    candidates = bin_of == crossing
    slot = torch.cumsum(candidates, dim=-1) - 1
    width = max(1, int(candidates.sum(-1).max()))
    values = torch.full((batch, heads, width + 1), -1.0, dtype=torch.float64, device=scores.device)
    where = torch.where(candidates, slot, width)  # other pairs: a spare last column
    values.scatter_(-1, where, normalised)
    ranked, rank_order = torch.sort(values[..., :width], dim=-1, descending=True)
    ranked = ranked.clamp_min(0)  # padding adds nothing
    in_bin = above.gather(-1, crossing) + torch.cumsum(ranked, dim=-1) - ranked < target
    kept_slot = torch.zeros(batch, heads, width + 1, dtype=torch.bool, device=scores.device)
    kept_slot.scatter_(-1, rank_order, in_bin)
    keep |= candidates & kept_slot.gather(-1, where)
    chosen = keep.view(batch, heads, queries, blocks)
    chosen[:, :, torch.arange(queries, device=scores.device), own_block] = True  # a query keeps its own block
    return chosen


class VMoBAAttention:
    """The replacement for the SDPA call of one self/joint attention module (layer ``layer``)."""

    def __init__(self, scope: MethodScope, state: sparse.CallReport, config: VMoBAConfig, denoiser: str, name: str,
                 layer: int) -> None:
        self.scope, self.state, self.config = scope, state, config
        self.denoiser, self.name = denoiser, name
        self.partition_kind = PARTITIONS[layer % len(PARTITIONS)]

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        info, split = call.step, sparse.token_split(call)
        if (info is None or info.denoiser != self.denoiser or split is None or not info.num_steps
                or info.step < round(self.config.dense_steps * info.num_steps)):
            self.scope.record_attention_density(1.0)
            return call.dense()
        dims = (split.frames, split.height, split.width)
        partition = make_partition(self.partition_kind, *dims, self.config.splits(self.partition_kind, *dims),
                                   self.config.block_size)
        order = partition.order.to(call.query.device)
        q_image, k_image, _ = sparse.image_parts(call, split, order)
        entry = {"step": info.step, "branch": info.branch, "partition": partition.kind, "blocks": partition.blocks}
        if self.config.gate == "token-exact":
            chosen = token_choice(q_image, k_image, partition, self.config.threshold)
            density = sparse.token_selection_density(split, chosen, partition.sizes, call.query.shape[2])
            per_head = chosen.float().mean(dim=(0, 2, 3))
            measure = functools.partial(sparse.measured_token_recall, call, split, chosen, partition.sizes, order)
            attend = functools.partial(sparse.token_sparse_attention, call, split, chosen, partition.sizes, order)
        else:
            if self.config.gate == "token":
                selected = union_selection(token_choice(q_image, k_image, partition, self.config.threshold),
                                           partition)
            else:
                selected = block_selection(q_image, k_image, partition, self.config.threshold)
            index, count = selection_from_mask(selected)
            density = sparse.selection_density(split, index, count, partition.kernel_block, call.query.shape[2])
            per_head = selected.float().mean(dim=(0, 2, 3))
            entry["kernel_block"] = partition.kernel_block
            measure = functools.partial(sparse.measured_recall, call, split, index, count, partition.kernel_block,
                                        order=order)
            attend = functools.partial(sparse.sparse_attention, call, split, index, count, partition.kernel_block,
                                       order=order)
        entry["selected_density"] = round(density, 4)
        # a selection at or above the kernel's break-even runs dense: every key, so nothing it chose is lost
        full = density >= self.config.dense_from(call.query.device)
        density = 1.0 if full else density
        entry["attention_density"] = round(density, 4)
        entry["density_per_head"] = [round(float(d), 4) for d in per_head]
        if self.config.measure_recall:
            kept, oracle = (torch.ones(call.query.shape[1]),) * 2 if full else measure()
            entry["recall_per_head"] = [round(float(r), 4) for r in kept]
            entry["oracle_recall_per_head"] = [round(float(r), 4) for r in oracle]
        self.state.report.setdefault("layers", {}).setdefault(self.name, []).append(entry)
        self.scope.record_attention_density(density)
        return call.dense() if full else attend()


def apply_vmoba(scope: MethodScope, config: VMoBAConfig) -> None:
    """Intercept every self- and joint-attention module; the layer index (per denoiser) picks the partition."""
    state = scope.add_state(sparse.CallReport(scope.extras))
    for denoiser, blocks in scope.blocks.items():
        layer = 0
        for block in blocks:
            for kind, (name, module) in block.attentions.items():
                if kind in ("self_attn", "joint_attn"):
                    replacement = VMoBAAttention(scope, state, config, denoiser, name, layer)
                    scope.intercept_attention(module, replacement, kind=kind, name=name)
                    layer += 1


register_accelerator(
    VMoBAConfig,
    apply_vmoba,
    description="VMoBA: per-token top-threshold key-block selection over cycling 1D/2D/3D partitions",
    families=FAMILIES,
    presets={"vmoba-quality": lambda: VMoBAConfig(threshold=0.5), "vmoba-fast": lambda: VMoBAConfig(gate="block")},
    role="sparse attention",
    structural=True,
)
