"""What ran in the last pipeline call: per step and CFG branch, blocks, branches and attention computed vs reused.

The counts are measured, not declared: accel counts every block and branch forward that really executed (its
counters sit innermost, under every accelerator hook) and every attention call an accelerator reported a density
for. ``accel.summary(pipe)`` returns a ``Summary``; benchmarks and the demo print it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StepRecord:
    """Counts for one (denoising step, CFG branch)."""

    step: int
    branch: str
    forwards: int = 0  # denoiser forwards in this step and branch
    blocks_computed: int = 0
    blocks_total: int = 0
    branches_computed: int = 0
    branches_total: int = 0
    attention_calls: int = 0  # attention branch forwards that executed
    attention_reported: int = 0  # of those, how many an accelerator reported a density for
    attention_density_sum: float = 0.0

    @property
    def attention_density(self) -> float | None:
        """Mean share of the attention matrix computed; unreported calls count as dense (1.0)."""
        if not self.attention_calls:
            return None
        dense = self.attention_calls - self.attention_reported
        return (self.attention_density_sum + dense) / self.attention_calls


@dataclass
class Summary:
    """What is applied to a pipeline and, for its last call, what was computed vs reused."""

    family: str
    methods: list[dict[str, Any]]
    steps: list[StepRecord] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # accelerator-specific figures, by method name

    @property
    def blocks_computed_share(self) -> float | None:
        total = sum(r.blocks_total for r in self.steps)
        return sum(r.blocks_computed for r in self.steps) / total if total else None

    @property
    def branches_computed_share(self) -> float | None:
        total = sum(r.branches_total for r in self.steps)
        return sum(r.branches_computed for r in self.steps) / total if total else None

    @property
    def attention_density(self) -> float | None:
        calls = sum(r.attention_calls for r in self.steps)
        if not calls:
            return None
        return sum((r.attention_density or 0.0) * r.attention_calls for r in self.steps) / calls

    def to_dict(self) -> dict[str, Any]:
        steps = [{**asdict(r), "attention_density": r.attention_density} for r in self.steps]
        return {
            "family": self.family,
            "methods": self.methods,
            "blocks_computed_share": self.blocks_computed_share,
            "branches_computed_share": self.branches_computed_share,
            "attention_density": self.attention_density,
            "steps": steps,
            "extras": self.extras,
        }

    def __str__(self) -> str:
        names = " + ".join(m["method"] for m in self.methods) or "nothing"
        lines = [f"accel on {self.family}: {names}"]
        if not self.steps:
            return "\n".join(lines + ["(no call yet)"])
        lines.append(f"{'step':>4}  {'branch':<12} {'blocks':>9}  {'branches':>9}  {'attn density':>12}")
        for r in self.steps:
            density = "-" if r.attention_density is None else f"{r.attention_density:.3f}"
            lines.append(
                f"{r.step:>4}  {r.branch:<12} {r.blocks_computed:>4}/{r.blocks_total:<4}  "
                f"{r.branches_computed:>4}/{r.branches_total:<4}  {density:>12}"
            )
        share = self.blocks_computed_share
        lines.append(f"blocks computed: {share:.1%}" if share is not None else "blocks computed: -")
        return "\n".join(lines)


class CallRecorder:
    """Collects ``StepRecord``s during one pipeline call."""

    def __init__(self) -> None:
        self.records: dict[tuple[int, str], StepRecord] = {}
        self.current: StepRecord | None = None

    def begin_forward(self, step: int, branch: str, blocks: int, branches: int) -> None:
        record = self.records.get((step, branch))
        if record is None:
            record = self.records[(step, branch)] = StepRecord(step, branch)
        record.forwards += 1
        record.blocks_total += blocks
        record.branches_total += branches
        self.current = record

    def finish(self) -> list[StepRecord]:
        records = sorted(self.records.values(), key=lambda r: (r.step, r.branch))
        self.records, self.current = {}, None
        return records
