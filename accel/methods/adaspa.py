"""AdaSpa: block-sparse self-attention whose blocks are chosen by their true attention mass, searched once and
refreshed rarely.

Paper: Xia et al., "Training-free and Adaptive Sparse Attention for Efficient Long Video Generation",
arXiv 2502.21079. No public code exists; this follows the paper.

What it does: the first ``warmup`` share of the steps run dense. A search gives every (query block, key block) its
attention mass and each query-block row keeps its ``k`` heaviest key blocks (row-wise top-k); later steps use that
selection through ``accel.kernels.block_sparse_attention``, and each ``research`` step searches again.
Head-adaptive sparsity, as in the paper: with target sparsity ``s``, the ``n`` heads whose recall at ``s`` exceeds
0.8 (``n`` capped at half the heads) split into the ``n`` highest-recall heads, which drop ``(1 + s) / 2`` of the
key blocks, and the ``n`` lowest, which drop ``(3s - 1) / 2``, so the mean stays ``s`` (below ``s = 1/3`` every head
keeps ``s``).

Where this implementation departs from the paper, and why:
* The search measures ``search_rows`` evenly spaced rows of each query block exactly (their own LSE over every
  key, in one scores pass at ``search_rows / block_size`` of dense attention's cost) and the search step itself
  runs sparse; the paper's search (``search_rows=None``) takes every row's LSE from the search step's dense
  attention, and its re-search reuses that stale LSE. The paper's costs a dense step plus a block-mass pass
  that costs more than one (two of them at 16K tokens and 8 steps left AdaSpa slower than dense on 2 CPU cores).
* Blocks are ``block_size`` tokens of the image sequence in its (frame, row, column) order, as the paper's 64.
* Text tokens of joint attention are always kept in both directions; cross-attention is never touched.
* A search is per call, per (denoiser, CFG branch) and attention module; a call whose batch or length differs
  from the searched one searches again. Calls whose mask masks something run dense (HunyuanVideo's padded text).

Measured: ``docs/benchmarks/sparse_attention.md`` (``python benchmarks/sparse_attention.py``): end-to-end speed
against dense, and recall against the oracle's best at the same density, on every step.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from accel.attention import AttentionCall
from accel.config import AccelConfig, check_block_size, check_bool, check_float, check_int
from accel.hooks import BranchStates, MethodScope
from accel.kernels import block_mass, mask_from_selection, recall, sampled_block_mass, top_k_selection
from accel.registry import register_accelerator

from . import sparse_tokens as sparse

RECALL_BAR = 0.8  # heads whose recall at the target sparsity exceeds this count towards n

FAMILIES = sparse.FAMILIES  # the families with softmax self-attention to make sparse


@dataclasses.dataclass
class AdaSpaConfig(AccelConfig):
    """Configuration of AdaSpa (arXiv 2502.21079).

    Args:
        sparsity: target share of key blocks each query-block row drops (0.7 keeps 30%).
        warmup: share of the steps run dense before the first search.
        research: shares of the steps at which the selection is searched again (from the cached LSE).
        block_size: query and key block size of the kernel, in tokens (a power of two from 16 to 1024).
        head_adaptive: give high-recall heads more sparsity and low-recall heads less (mean unchanged).
        search_rows: query rows per block whose exact attention a search measures (their own LSE, every key); the
            search step then runs sparse. None: every row, from the search step's dense attention (the paper's).
        measure_recall: also run a dense pass per sparse call to report the attention mass kept, and the most any
            selection with the same number of key blocks per row could keep (the oracle's).
    """

    method = "adaspa"
    sparsity: float = 0.7
    warmup: float = 0.2
    research: tuple[float, ...] = (0.6,)
    block_size: int = 64
    head_adaptive: bool = True
    search_rows: int | None = 8
    measure_recall: bool = False

    def validate(self) -> None:
        check_float("sparsity", self.sparsity, minimum=0.0, maximum=1.0)
        check_float("warmup", self.warmup, minimum=0.0, maximum=1.0)
        if not isinstance(self.research, (tuple, list)):
            raise ValueError(f"research must be a tuple of step shares in [0, 1], got {self.research!r}.")
        for share in self.research:
            check_float("research step", share, minimum=0.0, maximum=1.0)
        self.research = tuple(self.research)  # JSON gives a list back
        check_block_size("block_size", self.block_size)
        check_bool("head_adaptive", self.head_adaptive)
        if self.search_rows is not None:
            check_int("search_rows", self.search_rows, minimum=1, maximum=self.block_size)
        check_bool("measure_recall", self.measure_recall)


def head_sparsities(recalls: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-head sparsity from per-head recall at ``sparsity`` (the paper's head-adaptive rule)."""
    heads = recalls.numel()
    n = min(int((recalls > RECALL_BAR).sum()), heads // 2)
    result = torch.full((heads,), sparsity, dtype=torch.float64)
    if n and sparsity >= 1 / 3:  # below 1/3 the low group would need negative sparsity: keep every head at s
        ranked = torch.argsort(recalls.double().cpu(), descending=True)
        result[ranked[:n]] = (1 + sparsity) / 2
        result[ranked[heads - n :]] = max(0.0, (3 * sparsity - 1) / 2)
    return result


def blocks_kept(sparsity: torch.Tensor | float, key_blocks: int) -> torch.Tensor:
    kept = torch.ceil((1 - torch.as_tensor(sparsity, dtype=torch.float64)) * key_blocks - 1e-6)
    return kept.clamp(1, key_blocks).long()


@dataclasses.dataclass
class Search:
    """The selection in force for one attention module, denoiser and CFG branch, and what a re-search needs."""

    shape: tuple  # (query shape, token split) it was searched for
    step: int  # the step of the last search
    keep: torch.Tensor  # key blocks kept per head [H]
    lse: torch.Tensor | None  # the image rows' LSE from the first search (None for a sampled-rows search)
    text_mass: torch.Tensor | None  # each row's attention mass on the text tokens, from the first search
    index: torch.Tensor  # the selection (kv_block_index, kv_block_count)
    count: torch.Tensor
    density: float  # share of the attention matrix it computes
    changed: float | None = None  # at a re-search: share of the new selection's blocks the previous one lacked


class AdaSpaAttention:
    """The replacement for the SDPA call of one self/joint attention module."""

    def __init__(self, scope: MethodScope, report: sparse.CallReport, searches: BranchStates[dict[str, Search]],
                 config: AdaSpaConfig, denoiser: str, name: str):
        self.scope, self.report, self.searches, self.config = scope, report, searches, config
        self.denoiser, self.name = denoiser, name

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        info, split = call.step, sparse.token_split(call)
        if info is None or info.denoiser != self.denoiser or split is None or not info.num_steps:
            return self._dense(call)
        steps, config = info.num_steps, self.config
        first_search = round(config.warmup * steps)
        if info.step < first_search:
            return self._dense(call)
        searches = self.searches.get(info)
        searched = searches.get(self.name)
        shape = (tuple(call.query.shape), split)
        if searched is None or searched.shape != shape:
            return self._first_search(call, split, searches, shape)
        if info.step in {round(share * steps) for share in config.research} and info.step != searched.step:
            self._research(call, split, searched)
        return self._sparse(call, split, searched)

    def _dense(self, call: AttentionCall) -> torch.Tensor:
        self.scope.record_attention_density(1.0)
        return call.dense()

    def _first_search(self, call, split, searches: dict[str, Search], shape) -> torch.Tensor:
        """Block mass (from sampled rows, or from dense attention with LSE), per-head sparsity, row-wise top-k."""
        q_image, k_image, _ = sparse.image_parts(call, split)
        if self.config.search_rows is not None:
            output = image_lse = None
            mass, text_mass = self._sampled_mass(call, split)
        else:
            output, lse = sparse.dense_with_lse(call)
            image_lse = lse[:, :, split.image]
            mass = block_mass(q_image, k_image, image_lse, self.config.block_size, scale=call.scale)
            text_mass = (1 - mass.sum(-1)).clamp_min(0) if split.text is not None else None
        heads, key_blocks = mass.shape[1], mass.shape[-1]
        target = torch.full((heads,), self.config.sparsity, dtype=torch.float64)
        if self.config.head_adaptive:
            index, count = top_k_selection(mass, blocks_kept(target, key_blocks))
            at_target = recall(mass, mask_from_selection(index, count, key_blocks), text_mass)
            target = head_sparsities(at_target, self.config.sparsity)
        keep = blocks_kept(target, key_blocks)
        index, count = top_k_selection(mass, keep)
        kept = recall(mass, mask_from_selection(index, count, key_blocks), text_mass)
        searches[self.name] = searched = Search(
            shape, call.step.step, keep, image_lse, text_mass, index, count,
            sparse.selection_density(split, index, count, self.config.block_size, call.query.shape[2]),
        )
        self._report(call, searched, kept, exact=output is not None)
        if output is None:
            return self._sparse(call, split, searched)
        self.scope.record_attention_density(1.0)  # the search step itself runs dense
        return output

    def _sampled_mass(self, call, split) -> tuple[torch.Tensor, torch.Tensor | None]:
        q_image, k_image, _ = sparse.image_parts(call, split)
        k_text = call.key[:, :, split.text] if split.text is not None else None
        return sampled_block_mass(q_image, k_image, self.config.block_size, self.config.search_rows,
                                  scale=call.scale, extra_keys=k_text)

    def _research(self, call, split, searched: Search) -> None:
        """One pass from the current q, k (sampled rows, or every row with the first search's cached LSE): new
        top-k with the same per-head budgets."""
        if searched.lse is None:
            normalised, text_mass = self._sampled_mass(call, split)  # fresh LSE: exact for the sampled rows
            index, count = top_k_selection(normalised, searched.keep)
        else:
            q_image, k_image, _ = sparse.image_parts(call, split)
            mass = block_mass(q_image, k_image, searched.lse, self.config.block_size, scale=call.scale)
            index, count = top_k_selection(mass, searched.keep)
            normalised = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)  # the LSE is stale: renormalise rows
            text_mass = searched.text_mass
            if text_mass is not None:  # keep the text's share of each row as measured at the first search
                normalised = normalised * (1 - text_mass)[..., None]
        key_blocks = normalised.shape[-1]
        new = mask_from_selection(index, count, key_blocks)
        kept = recall(normalised, new, text_mass)
        old = mask_from_selection(searched.index, searched.count, key_blocks)
        searched.changed = float(1 - (new & old).sum() / new.sum().clamp_min(1))
        searched.step, searched.index, searched.count = call.step.step, index, count
        searched.density = sparse.selection_density(split, index, count, self.config.block_size, call.query.shape[2])
        self._report(call, searched, kept, exact=False)

    def _sparse(self, call, split, searched: Search) -> torch.Tensor:
        density = searched.density
        if searched.lse is None and searched.step == call.step.step:  # a sampled-rows search ran in this call
            image_share = split.image_tokens / call.query.shape[2]
            density += self.config.search_rows / self.config.block_size * image_share**2
        self.scope.record_attention_density(min(1.0, density))
        if self.config.measure_recall:
            kept, oracle = sparse.measured_recall(call, split, searched.index, searched.count, self.config.block_size)
            self.report.report.setdefault("recall", {}).setdefault(self.name, []).append({
                "step": call.step.step, "branch": call.step.branch, "searched": searched.step == call.step.step,
                "recall_per_head": [round(float(r), 4) for r in kept],
                "oracle_recall_per_head": [round(float(r), 4) for r in oracle],
            })
        return sparse.sparse_attention(call, split, searched.index, searched.count, self.config.block_size)

    def _report(self, call, searched: Search, kept: torch.Tensor, *, exact: bool) -> None:
        key_blocks = math.ceil(searched.shape[1].image_tokens / self.config.block_size)  # shape: (q shape, split)
        layer = self.report.report.setdefault("layers", {}).setdefault(self.name, [])
        layer.append({
            "step": call.step.step, "branch": call.step.branch, "exact": exact,
            "density_per_head": [round(float(k) / key_blocks, 4) for k in searched.keep],
            "recall_per_head": [round(float(r), 4) for r in kept],
            "attention_density": round(searched.density, 4),
            **({"changed": round(searched.changed, 4)} if not exact and searched.changed is not None else {}),
        })


def apply_adaspa(scope: MethodScope, config: AdaSpaConfig) -> None:
    """Intercept every self- and joint-attention module of every denoiser; cross-attention stays dense."""
    report = scope.add_state(sparse.CallReport(scope.extras))
    searches = scope.add_branch_states(dict)
    for denoiser, blocks in scope.blocks.items():
        for block in blocks:
            for kind, (name, module) in block.attentions.items():
                if kind in ("self_attn", "joint_attn"):
                    scope.intercept_attention(module, AdaSpaAttention(scope, report, searches, config, denoiser, name),
                                              kind=kind, name=name)


register_accelerator(
    AdaSpaConfig,
    apply_adaspa,
    description="AdaSpa: block-sparse self-attention from an exact attention-mass search, head-adaptive sparsity",
    families=FAMILIES,
    presets={"adaspa-fast": lambda: AdaSpaConfig(sparsity=0.8), "adaspa-quality": lambda: AdaSpaConfig(sparsity=0.5)},
    role="sparse attention",
    structural=True,
)
