"""accel: make diffusers image and video pipelines faster and smaller with one call.

    pipe = accel.wrap(pipe, "bac")      # a preset name, a config object, or a list of them to stack
    schedule = accel.calibrate(pipe, "bac", inputs, num_inference_steps=20)  # methods with an offline pass
    accel.summary(pipe)                 # what was computed vs reused in the last call
    accel.unwrap(pipe)                  # bit-identical to never wrapped

Accelerators live in ``accel.methods`` (registered on import): ``delta_dit`` (Δ-DiT), ``bac`` (BAC), ``adaspa``
(AdaSpa) and ``vmoba`` (VMoBA) block-sparse attention, ``quest`` (QuEST W8A8 / W4A8 / W4A4 quantization);
``hierarchical_prune`` (HierarchicalPrune) makes a smaller model instead of wrapping one:

    report = accel.analyze_contributions(pipe, inputs)          # what removing each block / branch costs
    pruned = accel.prune(pipe, report, target=6, inputs=inputs)  # remove 6 later blocks, distil the rest

``ilf`` (ILF) wraps with a feedback module trained first:

    accel.train_feedback(pipe, inputs, num_inference_steps=20).save(dir)   # then sample in 10 steps:
    accel.wrap(pipe, "ilf", module=dir)

``afa`` (AFA) ensembles same-architecture pipelines, mixed block by block by an aggregator trained first:

    accel.train_aggregator([pipe_a, pipe_b], batches).save(dir)
    pipe = accel.ensemble([pipe_a, pipe_b], aggregator=dir)

Model-family knowledge lives in ``accel.pipelines.adapters``; the plugin contract (``MethodScope``, ``StepInfo``,
``BranchStates``) in ``accel.hooks``.
"""

from .api import calibrate, ensemble, is_wrapped, summary, unwrap, wrap, wrap_calibrated
from .attention import AttentionCall
from .config import AccelConfig
from .hooks import BranchStates, MethodScope
from .methods.adaspa import AdaSpaConfig
from .methods.afa import AFAConfig, Aggregator, AggregatorSettings, train_aggregator
from .methods.bac import BACConfig, BACSchedule
from .methods.delta_dit import DeltaDiTConfig
from .methods.hierarchical_prune import ContributionReport, analyze_contributions, load_pruned, prune
from .methods.ilf import FeedbackModule, FeedbackSettings, ILFConfig, train_feedback
from .methods.quest import QuESTArtifact, QuESTConfig
from .methods.vmoba import VMoBAConfig
from .registry import available, register_accelerator, unregister_accelerator
from .steps import StepInfo
from .summary import StepRecord, Summary
from .tune import Trial, TuneResult, tune

__all__ = [
    "AFAConfig",
    "AccelConfig",
    "AdaSpaConfig",
    "Aggregator",
    "AggregatorSettings",
    "AttentionCall",
    "BACConfig",
    "BACSchedule",
    "BranchStates",
    "ContributionReport",
    "DeltaDiTConfig",
    "FeedbackModule",
    "FeedbackSettings",
    "ILFConfig",
    "MethodScope",
    "QuESTArtifact",
    "QuESTConfig",
    "StepInfo",
    "StepRecord",
    "Summary",
    "Trial",
    "TuneResult",
    "VMoBAConfig",
    "analyze_contributions",
    "available",
    "calibrate",
    "ensemble",
    "is_wrapped",
    "load_pruned",
    "prune",
    "register_accelerator",
    "summary",
    "train_aggregator",
    "train_feedback",
    "tune",
    "unregister_accelerator",
    "unwrap",
    "wrap",
    "wrap_calibrated",
]

__version__ = "0.1.0"
