"""Where the denoising loop is: ``StepInfo``, what every accelerator hook and intercepted attention call reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from accel.pipelines.adapters import TokenLayout


@dataclass
class StepInfo:
    """Where the denoising loop is, for the denoiser forward that is running now."""

    step: int  # 0-based index of the denoising step
    num_steps: int | None  # length of the scheduler's timestep schedule for this call
    branch: str  # CFG branch: cache_context name, or "call{k}" for the k-th denoiser call of this step
    call_in_step: int
    denoiser: str  # pipeline attribute of the running denoiser ("transformer", "transformer_2", "unet")
    _layout_fn: Callable[[], TokenLayout]
    _layout: TokenLayout | None = None

    @property
    def layout(self) -> TokenLayout:
        """Token layout of this forward (computed on first use)."""
        if self._layout is None:
            self._layout = self._layout_fn()
        return self._layout
