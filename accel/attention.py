"""Attention interception: let an accelerator replace the attention computation of chosen attention modules.

One mechanism serves every processor style. A diffusers ``ModelHook`` on the attention module runs the module's
own forward -- and so its own, unmodified processor, with its real signature and every kwarg -- inside a
thread-local ``TorchFunctionMode`` that catches the processor's ``F.scaled_dot_product_attention`` call and hands
it to the accelerator as an ``AttentionCall``. Processors that call SDPA directly (DiT, PixArt, SD3, CogVideoX,
HunyuanVideo, U-Net) and those that go through diffusers' attention dispatcher (Flux, Wan, newer ones) both end
in that call; q/k/v arrive as [B, H, S, D] after the processor's projections, norms and rotary embeddings.

Nothing is patched process-wide: the mode is pushed only inside the hooked module's forward, in the calling
thread, during a call of the wrapped pipeline. Limits: a dispatcher processor set to a non-native backend
(flash-attn, sage, flex) never calls torch's SDPA, so ``check_interceptable`` refuses it with a ``ValueError``;
under ``torch.compile`` the hooked attention modules run eagerly (graph breaks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from .steps import StepInfo

_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class AttentionCall:
    """One SDPA call inside an intercepted attention module. Tensors are [batch, heads, tokens, head_dim]."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool
    module_name: str
    kind: str  # "self_attn", "cross_attn" or "joint_attn"
    index: int  # n-th SDPA call within this module call (IP-adapter style processors make more than one)
    step: StepInfo | None

    def dense(self) -> torch.Tensor:
        """The computation the processor asked for, unchanged."""
        return F.scaled_dot_product_attention(
            self.query, self.key, self.value, attn_mask=self.attn_mask, dropout_p=self.dropout_p,
            is_causal=self.is_causal, scale=self.scale, enable_gqa=self.enable_gqa,
        )


AttentionReplacement = Callable[[AttentionCall], torch.Tensor]


class _SDPARedirect(TorchFunctionMode):
    def __init__(self, replacement: AttentionReplacement, module_name: str, kind: str, step) -> None:
        super().__init__()
        self.replacement = replacement
        self.module_name = module_name
        self.kind = kind
        self.step = step
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        bound = dict(_SDPA_DEFAULTS, **dict(zip(_SDPA_PARAMETERS, args)), **kwargs)
        call = AttentionCall(
            **{name: bound[name] for name in _SDPA_PARAMETERS}, module_name=self.module_name, kind=self.kind,
            index=self.calls, step=self.step,
        )
        self.calls += 1
        return self.replacement(call)


def intercept_sdpa(replacement: AttentionReplacement, module_name: str = "", kind: str = "self_attn",
                   step=None) -> TorchFunctionMode:
    """A context in which this thread's ``F.scaled_dot_product_attention`` calls go to ``replacement`` as
    ``AttentionCall``s, with no hook on any module (measurement tools; accelerators use the hooks below)."""
    return _SDPARedirect(replacement, module_name, kind, step)


class _Scope(Protocol):  # what the hook reads of ``accel.hooks.MethodScope``
    current: StepInfo | None

    def is_active(self) -> bool: ...


class AttentionInterceptHook(ModelHook):
    def __init__(self, scope: _Scope, replacement: AttentionReplacement, *, kind: str, name: str) -> None:
        super().__init__()
        self.scope = scope
        self.replacement = replacement
        self.kind = kind
        self.name = name

    def new_forward(self, module, *args, **kwargs):
        if not self.scope.is_active():
            return self.fn_ref.original_forward(*args, **kwargs)
        with _SDPARedirect(self.replacement, self.name, self.kind, self.scope.current):
            return self.fn_ref.original_forward(*args, **kwargs)


def _is_native(backend) -> bool:
    value = getattr(backend, "value", backend)
    return value is None or str(value).lstrip("_").startswith("native")


def check_interceptable(module: torch.nn.Module, name: str = "") -> None:
    """Raise ``ValueError`` if ``module``'s attention would not reach torch's SDPA."""
    processor = getattr(module, "processor", None)
    if processor is None:
        raise ValueError(f"{name or type(module).__name__} has no attention processor to intercept.")
    if not hasattr(processor, "_attention_backend"):
        return  # this processor calls F.scaled_dot_product_attention directly
    backend = processor._attention_backend
    if backend is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend = _AttentionBackendRegistry.get_active_backend()[0]
        except (ImportError, AttributeError):
            backend = None
    if not _is_native(backend):
        raise ValueError(
            f"The attention of {name or type(module).__name__} runs on the {getattr(backend, 'value', backend)!r} "
            "backend, which accel cannot intercept; use the native backend (`set_attention_backend('native')`)."
        )
