"""The shared timing protocol: interleaving, warm-up outside the timed part, median and spread of speedups."""

import pytest

from accel.eval.timing import Speedup, Spread, interleaved_timings


def test_rounds_are_interleaved_and_the_warmup_is_not_timed():
    order, kept = [], {}
    calls = {"baseline": lambda: order.append("b") or "B", "method": lambda: order.append("m") or "M"}
    seconds = interleaved_timings(calls, rounds=3, warmup=2, keep=kept.__setitem__)
    assert order == ["b", "m"] * 5
    assert {label: len(times) for label, times in seconds.items()} == {"baseline": 3, "method": 3}
    assert kept == {"baseline": "B", "method": "M"}


def test_speedup_is_the_median_of_paired_ratios_with_min_max_spread():
    estimate = Speedup.from_times([2.0, 2.0, 3.0], [1.0, 0.5, 1.0])
    assert (estimate.median, estimate.low, estimate.high, estimate.kind) == (3.0, 2.0, 4.0, "min–max")
    assert not estimate.within_noise and "within noise" not in estimate.describe()


def test_a_spread_that_reaches_one_is_within_noise():
    estimate = Speedup.from_times([1.0, 1.0, 1.0], [0.8, 1.1, 0.9])
    assert estimate.within_noise and estimate.describe().endswith("within noise")


def test_eight_rounds_or_more_use_the_interquartile_range():
    spread = Spread.of(range(1, 9))
    assert spread.kind == "IQR" and spread.low == pytest.approx(2.75) and spread.high == pytest.approx(6.25)


@pytest.mark.parametrize("rounds, warmup", [(0, 1), (2, -1)])
def test_bad_round_counts_are_refused(rounds, warmup):
    with pytest.raises(ValueError):
        interleaved_timings({"a": lambda: None}, rounds=rounds, warmup=warmup)


def test_rotated_rounds_start_one_entry_later_each_time():
    ran: list[str] = []
    calls = {name: (lambda name=name: ran.append(name)) for name in "abc"}
    seconds = interleaved_timings(calls, rounds=3, warmup=1, rotate=True)
    assert ran == list("abc" "bca" "cab" "abc")
    assert {name: len(values) for name, values in seconds.items()} == {"a": 3, "b": 3, "c": 3}
