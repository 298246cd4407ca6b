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
* The shared kernel works on query blocks of ``kernel block`` tokens: with the paper's per-token gate (default) a
  query block attends the union of its tokens' picks (on random weights at 16K tokens: every block, and a call
  whose selection is full runs dense); ``gate="block"`` (``"vmoba-fast"``) gates each query block by its mean
  query, at the threshold's density but coarser (docs/methods/vmoba.md). The kernel block is the largest power
  of two <= ``block_size`` dividing every partition block's size; when none >= 16 does, it is 16 and a selected
  partition block brings in the kernel blocks it overlaps (a superset).
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
from accel.kernels import selection_from_mask
from accel.registry import register_accelerator

from . import sparse_tokens as sparse

PARTITIONS = ("temporal", "spatial", "spatiotemporal")


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
        threshold: share of the summed normalised scores the kept (token, block) pairs reach (paper: 0.25).
        dense_steps: share of the steps run dense first (paper: 0.25).
        temporal_blocks: runs of frames in the 1D partition.
        spatial_blocks: (rows, columns) of tiles in the 2D partition.
        cube_blocks: (frames, rows, columns) splits of the 3D partition.
        block_size: largest kernel block, in tokens (a power of two from 16 to 1024).
        gate: "token" scores each query token (the paper's), a kernel query block then attending the union of its
            tokens' picks; "block" scores each kernel query block by its mean query (sparser, faster, coarser).
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
    measure_recall: bool = False

    def validate(self) -> None:
        check_float("threshold", self.threshold, minimum=0.0, maximum=1.0, open_min=True)
        check_float("dense_steps", self.dense_steps, minimum=0.0, maximum=1.0)
        check_int("temporal_blocks", self.temporal_blocks, minimum=1)
        _check_splits("spatial_blocks", self.spatial_blocks, 2)
        _check_splits("cube_blocks", self.cube_blocks, 3)
        self.spatial_blocks, self.cube_blocks = tuple(self.spatial_blocks), tuple(self.cube_blocks)  # JSON: lists
        check_block_size("block_size", self.block_size)
        if self.gate not in ("block", "token"):
            raise ValueError(f"gate must be 'block' or 'token', got {self.gate!r}.")
        check_bool("measure_recall", self.measure_recall)

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


def vmoba_selection(q: torch.Tensor, k: torch.Tensor, partition: Partition, threshold: float,
                    gate: str = "token") -> torch.Tensor:
    """Kernel-block mask [B, H, Qb, Kb] from VMoBA's gating (q, k permuted into block order), per query token
    (``gate="token"``) or per kernel query block, from its mean query (``gate="block"``)."""
    batch, heads, n, dim = q.shape
    block_of, blocks, size = partition.block_of.to(q.device), partition.blocks, partition.kernel_block
    means = torch.zeros(batch, heads, blocks, dim, dtype=torch.float32, device=q.device)
    means.index_add_(2, block_of, k.float())
    means /= partition.sizes.to(q.device).view(1, 1, -1, 1)
    query_blocks = math.ceil(n / size)
    if gate == "block":
        pooled = torch.nn.functional.pad(q.float(), (0, 0, 0, query_blocks * size - n))
        rows = torch.bincount(torch.arange(n, device=q.device) // size, minlength=query_blocks)
        pooled = pooled.view(batch, heads, query_blocks, size, dim).sum(3) / rows.view(1, 1, -1, 1)
        gated_block_of = block_of[torch.clamp(torch.arange(query_blocks, device=q.device) * size, max=n - 1)]
        chosen = _threshold_pairs(torch.matmul(pooled, means.transpose(-1, -2)), threshold, gated_block_of)
        per_query_block = chosen  # [B, H, Qb, J]
    else:
        chosen = _threshold_pairs(torch.matmul(q.float(), means.transpose(-1, -2)), threshold, block_of)
        padded = torch.nn.functional.pad(chosen, (0, 0, 0, query_blocks * size - n))
        per_query_block = padded.view(batch, heads, query_blocks, size, blocks).any(dim=3)  # union of its tokens
    overlap = torch.zeros(blocks, query_blocks, dtype=torch.float32, device=q.device)
    overlap[block_of, torch.arange(n, device=q.device) // size] = 1.0  # partition block -> kernel key blocks
    return torch.matmul(per_query_block.float(), overlap) > 0


def _threshold_pairs(scores: torch.Tensor, threshold: float, own_block: torch.Tensor) -> torch.Tensor:
    """VMoBA's global selection over (query, key block) ``scores`` [B, H, Q, J]: per head, min-max-normalised scores
    kept from the highest down until they reach ``threshold`` of their total; each query keeps ``own_block``."""
    batch, heads, queries, blocks = scores.shape
    low = scores.amin(dim=(-1, -2), keepdim=True)
    high = scores.amax(dim=(-1, -2), keepdim=True)
    normalised = ((scores - low) / (high - low).clamp_min(1e-12)).flatten(2)
    ranked, position = torch.sort(normalised, dim=-1, descending=True)
    before = torch.cumsum(ranked, dim=-1) - ranked
    keep = before < threshold * ranked.sum(-1, keepdim=True)  # until the running sum reaches the threshold
    chosen = torch.zeros_like(keep).scatter_(-1, position, keep).view(batch, heads, queries, blocks)
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
        selected = vmoba_selection(q_image, k_image, partition, self.config.threshold, self.config.gate)
        full = bool(selected.all())  # every block kept: dense attention gives the same result, faster
        index, count = selection_from_mask(selected)
        density = 1.0 if full else sparse.selection_density(split, index, count, partition.kernel_block,
                                                             call.query.shape[2])
        entry = {
            "step": info.step, "branch": info.branch, "partition": partition.kind, "blocks": partition.blocks,
            "kernel_block": partition.kernel_block, "attention_density": round(density, 4),
            "density_per_head": [round(float(d), 4) for d in selected.float().mean(dim=(0, 2, 3))],
        }
        if self.config.measure_recall:
            if full:
                kept = oracle = torch.ones(call.query.shape[1])
            else:
                kept, oracle = sparse.measured_recall(call, split, index, count, partition.kernel_block, order=order)
            entry["recall_per_head"] = [round(float(r), 4) for r in kept]
            entry["oracle_recall_per_head"] = [round(float(r), 4) for r in oracle]
        self.state.report.setdefault("layers", {}).setdefault(self.name, []).append(entry)
        self.scope.record_attention_density(density)
        if full:
            return call.dense()
        return sparse.sparse_attention(call, split, index, count, partition.kernel_block, order=order)


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
