"""A working config of every registered accelerator on the tiny DiT, trained artifacts included (cached)."""

from __future__ import annotations

from test_afa import member
from test_afa import trained as trained_aggregator
from test_ilf import trained as trained_feedback
from test_quest import calibrated

from accel.methods.adaspa import AdaSpaConfig
from accel.methods.afa import AFAConfig
from accel.methods.bac import BACConfig
from accel.methods.delta_dit import DeltaDiTConfig
from accel.methods.ilf import ILFConfig
from accel.methods.quest import QuESTConfig
from accel.methods.vmoba import VMoBAConfig

FAMILY = "dit"


def config(name: str):
    """A config of the accelerator ``name`` that applies to ``tiny.build("dit")`` (AFA: a fresh member each call)."""
    if name == "adaspa":
        return AdaSpaConfig(sparsity=0.5, block_size=16)
    if name == "afa":
        return AFAConfig(members=[member(FAMILY)], aggregator=trained_aggregator(FAMILY))
    if name == "bac":
        return BACConfig(budget=0.5, calibrate=False)
    if name == "delta-dit":
        return DeltaDiTConfig(interval=2, boundary=0.5, cached_fraction=0.5)
    if name == "ilf":
        return ILFConfig(module=trained_feedback(FAMILY))
    if name == "quest":
        return QuESTConfig(artifact=calibrated(FAMILY)[1])
    if name == "vmoba":
        return VMoBAConfig(block_size=16, dense_above=1.0)  # tiny selections would run dense
    raise KeyError(name)
