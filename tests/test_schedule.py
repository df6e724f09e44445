"""Schedule semantics (DESIGN.md section 2), checked against the formula written out here."""

from __future__ import annotations

import functools
from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skipdeploy import Schedule, ScheduleError, TableSchedule
from skipdeploy.schedule import MAX_LAYERS, MAX_POSITIONS, LayerSchedule, format_layers


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
    assert s.is_full() and s.layer_speedup() == 1.0


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
    assert s.layer_speedup(32) == pytest.approx(layers / mean)


def test_target_speedup_out_of_reach():
    with pytest.raises(ScheduleError, match="out of reach"):
        Schedule.target_speedup(12, 50)
    with pytest.raises(ScheduleError, match=">= 1"):
        Schedule.target_speedup(12, 0.5)


def test_target_speedup_between_schedules_names_the_nearest_ones():
    """5x lies between the figures 12 layers can give over 16 tokens: the message names both
    neighbours (what a user reported), not a range that contains the target."""
    with pytest.raises(ScheduleError) as info:
        Schedule.target_speedup(12, 5, decay_tokens=16)
    message = str(info.value)
    assert "target speedup 5x is not reachable within 5% for 12 layers" in message
    assert "4.68x (max_layers=2, min_layers=1) and 6.00x (max_layers=1, min_layers=1)" in message
    assert "range" not in message
    for max_l, min_l, figure in ((2, 1, 4.68), (1, 1, 6.00)):
        assert Schedule(12, max_l, min_l, decay_tokens=16).layer_speedup() == pytest.approx(figure, abs=5e-3)
    with pytest.raises(ScheduleError, match="the fastest schedule gives 6.00x"):
        Schedule.target_speedup(12, 50)


@functools.lru_cache(maxsize=None)
def all_figures(L, T, w):
    """Every (max_layers, min_layers, layer speedup over T steps), in the old search's order."""
    return [(max_l, min_l, Schedule(L, max_l, min_l, T, w).layer_speedup(T))
            for max_l in range(L, 0, -1) for min_l in range(max_l, 0, -1)]


def brute_force_target(L, k, T, w):
    """The exhaustive double loop target_speedup used to run: (max_layers, min_layers) or None."""
    best = None
    for max_l, min_l, achieved in all_figures(L, T, w):
        err = abs(achieved - k) / k
        if err <= 0.05:
            key = (max_l, -err)
            if best is None or key > best[0]:
                best = (key, (max_l, min_l))
    return None if best is None else best[1]


def fast_target(L, k, T, w):
    try:
        s = Schedule.target_speedup(L, k, decay_tokens=T, warmup_layers=w)
    except ScheduleError as exc:
        assert "reach" in str(exc)
        return None
    assert (s.num_layers, s.decay_tokens, s.warmup_layers) == (L, T, w)
    return s.max_layers, s.min_layers


def test_target_speedup_matches_the_exhaustive_search():
    """Targets at every achievable figure (exact ties), halfway between neighbours (equal errors on
    both sides), at the 5% edges, and off the grid, over many shapes."""
    checked = 0
    for L in (1, 2, 3, 5, 8, 12, 20):
        for T in (1, 2, 3, 5, 16, 33, 64):
            for w in sorted({0, 1, L // 2, L}):
                figures = sorted({figure for _, _, figure in all_figures(L, T, w)})
                targets = {*figures, *((a + b) / 2 for a, b in zip(figures, figures[1:])),
                           *(f * 1.05 for f in figures), *(f / 0.95 for f in figures), 1, 1.5, 2, 3, 5, 7.25}
                for k in sorted(t for t in targets if t >= 1):
                    assert fast_target(L, k, T, w) == brute_force_target(L, k, T, w), (L, k, T, w)
                    checked += 1
    assert checked > 1000


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 20).flatmap(lambda L: st.tuples(
    st.just(L), st.floats(1, L + 2, allow_nan=False), st.integers(1, 80), st.integers(0, L))))
def test_target_speedup_matches_the_exhaustive_search_random(params):
    L, k, T, w = params
    assert fast_target(L, k, T, w) == brute_force_target(L, k, T, w)


@pytest.mark.parametrize("layers, decay, k", [(MAX_LAYERS, 64, 2), (MAX_LAYERS, 64, 3.7), (MAX_LAYERS, 64, 400),
                                              (MAX_LAYERS, MAX_POSITIONS, 1.5), (64, 2048, 2), (64, MAX_POSITIONS, 3)])
def test_target_speedup_scales_to_many_layers_and_tokens(layers, decay, k):
    s = Schedule.target_speedup(layers, k, decay_tokens=decay)
    assert abs(s.layer_speedup(decay) - k) / k <= 0.05
    assert s.max_layers == layers or Schedule(layers, s.max_layers + 1, 1, decay).layer_speedup(decay) < k * 0.95
    with pytest.raises(ScheduleError, match="out of reach"):
        Schedule.target_speedup(MAX_LAYERS, 10 ** 6, decay_tokens=64)


@pytest.mark.parametrize("make, words", [
    (lambda: Schedule(MAX_LAYERS + 1), f"num_layers must be <= {MAX_LAYERS}"),
    (lambda: Schedule.full(10 ** 8), f"num_layers must be <= {MAX_LAYERS}"),
    (lambda: Schedule.target_speedup(10 ** 8, 2), f"num_layers must be <= {MAX_LAYERS}"),
    (lambda: Schedule(12, 8, 2, decay_tokens=MAX_POSITIONS + 1), f"decay_tokens must be <= {MAX_POSITIONS}"),
    (lambda: Schedule.target_speedup(12, 2, decay_tokens=10 ** 8), f"decay_tokens must be <= {MAX_POSITIONS}"),
    (lambda: TableSchedule(12, [3] * (MAX_POSITIONS + 1)), f"at most {MAX_POSITIONS} steps"),
    (lambda: Schedule(12, 8, 2).mean_layers(10 ** 8), f"steps must be <= {MAX_POSITIONS}"),
    (lambda: Schedule(12, 8, 2).layer_speedup(10 ** 8), f"steps must be <= {MAX_POSITIONS}"),
])
def test_sizes_beyond_what_a_model_has_are_refused_up_front(make, words):
    with pytest.raises(ScheduleError, match=words):
        make()


def test_figures_at_the_bounds_are_closed_form():
    # Summing MAX_POSITIONS steps one by one takes seconds; the closed form gives the same figure.
    held = Schedule(MAX_LAYERS, 9, 5, decay_tokens=4, warmup_layers=2)
    assert held.mean_layers(MAX_POSITIONS) == (sum(held.count(i) for i in range(4)) + (MAX_POSITIONS - 4) * 7) \
        / MAX_POSITIONS
    small = Schedule(12, 10, 2, decay_tokens=8, warmup_layers=3)
    assert [small._layer_sum(n) for n in range(1, 14)] == [sum(small.count(i) for i in range(n)) for n in range(1, 14)]


def test_layer_speedup_and_its_deprecated_name():
    s = Schedule(12, 10, 2, decay_tokens=8)
    assert s.layer_speedup(8) == 12 / (sum(s.count(i) for i in range(8)) / 8)
    assert s.layer_speedup() == s.layer_speedup(8)
    with pytest.warns(DeprecationWarning, match="layer_speedup"):
        assert s.ideal_speedup(8) == s.layer_speedup(8)
    with pytest.warns(DeprecationWarning):
        assert TableSchedule(6, [5, 3]).ideal_speedup() == TableSchedule(6, [5, 3]).layer_speedup()
    assert f"layer speedup {s.layer_speedup():.2f}x" in s.describe()
    assert "ideal" not in s.describe() and "layer speedup" in TableSchedule(6, [5, 3]).describe()


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
    assert 1.0 <= s.layer_speedup() <= L
