"""Removing blocks and block sub-components from a diffusers denoiser, so that it still saves and loads.

A *unit* is what the contribution analysis scores and pruning removes: a whole block (``"block 7"``) or one residual
branch of a block (``"block 7 ff"``: the branch kinds of the family adapter: ``self_attn``, ``cross_attn``,
``joint_attn``, ``ff``, ``ff_context``). Whole blocks leave the block list and the config's layer count, so the
pruned model is a plain diffusers model of the same class. A removed branch becomes a ``ZeroBranch``: a parameter-free
module with the branch's call signature whose output is zero, so the block adds nothing for it (every branch kind
above is added to its block's residual stream, gated or not). Such a folder loads with plain ``from_pretrained`` as
the full architecture with zero weights in the removed branches (same outputs, no memory saved); ``load_pruned``
reads the branch list the config records (``accel_zeroed_branches``) and loads it without them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from accel.pipelines.adapters import ADAPTERS, BlockInfo, FamilyAdapter, adapter_for, adapter_for_model

# The families whose denoiser is one chain of blocks; a U-Net's stages sit between its transformer blocks.
FAMILIES = tuple(adapter.name for adapter in ADAPTERS if adapter.sequential_blocks)

# The config key that counts the blocks of each block list (diffusers 0.42 transformer classes).
ZEROED_KEY = "accel_zeroed_branches"
# Branch kinds whose output a block adds to its residual stream (single-stream blocks mix theirs instead).
RESIDUAL_KINDS = ("self_attn", "cross_attn", "joint_attn", "ff", "ff_context")


@dataclass(frozen=True)
class Unit:
    """One removable unit: a block (``component=None``) or one residual branch of it."""

    block: int
    component: str | None = None

    @property
    def name(self) -> str:
        return f"block {self.block}" if self.component is None else f"block {self.block} {self.component}"

    @classmethod
    def parse(cls, name: str) -> Unit:
        parts = name.split()
        if len(parts) in (2, 3) and parts[0] == "block" and parts[1].isdigit():
            return cls(int(parts[1]), parts[2] if len(parts) == 3 else None)
        raise ValueError(f"{name!r} is not a unit name; units read 'block 7' or 'block 7 ff'.")


SINGLE_STREAM_ATTENTION = "single_stream_attn"  # a ZeroBranch kind: joint attention over one concatenated stream


class ZeroBranch(torch.nn.Module):
    """A removed residual branch: returns zeros shaped like its input (a pair for a joint attention).

    It holds no weights, but its ``state_dict`` lists the removed branch's weights as zeros (made when saving), so a
    saved folder loads with plain ``from_pretrained`` into the full architecture with that branch computing exact
    zeros (same outputs, no memory saved); ``load_pruned`` swaps the ``ZeroBranch`` back in and skips them.
    """

    def __init__(self, kind: str = "ff", shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.pair = kind == "joint_attn"
        self.shapes = dict(shapes or {})

    @classmethod
    def replacing(cls, kind: str, module: torch.nn.Module) -> ZeroBranch:
        return cls(kind, {name: (tuple(t.shape), t.dtype) for name, t in module.state_dict().items()})

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs.get("x")
        zeros = torch.zeros_like(hidden_states)
        if not self.pair:
            return zeros
        context = kwargs.get("encoder_hidden_states")
        return zeros, None if context is None else torch.zeros_like(context)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, (shape, dtype) in self.shapes.items():
            destination[prefix + name] = torch.zeros(shape, dtype=dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        pass  # the zeros it saved: nothing to load

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def denoiser_of(pipe, attr: str = "transformer") -> tuple[torch.nn.Module, FamilyAdapter]:
    """``pipe``'s denoiser ``attr`` and its family adapter; ``ValueError`` for families without one block chain."""
    adapter = adapter_for(pipe)
    if not adapter.sequential_blocks:
        raise ValueError(f"{adapter.name} models are not one chain of transformer blocks (a U-Net's stages sit "
                         "between them); HierarchicalPrune prunes DiT-family denoisers.")
    model = getattr(pipe, attr, None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no denoiser {attr!r}; pruning works on the transformer of a "
                         "DiT-family pipeline.")
    return model, adapter


def blocks_of(model: torch.nn.Module, adapter: FamilyAdapter | None = None) -> list[BlockInfo]:
    adapter = adapter or adapter_for_model(model)
    return adapter.blocks(model)


def branch_kinds(block: BlockInfo) -> list[str]:
    """The block's branches that can be removed by zeroing them (none in a parallel single-stream block, Flux's or
    Flux.2's: its attention and MLP outputs are concatenated and projected, not added; Flux.2's MLP even lives inside
    its attention module)."""
    names = [name for name, _ in block.branches.values()]
    if any(name.endswith("proj_mlp") for name in names) or any(inner.startswith(outer + ".") for outer in names
                                                                 for inner in names):
        return []
    return [kind for kind in RESIDUAL_KINDS if kind in block.branches
            and not isinstance(block.branches[kind][1], ZeroBranch)]


def all_units(model: torch.nn.Module, adapter: FamilyAdapter, components: bool = True) -> list[Unit]:
    units = []
    for block in blocks_of(model, adapter):
        units.append(Unit(block.index))
        if components:
            units.extend(Unit(block.index, kind) for kind in branch_kinds(block))
    return units


def _parent(model: torch.nn.Module, qualified: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, attr = qualified.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def zero_branch(model: torch.nn.Module, block: BlockInfo, kind: str) -> tuple[torch.nn.Module, str, torch.nn.Module]:
    """Swap ``block``'s ``kind`` branch for a ``ZeroBranch``; returns (parent, attribute, original) to restore it."""
    if kind not in branch_kinds(block):
        raise ValueError(f"{block.name} has no removable {kind!r} branch; it has: {', '.join(branch_kinds(block))}.")
    qualified, original = block.branches[kind]
    parent, attr = _parent(model, qualified)
    # a single-stream block's joint attention (Flux.2, Lumina2) returns one tensor, not an (image, text) pair
    zero_kind = SINGLE_STREAM_ATTENTION if kind == "joint_attn" and not block.dual_stream else kind
    setattr(parent, attr, ZeroBranch.replacing(zero_kind, original))
    return parent, attr, original


def remove_units(model: torch.nn.Module, adapter: FamilyAdapter, units: list[Unit]) -> dict[str, str]:
    """Remove ``units`` from ``model`` in place: zero the branches, drop the blocks from their lists and the
    config's layer counts. Returns the zeroed branches (qualified name after renumbering -> kind)."""
    blocks = blocks_of(model, adapter)
    by_index = {block.index: block for block in blocks}
    for unit in units:
        if unit.block not in by_index:
            raise ValueError(f"{unit.name}: the model has blocks 0..{len(blocks) - 1}.")
    removed_blocks = {unit.block for unit in units if unit.component is None}
    if len(removed_blocks) >= len(blocks):
        raise ValueError("Pruning would remove every block; keep at least one.")
    for unit in units:
        if unit.component is not None and unit.block not in removed_blocks:
            zero_branch(model, by_index[unit.block], unit.component)
    lists: dict[str, list[int]] = {}
    for block in blocks:
        list_name = block.name.rpartition(".")[0]
        lists.setdefault(list_name, []).append(block.index)
    count_keys = {group.pattern.rpartition(".")[0]: group.count_key for group in adapter.block_groups}
    counts = {}
    for list_name, indices in lists.items():
        module_list = model.get_submodule(list_name)
        kept = [module_list[position] for position, index in enumerate(indices) if index not in removed_blocks]
        if len(kept) == len(module_list):
            continue
        key = count_keys.get(list_name)
        if key not in model.config:
            raise ValueError(f"{type(model).__name__}.{list_name}: its adapter's count key {key!r} is not in the "
                             "model's config, so a pruned model would not reload.")
        parent, attr = _parent(model, list_name)
        setattr(parent, attr, torch.nn.ModuleList(kept))
        counts[key] = len(kept)
    zeroed = {name: module.kind for name, module in model.named_modules() if isinstance(module, ZeroBranch)}
    model.register_to_config(**counts, **{ZEROED_KEY: zeroed or None})
    return zeroed


def check_reloadable(model: torch.nn.Module) -> None:
    """``ValueError`` unless a model built from ``model``'s config (with its zeroed branches swapped in) holds exactly
    its parameters: what ``save_pretrained`` + ``from_pretrained`` (or ``load_pruned``) needs."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        rebuilt = type(model).from_config(_clean_config(model.config))
    _zero_named(rebuilt, model.config.get(ZEROED_KEY) or {})
    expected = {name: tuple(t.shape) for name, t in rebuilt.state_dict().items()}
    held = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if expected != held:
        missing = sorted(set(expected) - set(held))[:4]
        extra = sorted(set(held) - set(expected))[:4]
        raise ValueError(
            f"A {type(model).__name__} built from the pruned config would not hold the pruned weights (missing "
            f"{missing}, unexpected {extra}): this cut changes what the class builds for the blocks it keeps (SD3 "
            "builds its last block without the context stream, say). Keep the last block (keep_last >= 1)."
        )


def _clean_config(config) -> dict:
    return {key: value for key, value in dict(config).items() if key != ZEROED_KEY}


def _zero_named(model: torch.nn.Module, zeroed: dict[str, str]) -> None:
    for name, kind in zeroed.items():
        parent, attr = _parent(model, name)
        setattr(parent, attr, ZeroBranch.replacing(kind, getattr(parent, attr)))


def load_pruned(path: str | Path, model_class: type | None = None, *, torch_dtype: torch.dtype | None = None):
    """Load a pruned denoiser folder written by ``save_pretrained``: plain ``from_pretrained`` when only whole blocks
    were removed, else build it from its config with the zeroed branches (``accel_zeroed_branches``) and load."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path} has no config.json; pass the denoiser's folder (e.g. <pipeline>/transformer).")
    config = json.loads(config_path.read_text())
    if model_class is None:
        import diffusers

        model_class = getattr(diffusers, config.get("_class_name", ""), None)
        if model_class is None:
            raise ValueError(f"{config_path} names class {config.get('_class_name')!r}, which diffusers lacks.")
    zeroed = config.get(ZEROED_KEY) or {}
    if not zeroed:
        return model_class.from_pretrained(path, torch_dtype=torch_dtype)
    model = model_class.from_config({key: value for key, value in config.items() if key != ZEROED_KEY})
    _zero_named(model, zeroed)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no safetensors weights.")
    state = {}
    for file in files:
        state.update(load_file(file))
    model.load_state_dict(state, strict=True)
    model.register_to_config(**{ZEROED_KEY: zeroed})
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.eval()
