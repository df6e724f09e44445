"""``Schedule.target_speedup``'s search: the closed-form layer count of a linear schedule and a
bisection over (max_layers, min_layers), so that it costs microseconds at any size; and the error
that names the nearest reachable schedules when none is within 5%.
"""

from __future__ import annotations

from typing import Callable

from .errors import ScheduleError

TARGET_TOLERANCE = 0.05  # relative distance from the target that ``Schedule.target_speedup`` accepts


def _floor_sum(n: int, m: int, a: int, b: int) -> int:
    """``sum(floor((a * i + b) / m) for i in range(n))`` for ``n, a, b >= 0, m >= 1``, in O(log) steps."""
    total = 0
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y_max = a * n + b
        if y_max < m:
            return total
        n, b = divmod(y_max, m)
        m, a = a, m


def _linear_layer_sum(num_layers: int, warmup_layers: int, decay_tokens: int, max_layers: int,
                      min_layers: int, steps: int | None = None) -> int:
    """``sum(count(s) for s in range(steps))`` (default ``decay_tokens``, at most that) of
    ``Schedule(num_layers, max_layers, min_layers, decay_tokens, warmup_layers)``, in closed form.

    For ``s < T``: ``top(s) = max - floor((2 d s + T - 1) / 2T)`` with ``d = max - min`` (round
    half up of ``max - d s / T``), and ``count(s) = min(L, w + top(s))``. ``top`` falls with ``s``,
    so the steps clipped to ``L`` are the first ``s0``: those with ``floor(...) < max - (L - w)``.
    """
    L, w, T = num_layers, warmup_layers, decay_tokens
    n = T if steps is None else steps
    d = max_layers - min_layers
    r = max_layers - (L - w)
    if r <= 0:
        s0 = 0
    elif d == 0:
        s0 = T
    else:  # floor((2ds + T - 1) / 2T) < r  <=>  s < (2Tr - T + 1) / 2d
        s0 = min(T, -(-(2 * T * r - T + 1) // (2 * d)))
    s0 = min(s0, n)
    drops = _floor_sum(n, 2 * T, 2 * d, T - 1) - _floor_sum(s0, 2 * T, 2 * d, T - 1)
    return s0 * L + (n - s0) * (w + max_layers) - drops


def _last_true(lo: int, hi: int, pred: Callable[[int], bool]) -> int:
    """The largest ``x`` in ``[lo, hi]`` with ``pred(x)``, for ``pred`` true on a prefix; ``lo - 1`` if none."""
    while lo <= hi:
        mid = (lo + hi) // 2
        if pred(mid):
            lo = mid + 1
        else:
            hi = mid - 1
    return hi


class _LinearSearch:
    """``Schedule.target_speedup``'s search over (max_layers, min_layers) pairs.

    It picks what the exhaustive double loop (max_layers from L down, min_layers from max_layers
    down, keeping the first strictly better ``(max_layers, -error)``) would pick, without the loop:
    the layer count of every step grows (weakly) with either size, so the figure ``L / (sum / T)``
    falls with either, and so does every float computed from it. For one ``max_layers`` the
    figures at or above the target are a prefix of ``min_layers = 1, 2, ...`` and the best pair
    sits at the edge of that prefix; whole ranges of ``max_layers`` are skipped by bisection.
    """

    def __init__(self, num_layers: int, decay_tokens: int, warmup_layers: int, target: float) -> None:
        self.L, self.T, self.w, self.k = num_layers, decay_tokens, warmup_layers, target

    def speedup(self, max_layers: int, min_layers: int) -> float:
        # The same float expression as layer_speedup(T): num_layers / (sum of counts / steps).
        return self.L / (_linear_layer_sum(self.L, self.w, self.T, max_layers, min_layers) / self.T)

    def error(self, max_layers: int, min_layers: int) -> float:
        return abs(self.speedup(max_layers, min_layers) - self.k) / self.k

    def _split(self, max_layers: int) -> int:
        """The largest ``min_layers`` whose figure is >= the target (0 if none)."""
        return _last_true(1, max_layers, lambda m: self.speedup(max_layers, m) >= self.k)

    def _deepest(self) -> int:
        """The largest ``max_layers`` whose fastest pair (``min_layers=1``) is not too slow; every
        deeper start is too slow at every ``min_layers``."""
        def fast_enough(max_layers: int) -> bool:
            return self.speedup(max_layers, 1) >= self.k or self.error(max_layers, 1) <= TARGET_TOLERANCE
        return _last_true(1, self.L, fast_enough)

    def _best_for(self, max_layers: int) -> tuple[float, int]:
        """(error, min_layers) of the closest figure at this ``max_layers``, the largest
        ``min_layers`` on a tie (the one the double loop meets first)."""
        p = self._split(max_layers)
        best: tuple[float, int] | None = None
        if p >= 1:  # errors fall as min_layers rises towards p
            best = (self.error(max_layers, p), p)
        if p < max_layers:  # errors rise from p + 1 on; the last equal to the first ties
            first = self.error(max_layers, p + 1)
            q = _last_true(p + 1, max_layers, lambda m: self.error(max_layers, m) <= first)
            if best is None or first <= best[0]:
                best = (first, q)
        assert best is not None
        return best

    def best(self) -> tuple[int, int] | None:
        """(max_layers, min_layers) of the chosen schedule, or None when none is within 5%."""
        for max_layers in range(self._deepest(), 0, -1):
            err, min_layers = self._best_for(max_layers)
            if err <= TARGET_TOLERANCE:
                return max_layers, min_layers
            if self.speedup(max_layers, max_layers) >= self.k:
                return None  # too fast at every min_layers, and shallower starts are faster still
        return None

    def nearest(self) -> tuple[tuple[float, int, int] | None, tuple[float, int, int] | None]:
        """The (figure, max_layers, min_layers) closest to the target from below and from above
        (the deepest such pair on a tie; None when no figure lies on that side)."""
        below: tuple[float, int, int] | None = None
        above: tuple[float, int, int] | None = None

        def offer(max_layers: int, min_layers: int) -> None:
            nonlocal below, above
            figure = self.speedup(max_layers, min_layers)
            if figure >= self.k:
                if above is None or figure < above[0]:
                    above = (figure, max_layers, min_layers)
            elif below is None or figure > below[0]:
                below = (figure, max_layers, min_layers)

        deepest = self._deepest()
        if deepest < self.L:  # deeper starts are all below; the fastest of them is this one
            offer(deepest + 1, 1)
        for max_layers in range(deepest, 0, -1):
            p = self._split(max_layers)
            if p >= 1:
                offer(max_layers, p)
            if p < max_layers:
                offer(max_layers, p + 1)
            else:  # every figure here is above, and shallower starts are faster still
                break
        return below, above

    def out_of_reach(self) -> "TargetOutOfReach":
        below, above = self.nearest()
        return TargetOutOfReach(self.k, self.L, self.w, self.T, below, above)


class TargetOutOfReach(ScheduleError):
    """``Schedule.target_speedup`` found no schedule within 5% of the target. ``below``/``above``
    are the nearest (figure, max_layers, min_layers) on each side (None where none lies there), so
    that a command can name its own options; the message names the API's keywords."""

    def __init__(self, target: float, num_layers: int, warmup_layers: int, decay_tokens: int,
                 below: tuple[float, int, int] | None, above: tuple[float, int, int] | None) -> None:
        self.target, self.num_layers, self.warmup_layers, self.decay_tokens = target, num_layers, warmup_layers, \
            decay_tokens
        self.below, self.above = below, above
        super().__init__(self.describe("warmup_layers", "decay_tokens"))

    @property
    def too_fast(self) -> bool:
        """The target lies beyond the fastest schedule (not between two reachable figures)."""
        return self.above is None

    def describe(self, warmup: str | None, decay: str | None) -> str:
        """The message, with the options that change the reachable figures spelled as the caller
        spells them (None: the caller has no such option)."""
        setup = f"for {self.num_layers} layers with {self.warmup_layers} warm-up layer(s) over {self.decay_tokens} " \
                "decay tokens"

        def pair(found: tuple[float, int, int]) -> str:
            return f"{found[0]:.2f}x (max_layers={found[1]}, min_layers={found[2]})"

        if self.too_fast:
            advice = f"; use fewer {warmup} to go faster" if self.warmup_layers and warmup else ""
            return (f"target speedup {self.target:g}x is out of reach {setup}: the fastest schedule gives "
                    f"{pair(self.below)}{advice}")
        nearest = " and ".join(pair(found) for found in (self.below, self.above) if found is not None)
        knobs = "/".join(k for k in (decay, warmup) if k)
        return (f"target speedup {self.target:g}x is not reachable within 5% {setup}: the nearest schedules give "
                f"{nearest}; pass one of those" + (f" or change {knobs}" if knobs else ""))
