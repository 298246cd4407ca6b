"""What the methods that train or calibrate on recorded calls share: recorded call arguments (``detached``) and
batches of them (``collate``), the fingerprint of the backbone a module was trained on, and resumable training
checkpoints (parameters, optimizer state, step and loss history in safetensors + JSON, written atomically: a run
killed mid-write resumes from the previous checkpoint)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from accel.io import atomic_write


def detached(value):
    """A copy of recorded call arguments that later in-place updates and autograd cannot reach."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: detached(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detached(item) for item in value)
    return copy.copy(value)


def _batch_size(args: tuple, kwargs: dict) -> int:
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    return hidden.shape[0]


def _merge(values: list, sizes: list[int]):
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.ndim == 0:
            if all(torch.equal(v, first) for v in values):
                return first
            return torch.cat([v.reshape(1).expand(size) for v, size in zip(values, sizes)])
        if all(v.shape[0] == size for v, size in zip(values, sizes)):
            return torch.cat(values)
        return first
    if isinstance(first, dict):
        return {key: _merge([v[key] for v in values], sizes) for key in first}
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], torch.Tensor):
        return type(first)(_merge([v[i] for v in values], sizes) for i in range(len(first)))
    return first


def collate(records: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
    """One denoiser call from several recorded ones: batched tensors concatenated, per-call scalars expanded."""
    sizes = [_batch_size(args, kwargs) for args, kwargs in records]
    args = tuple(_merge([r[0][i] for r in records], sizes) for i in range(len(records[0][0])))
    kwargs = {key: _merge([r[1][key] for r in records], sizes) for key in records[0][1]}
    return args, kwargs


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What identifies a backbone: its class, its config and a hash of its weights (the first 1,024 values of every
    tensor, so a 12B model hashes in well under a second)."""
    config = {k: v for k, v in dict(getattr(model, "config", {})).items() if not k.startswith("_")}
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    return {"class": type(model).__name__, "config": json.loads(json.dumps(config, default=str)),
            "weights_sha256": digest.hexdigest()}


def save_checkpoint(folder: Path, format_name: str, key: str, step: int, params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, losses: list[float]) -> None:
    """Write ``params`` and their optimizer state after ``step`` training steps. ``key`` identifies what is
    trained (model, settings, data), so that a checkpoint is never resumed into another training."""
    tensors = {f"param/{name}": p.detach().contiguous() for name, p in params.items()}
    for name, p in params.items():
        for slot, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{name}/{slot}"] = value.detach().reshape(value.shape or (1,)).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / ".checkpoint.safetensors.tmp"
    save_file(tensors, str(temporary))
    temporary.replace(folder / "checkpoint.safetensors")
    atomic_write(folder / "checkpoint.json",
                 json.dumps({"format": format_name, "key": key, "step": step, "losses": losses}) + "\n")


def load_checkpoint(folder: Path, format_name: str, key: str, params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, what: str = "training",
                    other: str = "another model or other settings") -> tuple[int, list[float]]:
    """Restore what ``save_checkpoint`` wrote into ``params`` and ``optimizer``; (0, []) when ``folder`` holds none.
    A checkpoint of another training (``format_name`` or ``key`` differ) raises ``ValueError``."""
    card = folder / "checkpoint.json"
    if not card.is_file() or not (folder / "checkpoint.safetensors").is_file():
        return 0, []
    meta = json.loads(card.read_text())
    if meta.get("format") != format_name or meta.get("key") != key:
        raise ValueError(f"{folder} holds a {what} checkpoint of {other}; pass an empty checkpoint_dir or delete "
                         "it.")
    tensors = load_file(str(folder / "checkpoint.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    for name, p in params.items():
        slots = {slot.rpartition("/")[2]: value for slot, value in tensors.items()
                 if slot.startswith(f"optimizer/{name}/") and slot.count("/") == name.count("/") + 2}
        if slots:
            if "step" in slots:
                slots["step"] = slots["step"].reshape(())
            optimizer.state[p] = slots
    return int(meta["step"]), list(meta.get("losses", []))
