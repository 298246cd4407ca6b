"""The base class of every accelerator config, and the validators they share.

A config is a dataclass whose fields are plain JSON values. It validates itself on construction (``ValueError``
naming the field, the bad value and what is accepted), round-trips through ``to_dict`` / ``from_dict``, and names
its method in the class variable ``method`` (the key the registry and saved files use).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar


@dataclasses.dataclass
class AccelConfig:
    """Base of all accelerator configs. Subclasses set ``method`` and override ``validate``."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for any out-of-range field. Called on construction and by ``replace``."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccelConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}.")
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{cls.__name__}.from_dict got a config for method {method!r}, expected {cls.method!r}.")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; fields: {', '.join(sorted(known))}."
            )
        return cls(**data)

    def replace(self, **changes: Any) -> AccelConfig:
        """A copy with ``changes`` applied and validated; unknown field names raise ``ValueError``."""
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no field(s) {', '.join(map(repr, unknown))}; "
                f"fields: {', '.join(sorted(known))}."
            )
        return dataclasses.replace(self, **changes)


def _describe(name: str, value: Any) -> str:
    return f"{name}={value!r}"


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> None:
    """``value`` must be an int (not a bool) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_describe(name, value)} must be an integer.")
    _check_range(name, value, minimum, maximum)


def check_float(
    name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None, open_min: bool = False
) -> None:
    """``value`` must be a finite real number in [minimum, maximum] (or (minimum, maximum] with ``open_min``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_describe(name, value)} must be a finite number.")
    if open_min and minimum is not None and value <= minimum:
        raise ValueError(f"{_describe(name, value)} must be greater than {minimum}.")
    _check_range(name, value, minimum, maximum)


MAX_BLOCK_SIZE = 1024  # tokens; a block-sparse kernel block larger than this is a dense call that allocates more


def check_block_size(name: str, value: Any) -> None:
    """``value`` must be a power of two from 16 to ``MAX_BLOCK_SIZE`` (an attention kernel's block, in tokens)."""
    check_int(name, value, minimum=16, maximum=MAX_BLOCK_SIZE)
    if value & (value - 1):
        raise ValueError(f"{_describe(name, value)} must be a power of two from 16 to {MAX_BLOCK_SIZE}.")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{_describe(name, value)} is not accepted; choose one of {', '.join(map(repr, choices))}.")


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"{_describe(name, value)} must be at least {minimum}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{_describe(name, value)} must be at most {maximum}.")
