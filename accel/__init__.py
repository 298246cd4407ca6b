"""accel: make diffusers image and video pipelines faster and smaller with one call.

    pipe = accel.wrap(pipe, "bac")      # a preset name, a config object, or a list of them to stack
    schedule = accel.calibrate(pipe, "bac", inputs, num_inference_steps=20)  # methods with an offline pass
    accel.summary(pipe)                 # what was computed vs reused in the last call
    accel.unwrap(pipe)                  # bit-identical to never wrapped

Accelerators (one file each, registered on import): ``delta_dit`` (Δ-DiT), ``bac`` (BAC), ``adaspa`` (AdaSpa) and
``vmoba`` (VMoBA) block-sparse attention. Model-family knowledge
lives in ``accel.pipelines.adapters``.
"""

from .adaspa import AdaSpaConfig
from .api import calibrate, is_wrapped, summary, unwrap, wrap, wrap_calibrated
from .attention import AttentionCall
from .bac import BACConfig, BACSchedule
from .config import AccelConfig
from .delta_dit import DeltaDiTConfig
from .hooks import MethodScope, StepInfo
from .registry import available, register_accelerator, unregister_accelerator
from .summary import StepRecord, Summary
from .vmoba import VMoBAConfig

__all__ = [
    "AccelConfig",
    "AdaSpaConfig",
    "AttentionCall",
    "BACConfig",
    "BACSchedule",
    "DeltaDiTConfig",
    "MethodScope",
    "StepInfo",
    "StepRecord",
    "Summary",
    "VMoBAConfig",
    "available",
    "calibrate",
    "is_wrapped",
    "register_accelerator",
    "summary",
    "unregister_accelerator",
    "unwrap",
    "wrap",
    "wrap_calibrated",
]

__version__ = "0.1.0"
