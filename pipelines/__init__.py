"""Model-family adapters (``pipelines.adapters``), offline tiny pipelines (``pipelines.tiny``) and offline
tokenizers (``pipelines.tokenizers``)."""

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
