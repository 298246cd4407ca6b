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

    def supports(self, family: str) -> bool:
        return self.families is None or family in self.families


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
) -> AcceleratorSpec:
    """Register an accelerator. ``presets`` maps names (``"bac"``, ``"bac-fast"``) to config factories; the
    method name itself is always a preset for ``config_cls()``. ``calibrate``, for methods that need an offline
    pass, backs ``accel.calibrate``; the artifact it returns is what the config takes as its ``artifact_field``.
    ``trained_with`` names the function a method needs run first (a training, minutes long): runners that apply
    every method (``accel-run --methods all``, the demo) leave such a method out and say so."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, AccelConfig)) or not config_cls.method:
        raise ValueError(f"{config_cls!r} must be an AccelConfig subclass with a non-empty `method` name.")
    if calibrate is not None and artifact_field not in getattr(config_cls, "__dataclass_fields__", {}):
        raise ValueError(f"{config_cls.__name__} has no field {artifact_field!r} to take its calibration's artifact.")
    presets = {config_cls.method: config_cls, **(presets or {})}
    spec = AcceleratorSpec(
        config_cls.method, config_cls, apply, description, tuple(families) if families is not None else None, presets,
        calibrate, artifact_field, trained_with,
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


def calibrating() -> list[AcceleratorSpec]:
    """The registered accelerators that have an offline calibration (``accel.calibrate``)."""
    return [spec for spec in registered() if spec.calibrate is not None]


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
    """Every registered accelerator: name, one-line description, supported families and preset names."""
    from accel.pipelines.adapters import FAMILY_NAMES

    return [
        {
            "name": spec.name,
            "description": spec.description,
            "families": list(spec.families) if spec.families is not None else list(FAMILY_NAMES),
            "presets": sorted(spec.presets),
            "trained_with": spec.trained_with,
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
