"""One timing protocol for the demo, ``accel-run`` and ``accel-eval``: warm-up outside the timed part, then
interleaved rounds (baseline, method 1, method 2, ..., baseline, ...), so machine drift hits every row alike.

A speedup is summarised by the median of its per-round ratios (baseline seconds / method seconds of the same
round) and their spread, min–max for fewer than 8 rounds and the interquartile range from 8 on. When the spread
reaches 1.0× the speedup is reported as "within noise".

    times = interleaved_timings({"baseline": call_a, "bac": call_b}, rounds=5, warmup=1)
    estimate = Speedup.from_times(times["baseline"], times["bac"])
    print(estimate.describe())        # 2.31× (2.10–2.52 min–max over 5 rounds)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

IQR_FROM_ROUNDS = 8


def interleaved_timings(calls: dict[str, Callable[[], Any]], rounds: int, *, warmup: int = 1,
                        on_round: Callable[[int, int], None] | None = None,
                        keep: Callable[[str, Any], None] | None = None,
                        rotate: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each entry of ``calls`` over ``rounds`` interleaved rounds after ``warmup`` untimed ones.

    With ``rotate`` round k starts at the k-th entry (then wraps around), so no row always runs right after the
    same one, or first after a pause. ``keep(label, output)`` receives each output of the first warm-up round (or
    the first round when ``warmup == 0``), so quality can be measured on calls that were made anyway.
    ``on_round(done, total)`` reports progress after every round."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}.")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}.")
    seconds: dict[str, list[float]] = {label: [] for label in calls}
    total = warmup + rounds
    order = list(calls.items())
    for index in range(total):
        shift = index % len(order) if rotate and order else 0
        for label, call in order[shift:] + order[:shift]:
            started = time.perf_counter()
            output = call()
            elapsed = time.perf_counter() - started
            if index == 0 and keep is not None:
                keep(label, output)
            if index >= warmup:
                seconds[label].append(elapsed)
        if on_round is not None:
            on_round(index + 1, total)
    return seconds


@dataclass(frozen=True)
class Spread:
    """Median and spread of a sample; ``kind`` is "min–max" or "IQR"."""

    median: float
    low: float
    high: float
    kind: str
    count: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = sorted(float(v) for v in values)
        if not values:
            raise ValueError("no values to summarise")
        if len(values) >= IQR_FROM_ROUNDS:
            low, high = np.percentile(values, [25, 75])
            kind = "IQR"
        else:
            low, high = values[0], values[-1]
            kind = "min–max"
        return cls(statistics.median(values), float(low), float(high), kind, len(values))

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "low": self.low, "high": self.high, "spread": self.kind, "n": self.count}


@dataclass(frozen=True)
class Speedup(Spread):
    """The speedup of a method over the baseline from interleaved rounds, with its spread."""

    @classmethod
    def from_times(cls, baseline_s: list[float], method_s: list[float]) -> Speedup:
        if len(baseline_s) != len(method_s) or not baseline_s:
            raise ValueError("speedups need the same number (≥ 1) of baseline and method rounds")
        spread = Spread.of(b / m for b, m in zip(baseline_s, method_s))
        return cls(spread.median, spread.low, spread.high, spread.kind, spread.count)

    @property
    def within_noise(self) -> bool:
        """True when the spread reaches 1.0×: the rounds do not agree that the method is faster (or slower)."""
        return self.low <= 1.0 <= self.high

    def describe(self) -> str:
        rounds = "round" if self.count == 1 else "rounds"
        text = f"{self.median:.2f}× ({self.low:.2f}–{self.high:.2f} {self.kind} over {self.count} {rounds})"
        return text + (", within noise" if self.within_noise and self.count > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "within_noise": self.within_noise}
