"""The trained part of ILF: the feedback block F and the per-block scales s, with the card that says which model,
scheduler, step count and loop region they were trained for; saved as safetensors + JSON."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from accel.io import atomic_write
from accel.pipelines.adapters import BlockInfo

from ..trained import model_fingerprint

FORMAT = "accel-ilf/1"
SCALE_SHAPES = ("block", "channel")


def copy_block(template: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``template`` without the hooks installed on it or its submodules (diffusers keeps a hook
    registry and a patched ``forward`` on each hooked module, which hold the pipeline's state)."""
    taken = []
    for module in template.modules():
        saved = {key: module.__dict__.pop(key) for key in ("_diffusers_hook", "forward") if key in module.__dict__}
        taken.append((module, saved))
    try:
        return copy.deepcopy(template)
    finally:
        for module, saved in taken:
            module.__dict__.update(saved)


def fresh_block(template: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A block of ``template``'s configuration with freshly initialised weights (every submodule's own
    ``reset_parameters``), deterministic under ``seed``."""
    block = copy_block(template)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in block.modules():
            if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                module.reset_parameters()
    for p in block.parameters():
        p.requires_grad_(True)
    return block


class FeedbackModule(torch.nn.Module):
    """F (a block of the backbone's configuration) and the scales of the region's blocks, one per block
    (``"block"``) or one per channel of each block (``"channel"``), zero at initialisation."""

    def __init__(self, block: torch.nn.Module, region: tuple[int, int], scale: str, hidden_dim: int,
                 context_dim: int | None, card: dict[str, Any] | None = None) -> None:
        super().__init__()
        if scale not in SCALE_SHAPES:
            raise ValueError(f"scale must be one of {SCALE_SHAPES}, got {scale!r}.")
        self.block = block
        self.region = (int(region[0]), int(region[1]))
        self.scale = scale
        length = self.region[1] - self.region[0] + 1
        self.hidden_scales = torch.nn.Parameter(torch.zeros(length, hidden_dim if scale == "channel" else 1))
        self.context_scales = None if context_dim is None else \
            torch.nn.Parameter(torch.zeros(length, context_dim if scale == "channel" else 1))
        self.card: dict[str, Any] = dict(card or {})

    @classmethod
    def create(cls, model: torch.nn.Module, blocks: list[BlockInfo], region: tuple[int, int], scale: str,
               seed: int, hidden_dim: int, context_dim: int | None) -> FeedbackModule:
        first, last = region
        if not (0 <= first <= last < len(blocks)):
            raise ValueError(f"region {region} is not a range of block positions within 0..{len(blocks) - 1}.")
        if blocks[first].group != blocks[last].group:
            raise ValueError(f"region {region} spans two block lists ({blocks[first].group}, {blocks[last].group}); "
                             "the loop region must lie within one.")
        module = cls(fresh_block(blocks[last].module, seed), region, scale, hidden_dim, context_dim)
        return module.to(next(model.parameters()).dtype)

    def scale_for(self, stream: str, position: int, like: torch.Tensor) -> torch.Tensor:
        scales = self.hidden_scales if stream == "hidden" else self.context_scales
        return scales[position].to(like.dtype)

    # ---------------------------------------------------------------------------------------- files
    def save(self, folder: str | Path) -> Path:
        """``feedback.safetensors`` + ``feedback.json`` (the card) in ``folder``; each written to a temporary
        file and renamed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        temporary = folder / ".feedback.safetensors.tmp"
        save_file(tensors, str(temporary))
        temporary.replace(folder / "feedback.safetensors")
        card = {"format": FORMAT, "region": list(self.region), "scale": self.scale, **self.card}
        atomic_write(folder / "feedback.json", json.dumps(card, indent=2, default=str) + "\n")
        return folder

    @staticmethod
    def read_card(folder: str | Path) -> dict[str, Any]:
        folder = Path(folder)
        path = folder / "feedback.json"
        if not path.is_file() or not (folder / "feedback.safetensors").is_file():
            raise ValueError(f"{folder} holds no ILF feedback module (feedback.json + feedback.safetensors); "
                             "accel.train_feedback(...).save(dir) writes one.")
        try:
            card = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if card.get("format") != FORMAT:
            raise ValueError(f"{path} is format {card.get('format')!r}; this accel reads {FORMAT!r}.")
        return card

    @classmethod
    def load(cls, folder: str | Path, model: torch.nn.Module, blocks: list[BlockInfo]) -> FeedbackModule:
        """The module saved in ``folder``, built for ``model`` (its blocks ``blocks``): ``ValueError`` when the
        module was trained on another model."""
        card = cls.read_card(folder)
        check_model(card, model)
        region = tuple(card["region"])
        tensors = load_file(str(Path(folder) / "feedback.safetensors"))
        hidden = tensors["hidden_scales"].shape[1]
        context = tensors["context_scales"].shape[1] if "context_scales" in tensors else None
        module = cls(copy_block(blocks[region[1]].module), region, card["scale"], hidden, context, card)
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: the saved module does not fit this model's block "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
        return module.to(next(model.parameters()).dtype).eval().requires_grad_(False)


def check_model(card: dict[str, Any], model: torch.nn.Module) -> None:
    trained, here = card.get("model", {}), model_fingerprint(model)
    if trained.get("class") != here["class"] or trained.get("config") != here["config"]:
        raise ValueError(f"This feedback module was trained on a {trained.get('class')} with another configuration "
                         f"than this {here['class']}; train one for this model (accel.train_feedback).")
    if trained.get("weights_sha256") != here["weights_sha256"]:
        raise ValueError(f"This feedback module was trained on other weights of {here['class']} (weights hash "
                         f"{str(trained.get('weights_sha256'))[:12]} vs {here['weights_sha256'][:12]}); F learns "
                         "the frozen backbone's features, so train one for this checkpoint.")
