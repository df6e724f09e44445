"""Schedule semantics (DESIGN.md section 2), checked against the formula written out here."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skipdeploy import Schedule, ScheduleError, TableSchedule
from skipdeploy.schedule import LayerSchedule, format_layers


def reference_top(max_l, min_l, T, s):
    if s >= T:
        return min_l
    exact = Decimal(max_l) - Decimal(max_l - min_l) * Decimal(s) / Decimal(T)
    return max(min_l, int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP)))


def test_linear_decay_matches_formula_and_reaches_floor():
    s = Schedule(12, max_layers=10, min_layers=2, decay_tokens=8, warmup_layers=1)
    tops = [s.top(i) for i in range(12)]
    assert tops == [reference_top(10, 2, 8, i) for i in range(12)]
    assert tops[0] == 10 and tops[8:] == [2, 2, 2, 2]
    assert s.layers(0) == (0, *range(2, 12))
    assert s.layers(20) == (0, 10, 11)


def test_round_half_up_not_bankers():
    # 4 - 3 * 1/2 = 2.5 -> 3 (banker's rounding would give 2)
    assert Schedule(4, 4, 1, decay_tokens=2, warmup_layers=0).top(1) == 3


def test_overlap_of_warmup_and_top_block_counts_once():
    s = Schedule(4, max_layers=4, min_layers=2, decay_tokens=2, warmup_layers=3)
    assert s.layers(0) == (0, 1, 2, 3) and s.count(0) == 4
    assert s.layers(5) == (0, 1, 2, 3) and s.count(5) == 4  # warm-up 0..2 plus top 2..3
    s = Schedule(6, max_layers=2, min_layers=2, decay_tokens=1, warmup_layers=2)
    assert s.count(0) == 4 and s.layers(0) == (0, 1, 4, 5)


def test_full_schedule_runs_everything():
    s = Schedule.full(7)
    assert all(s.layers(i) == tuple(range(7)) for i in range(20))
    assert s.is_full() and s.ideal_speedup() == 1.0


def test_warmup_zero_and_prompt_modes():
    s = Schedule(6, 3, 1, decay_tokens=4, warmup_layers=0, prompt="schedule")
    assert s.layers(0) == (3, 4, 5)
    assert s.prompt_layers() == (3, 4, 5)
    assert Schedule(6, 3, 1, decay_tokens=4, warmup_layers=0).prompt_layers() == tuple(range(6))


@pytest.mark.parametrize("kwargs, bound", [
    (dict(num_layers=0), "num_layers must be >= 1"),
    (dict(num_layers=4, warmup_layers=5), "warmup_layers must be <= num_layers=4"),
    (dict(num_layers=4, warmup_layers=-1), "warmup_layers must be >= 0"),
    (dict(num_layers=4, max_layers=5), "max_layers must be <= num_layers=4"),
    (dict(num_layers=4, max_layers=0), "max_layers must be >= 1"),
    (dict(num_layers=4, max_layers=2, min_layers=3), "min_layers must be <= max_layers=2"),
    (dict(num_layers=4, min_layers=0), "min_layers must be >= 1"),
    (dict(num_layers=4, decay_tokens=0), "decay_tokens must be >= 1"),
    (dict(num_layers=4, prompt="half"), "prompt must be one of"),
    (dict(num_layers=4, max_layers=2.5), "max_layers must be an integer"),
])
def test_bounds_are_named(kwargs, bound):
    with pytest.raises(ScheduleError, match=bound):
        Schedule(**kwargs)


@pytest.mark.parametrize("layers, k", [(12, 1.5), (12, 2), (12, 3), (24, 2), (24, 3), (24, 5)])
def test_target_speedup_within_five_percent(layers, k):
    s = Schedule.target_speedup(layers, k, decay_tokens=32)
    mean = sum(len(s.layers(i)) for i in range(32)) / 32
    assert abs(layers / mean - k) / k <= 0.05
    assert s.ideal_speedup(32) == pytest.approx(layers / mean)


def test_target_speedup_out_of_reach():
    with pytest.raises(ScheduleError, match="out of reach"):
        Schedule.target_speedup(12, 50)
    with pytest.raises(ScheduleError, match=">= 1"):
        Schedule.target_speedup(12, 0.5)


def test_table_schedule_must_shrink():
    t = TableSchedule(6, [5, 4, 4, 2], warmup_layers=1)
    assert t.layers(3) == (0, 4, 5) and t.layers(99) == (0, 4, 5)
    with pytest.raises(ScheduleError, match="not monotone: tops\\[2\\]=5 > tops\\[1\\]=4"):
        TableSchedule(6, [5, 4, 5])


def test_round_trip_through_dict():
    for s in (Schedule(12, 9, 3, 20, 2, "schedule"), TableSchedule(6, [5, 3]), Schedule.full(3)):
        assert LayerSchedule.from_dict(s.to_dict()) == s


def test_format_layers():
    assert format_layers((0, 1, 5, 6, 7, 9)) == "0-1,5-7,9"
    assert format_layers(()) == ""


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda L: st.tuples(
    st.just(L), st.integers(1, L), st.integers(0, L), st.integers(1, 100)).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.integers(1, t[1]), st.just(t[2]), st.just(t[3])))))
def test_schedule_invariants(params):
    L, max_l, min_l, w, T = params
    s = Schedule(L, max_l, min_l, T, w)
    previous = None
    for step in range(T + 3):
        layers = s.layers(step)
        assert len(layers) == s.count(step) == len(set(range(w)) | set(range(L - s.top(step), L)))
        assert min_l <= s.top(step) <= max_l
        assert layers[-1] == L - 1  # the LM head always sits on the real top layer
        if previous is not None:
            assert set(layers) <= set(previous)  # nothing run now was skipped before
        previous = layers
    assert 1.0 <= s.ideal_speedup() <= L
