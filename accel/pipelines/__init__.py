"""Model-family adapters (``accel.pipelines.adapters``), offline tiny pipelines (``accel.pipelines.tiny``) and offline
tokenizers (``accel.pipelines.tokenizers``)."""

from .adapters import (
    ADAPTERS,
    FAMILY_NAMES,
    BlockInfo,
    FamilyAdapter,
    TokenLayout,
    adapter_for,
    get_adapter,
    ready_for_inference,
)

__all__ = ["ADAPTERS", "FAMILY_NAMES", "BlockInfo", "FamilyAdapter", "TokenLayout", "adapter_for", "get_adapter",
           "ready_for_inference"]
