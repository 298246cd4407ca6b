"""The accelerators, one file (or, with a calibration, one folder) each, registered on import:
``delta_dit`` (Δ-DiT), ``bac`` (BAC), ``adaspa`` (AdaSpa), ``vmoba`` (VMoBA), ``quest`` (QuEST low-bit
quantization), ``ilf`` (ILF feedback modules, trained) and ``afa`` (AFA ensembling, aggregator trained);
``trained`` is what the trained methods share; ``sparse_tokens`` is what the two
sparse-attention methods share. Each has the same anatomy: a module docstring (what, paper, departures, the figure
it reaches and the command that measures it), its config, its per-call state, its hooks, ``apply_*`` and its
registration. ``CONTRIBUTING.md`` says how to add one.
"""

from . import adaspa, afa, bac, delta_dit, ilf, quest, vmoba

__all__ = ["adaspa", "afa", "bac", "delta_dit", "ilf", "quest", "vmoba"]
