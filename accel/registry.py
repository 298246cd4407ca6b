"""The accelerator registry, keyed by config type (torchao style).

Each accelerator file registers its config class with the function that applies it, a one-line description, the
families it supports and its named presets. ``resolve`` turns what a user passes to ``accel.wrap`` (a preset
name, a config object, or a list of them) into validated config objects, or raises ``ValueError`` before any
pipeline is touched.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import AccelConfig

if TYPE_CHECKING:
    from .hooks import MethodScope


@dataclass(frozen=True)
class AcceleratorSpec:
    name: str
    config_cls: type[AccelConfig]
    apply: Callable[[MethodScope, AccelConfig], None]
    description: str
    families: tuple[str, ...] | None  # None: every family accel has an adapter for
    presets: dict[str, Callable[[], AccelConfig]]
    calibrate: Callable[..., Any] | None = None  # (pipe, config, inputs, *, num_inference_steps, progress) -> artifact
    artifact_field: str = "schedule"  # the config field that takes what ``calibrate`` returns
    trained_with: str | None = None  # the function that makes what the method loads (ILF: a trained module)
    role: str | None = None  # one of STACKING_ROLES: what the method does to the model, for the stacking rules
    structural: bool = False  # needs only blocks and branches: applies to an adapter inferred from the module tree

    def supports(self, family: str) -> bool:
        return self.families is None or family in self.families

    def supports_adapter(self, adapter) -> bool:
        """Whether the method applies to ``adapter``'s family, or, for an inferred adapter, works structurally."""
        return self.supports(adapter.name) or (getattr(adapter, "inferred", False) and self.structural)


# What a method does to the model. Two methods of one role do not stack, except caching methods (Δ-DiT's block
# reuse and BAC's branch reuse compose: BAC leaves blocks another method hooks to it); nor do the pairs below.
STACKING_ROLES = ("ensembling", "caching", "sparse attention", "quantization", "feedback")
_SAME_ROLE = {
    "sparse attention": "both replace the attention computation of the same attention modules",
}
_STACKS_WITH_ITS_OWN_ROLE = {"caching"}
_PAIR_CONFLICTS = {
    frozenset({"feedback", "caching"}): "{feedback} re-runs the blocks of its loop within one forward, and {caching} "
                                        "keeps per-step state for every block: it would see each looped block twice",
}

_SPECS: dict[type[AccelConfig], AcceleratorSpec] = {}
_PRESETS: dict[str, AcceleratorSpec] = {}
_LOCK = threading.Lock()


def register_accelerator(
    config_cls: type[AccelConfig],
    apply: Callable[[MethodScope, AccelConfig], None],
    *,
    description: str,
    families: Iterable[str] | None = None,
    presets: dict[str, Callable[[], AccelConfig]] | None = None,
    calibrate: Callable[..., Any] | None = None,
    artifact_field: str = "schedule",
    trained_with: str | None = None,
    role: str | None = None,
    structural: bool = False,
) -> AcceleratorSpec:
    """Register an accelerator. ``presets`` maps names (``"bac"``, ``"bac-fast"``) to config factories; the
    method name itself is always a preset for ``config_cls()``. ``calibrate``, for methods that need an offline
    pass, backs ``accel.calibrate``; the artifact it returns is what the config takes as its ``artifact_field``.
    ``trained_with`` names the function a method needs run first (a training, minutes long): runners that apply
    every method (``accel-run --methods all``, the demo) leave such a method out and say so. ``role`` (one of
    ``STACKING_ROLES``) is what ``stacking_conflict`` reasons about; a method without one stacks with anything.
    ``structural``: the method needs only the blocks and their branches, so it applies to a denoiser whose adapter
    was inferred from its module tree (``accel.pipelines.adapters.infer_adapter``)."""
    if role is not None and role not in STACKING_ROLES:
        raise ValueError(f"role must be one of {', '.join(STACKING_ROLES)} or None, got {role!r}.")
    if not (isinstance(config_cls, type) and issubclass(config_cls, AccelConfig)) or not config_cls.method:
        raise ValueError(f"{config_cls!r} must be an AccelConfig subclass with a non-empty `method` name.")
    if calibrate is not None and artifact_field not in getattr(config_cls, "__dataclass_fields__", {}):
        raise ValueError(f"{config_cls.__name__} has no field {artifact_field!r} to take its calibration's artifact.")
    presets = {config_cls.method: config_cls, **(presets or {})}
    spec = AcceleratorSpec(
        config_cls.method, config_cls, apply, description, tuple(families) if families is not None else None, presets,
        calibrate, artifact_field, trained_with, role, structural,
    )
    with _LOCK:
        taken = [name for name in presets if name in _PRESETS and _PRESETS[name].config_cls is not config_cls]
        if taken:
            raise ValueError(f"Preset name(s) {', '.join(taken)} already belong to another accelerator.")
        _SPECS[config_cls] = spec
        _PRESETS.update({name: spec for name in presets})
    return spec


def unregister_accelerator(config_cls: type[AccelConfig]) -> None:
    with _LOCK:
        spec = _SPECS.pop(config_cls, None)
        if spec is not None:
            for name in spec.presets:
                _PRESETS.pop(name, None)


def spec_for(config: AccelConfig) -> AcceleratorSpec:
    spec = _SPECS.get(type(config))
    if spec is None:
        known = ", ".join(sorted(cls.__name__ for cls in _SPECS)) or "none registered"
        raise ValueError(f"{type(config).__name__} is not a registered accelerator config (known: {known}).")
    return spec


def registered() -> list[AcceleratorSpec]:
    """Every registered accelerator's spec, by name."""
    with _LOCK:
        return sorted(_SPECS.values(), key=lambda spec: spec.name)


def config_class(method: str) -> type[AccelConfig]:
    """The config class of the registered accelerator named ``method`` (a saved config's ``"method"``)."""
    spec = _PRESETS.get(method)
    if spec is None or spec.name != method:
        known = ", ".join(spec.name for spec in registered())
        raise ValueError(f"No registered accelerator is named {method!r}; known: {known}.")
    return spec.config_cls


def calibrating() -> list[AcceleratorSpec]:
    """The registered accelerators that have an offline calibration (``accel.calibrate``)."""
    return [spec for spec in registered() if spec.calibrate is not None]


def stacking_conflict(stack: list[AcceleratorSpec]) -> str | None:
    """Why the methods of ``stack`` (in the order they are applied) cannot be stacked, or ``None`` if they can.

    Ensembling must come first (the others act on the ensemble's blocks); two methods of one role do not stack,
    caching methods excepted; feedback and caching do not stack (``_PAIR_CONFLICTS``). ``accel.wrap`` raises
    ``ValueError`` with this text."""
    for index, spec in enumerate(stack):
        if spec.role == "ensembling" and index > 0:
            before = ", ".join(other.name for other in stack[:index])
            return (f"{spec.name} must be applied first (before {before}): the other methods act on the ensemble's "
                    f"blocks. Wrap with {spec.name} first.")
        for other in stack[:index]:
            if spec.role is None or other.role is None:
                continue
            if spec.role == other.role and spec.role not in _STACKS_WITH_ITS_OWN_ROLE:
                reason = _SAME_ROLE.get(spec.role, f"both are {spec.role} methods; use one")
                return f"{other.name} and {spec.name} do not stack: {reason}."
            reason = _PAIR_CONFLICTS.get(frozenset({spec.role, other.role}))
            if reason is not None:
                names = {spec.role: spec.name, other.role: other.name}
                return f"{other.name} and {spec.name} do not stack: " + reason.format(**{
                    role.replace(" ", "_"): name for role, name in names.items()}) + "."
    return None


def stacking_warning(stack: list[AcceleratorSpec]) -> str | None:
    """What ``accel.wrap`` logs as a warning for a stack that runs but whose methods interfere, or ``None``."""
    caching = [spec.name for spec in stack if spec.role == "caching"]
    if len(caching) > 1:
        return (f"{' and '.join(caching)} both reuse computation across steps: on a step where one reuses a block, "
                "the other's state for that block is not updated, and it reuses or extrapolates older outputs; "
                "their errors compound rather than add (docs/benchmarks/stacking.md measures it). Prefer one.")
    return None


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def _config_from_name(name: str) -> AccelConfig:
    spec = _PRESETS.get(name)
    if spec is None:
        known = preset_names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(known) if known else "none are registered"
        raise ValueError(f"Unknown accelerator {name!r}.{hint} Known names: {listing}.")
    return spec.presets[name]()


def resolve(methods: Any, overrides: dict[str, Any] | None = None) -> list[AccelConfig]:
    """Validated configs for ``methods`` (a name, a config, or a list of them), with ``overrides`` applied to
    every config that has the field. An override that no config has raises ``ValueError``."""
    if isinstance(methods, (str, AccelConfig)):
        methods = [methods]
    if not isinstance(methods, (list, tuple)):
        raise ValueError(
            f"methods must be a preset name, an accelerator config, or a list of them; got {type(methods).__name__}."
        )
    configs: list[AccelConfig] = []
    for item in methods:
        if isinstance(item, str):
            configs.append(_config_from_name(item))
        elif isinstance(item, AccelConfig):
            spec_for(item)
            configs.append(item)
        else:
            raise ValueError(f"Cannot use {item!r} as an accelerator: pass a preset name or an AccelConfig.")
    seen: set[type] = set()
    for config in configs:
        if type(config) in seen:
            raise ValueError(f"{config.method!r} appears twice; each accelerator can be applied once.")
        seen.add(type(config))
    overrides = dict(overrides or {})
    if overrides:
        used: set[str] = set()
        for index, config in enumerate(configs):
            names = {f for f in overrides if f in config.__dataclass_fields__}
            if names:
                configs[index] = config.replace(**{f: overrides[f] for f in names})
                used |= names
        unused = sorted(set(overrides) - used)
        if unused:
            fields = sorted({f for config in configs for f in config.__dataclass_fields__})
            raise ValueError(
                f"Override(s) {', '.join(unused)} match no field of the chosen accelerators; fields: "
                f"{', '.join(fields) or 'none'}."
            )
    return configs


def available() -> list[dict[str, Any]]:
    """Every registered accelerator: name, one-line description, the families it declares, preset names, and whether
    it applies to adapters inferred from a module tree (with the ones inferred so far in this process)."""
    from accel.pipelines.adapters import FAMILY_NAMES, inferred_families

    inferred = inferred_families()
    return [
        {
            "name": spec.name,
            "description": spec.description,
            "families": list(spec.families) if spec.families is not None else list(FAMILY_NAMES),
            "presets": sorted(spec.presets),
            "trained_with": spec.trained_with,
            "role": spec.role,
            "structural_fallback": spec.structural,  # also applies to a denoiser with an inferred adapter
            "inferred_families": inferred if spec.structural else [],  # those inferred so far in this process
        }
        for spec in registered()
    ]


def parse_method_list(text: str) -> list[tuple[str, list[str]]]:
    """A command line's ``--methods``: ``"all"`` (every registered accelerator, one row each), or rows separated by
    ``,``, each one name or several stacked with ``+`` (``"baseline,bac,bac+vmoba"``) -> [(row label, names)].

    Names are not resolved here (``resolve`` does that; ``"baseline"`` is the eval harness's own row). Raises
    ``ValueError`` for an empty list or a row given twice.
    """
    if text.strip() == "all":
        return [(spec.name, [spec.name]) for spec in registered()]
    rows = [(item, [name.strip() for name in item.split("+")])
            for item in (part.strip() for part in text.split(",")) if item]
    if not rows:
        raise ValueError("--methods is empty; give e.g. baseline,delta-dit,bac (stack with '+': bac+vmoba), or all.")
    labels = [label for label, _ in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--methods lists a method twice: {text!r}.")
    return rows
