"""SkipDecode schedules: which decoder layers the whole batch runs at each generation step.

A schedule is a pure function of the generation step ``s`` (``s = 0`` is the forward pass of
the first generated token), never of a row's absolute position: with left padding every row of
a batch is at the same step, so the batch shares one layer set per step (the paper's "single
exit point per position"). A token runs the bottom ``warmup_layers`` and then a top block of
``top(s)`` layers that ends at the last layer; ``top`` never grows, so every layer a token runs
was run by every earlier token and its keys and values are already cached.

Shapes of ``top`` live in subclasses of :class:`LayerSchedule`: :class:`Schedule` (linear decay,
the paper's description) and :class:`TableSchedule` (an explicit per-step table).
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Any, Callable

from .errors import ScheduleError

PROMPT_MODES = ("full", "schedule")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(f"{name} must be an integer (got {value!r})")
    return value


def _check_range(name: str, value: int, lo: int, hi: int, hi_name: str | None = None) -> None:
    if value < lo:
        raise ScheduleError(f"{name} must be >= {lo} (got {value})")
    if value > hi:
        raise ScheduleError(f"{name} must be <= {hi_name or hi} (got {value})")


class LayerSchedule:
    """The interface every schedule shape implements: ``top(step)`` plus validation."""

    num_layers: int
    warmup_layers: int
    prompt: str

    def _validate_common(self) -> None:
        self.num_layers = _int("num_layers", self.num_layers)
        if self.num_layers < 1:
            raise ScheduleError(f"num_layers must be >= 1 (got {self.num_layers})")
        self.warmup_layers = _int("warmup_layers", self.warmup_layers)
        _check_range("warmup_layers", self.warmup_layers, 0, self.num_layers,
                     f"num_layers={self.num_layers}")
        if self.prompt not in PROMPT_MODES:
            raise ScheduleError(f"prompt must be one of {', '.join(PROMPT_MODES)} (got {self.prompt!r})")

    def top(self, step: int) -> int:
        raise NotImplementedError

    def layers(self, step: int) -> tuple[int, ...]:
        """Layer indices run at generation step ``step``, ascending."""
        if step < 0:
            raise ScheduleError(f"step must be >= 0 (got {step})")
        bottom = range(self.warmup_layers)
        top = range(self.num_layers - self.top(step), self.num_layers)
        return tuple(sorted(set(bottom) | set(top)))

    def count(self, step: int) -> int:
        """Number of layers run at ``step``; an overlap of warm-up and top block counts once."""
        top = self.top(step)
        overlap = max(0, self.warmup_layers - (self.num_layers - top))
        return self.warmup_layers + top - overlap

    def prompt_layers(self) -> tuple[int, ...]:
        """Layers run over the prompt tokens."""
        if self.prompt == "full":
            return tuple(range(self.num_layers))
        return self.layers(0)

    def mean_layers(self, steps: int) -> float:
        """Mean number of layers run per step over steps ``0 .. steps-1``."""
        if steps < 1:
            raise ScheduleError(f"steps must be >= 1 (got {steps})")
        return sum(self.count(s) for s in range(steps)) / steps

    def layer_speedup(self, steps: int | None = None) -> float:
        """``num_layers`` over the mean layers run per step over steps ``0 .. steps-1`` (default:
        the horizon); decoder layers only, no embed or head, every layer counted as equally costly."""
        return self.num_layers / self.mean_layers(steps or self.horizon)

    def ideal_speedup(self, steps: int | None = None) -> float:
        """Deprecated name of :meth:`layer_speedup` ("ideal speedup" is the multiply-add cost model
        of ``skipdeploy.bench``)."""
        warnings.warn("LayerSchedule.ideal_speedup() is renamed layer_speedup()", DeprecationWarning, stacklevel=2)
        return self.layer_speedup(steps)

    @property
    def horizon(self) -> int:
        """Steps after which the layer set no longer changes."""
        raise NotImplementedError

    def is_full(self) -> bool:
        return all(self.count(s) == self.num_layers for s in range(self.horizon + 1))

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "LayerSchedule":
        """Inverse of :meth:`to_dict` for every schedule shape."""
        try:
            kind = data.get("kind", "linear")
            args = {k: v for k, v in data.items() if k != "kind"}
            if kind == "linear":
                return Schedule(**args)
            if kind == "table":
                return TableSchedule(**args)
        except TypeError as exc:
            raise ScheduleError(f"invalid schedule description {data!r}: {exc}") from None
        raise ScheduleError(f"unknown schedule kind {kind!r} (known: linear, table)")

    def describe(self) -> str:
        raise NotImplementedError


class Schedule(LayerSchedule):
    """Linear SkipDecode schedule.

    ``top(s) = max(min_layers, round_half_up(max_layers - (max_layers - min_layers) * s / T))``
    for ``s < T = decay_tokens`` and ``min_layers`` afterwards; the layers run at step ``s`` are
    ``[0, warmup_layers) | [num_layers - top(s), num_layers)``.
    """

    def __init__(self, num_layers: int, max_layers: int | None = None, min_layers: int | None = None,
                 decay_tokens: int = 64, warmup_layers: int = 1, prompt: str = "full") -> None:
        self.num_layers = num_layers
        self.warmup_layers = warmup_layers
        self.prompt = prompt
        self._validate_common()
        L = self.num_layers
        self.max_layers = _int("max_layers", L if max_layers is None else max_layers)
        self.min_layers = _int("min_layers", self.max_layers if min_layers is None else min_layers)
        self.decay_tokens = _int("decay_tokens", decay_tokens)
        _check_range("max_layers", self.max_layers, 1, L, f"num_layers={L}")
        _check_range("min_layers", self.min_layers, 1, self.max_layers, f"max_layers={self.max_layers}")
        if self.decay_tokens < 1:
            raise ScheduleError(f"decay_tokens must be >= 1 (got {self.decay_tokens})")

    @classmethod
    def full(cls, num_layers: int) -> "Schedule":
        """The identity schedule: every layer at every step."""
        return cls(num_layers, num_layers, num_layers, decay_tokens=1, warmup_layers=0)

    @classmethod
    def target_speedup(cls, num_layers: int, speedup: float, decay_tokens: int = 64,
                       warmup_layers: int = 1, prompt: str = "full") -> "Schedule":
        """Pick max/min layers so that the layer speedup over ``decay_tokens`` steps is within 5%.

        Among the pairs that qualify, the deepest start (largest ``max_layers``) wins, then the
        closest figure, then the largest ``min_layers``; the achieved figure is
        ``schedule.layer_speedup()``. The search bisects (the figure only falls as either size
        grows) over a closed form of the layer count, so it costs microseconds at any size.
        """
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not math.isfinite(speedup):
            raise ScheduleError(f"target speedup must be a number (got {speedup!r})")
        if speedup < 1:
            raise ScheduleError(f"target speedup must be >= 1 (got {speedup})")
        probe = cls(num_layers, decay_tokens=decay_tokens, warmup_layers=warmup_layers, prompt=prompt)
        search = _LinearSearch(probe.num_layers, probe.decay_tokens, probe.warmup_layers, speedup)
        found = search.best()
        if found is None:
            raise ScheduleError(search.out_of_reach())
        return cls(probe.num_layers, found[0], found[1], probe.decay_tokens, probe.warmup_layers, prompt)

    def top(self, step: int) -> int:
        if step >= self.decay_tokens:
            return self.min_layers
        exact = self.max_layers - Fraction((self.max_layers - self.min_layers) * step, self.decay_tokens)
        return max(self.min_layers, math.floor(exact + Fraction(1, 2)))

    @property
    def horizon(self) -> int:
        return self.decay_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "linear", "num_layers": self.num_layers, "max_layers": self.max_layers,
                "min_layers": self.min_layers, "decay_tokens": self.decay_tokens,
                "warmup_layers": self.warmup_layers, "prompt": self.prompt}

    def describe(self) -> str:
        if self.is_full():
            return f"full ({self.num_layers} layers every step)"
        return (f"linear: top block {self.max_layers} -> {self.min_layers} layers over "
                f"{self.decay_tokens} tokens, {self.warmup_layers} warm-up layer(s), prompt {self.prompt}; "
                f"layer speedup {self.layer_speedup():.2f}x")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "kind")
        return f"Schedule({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerSchedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.to_dict().items())))


class TableSchedule(LayerSchedule):
    """An explicit, non-increasing per-step table of top-block sizes; the last entry holds."""

    def __init__(self, num_layers: int, tops: list[int], warmup_layers: int = 1, prompt: str = "full") -> None:
        self.num_layers = num_layers
        self.warmup_layers = warmup_layers
        self.prompt = prompt
        self._validate_common()
        if not tops:
            raise ScheduleError("a schedule table needs at least one step")
        self.tops = [_int(f"tops[{i}]", t) for i, t in enumerate(tops)]
        for i, t in enumerate(self.tops):
            _check_range(f"tops[{i}]", t, 1, self.num_layers, f"num_layers={self.num_layers}")
            if i and t > self.tops[i - 1]:
                raise ScheduleError(
                    f"schedule table is not monotone: tops[{i}]={t} > tops[{i - 1}]={self.tops[i - 1]}; "
                    "the top block may only shrink, or cached keys and values would be missing")

    def top(self, step: int) -> int:
        return self.tops[min(step, len(self.tops) - 1)]

    @property
    def horizon(self) -> int:
        return len(self.tops)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "table", "num_layers": self.num_layers, "tops": list(self.tops),
                "warmup_layers": self.warmup_layers, "prompt": self.prompt}

    def describe(self) -> str:
        return (f"table of {len(self.tops)} steps ({self.tops[0]} -> {self.tops[-1]} top layers), "
                f"{self.warmup_layers} warm-up layer(s), prompt {self.prompt}; "
                f"layer speedup {self.layer_speedup():.2f}x")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerSchedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self.to_dict()))


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
                      min_layers: int) -> int:
    """``sum(count(s) for s in range(decay_tokens))`` of ``Schedule(num_layers, max_layers,
    min_layers, decay_tokens, warmup_layers)``, in closed form.

    For ``s < T``: ``top(s) = max - floor((2 d s + T - 1) / 2T)`` with ``d = max - min`` (round
    half up of ``max - d s / T``), and ``count(s) = min(L, w + top(s))``. ``top`` falls with ``s``,
    so the steps clipped to ``L`` are the first ``s0``: those with ``floor(...) < max - (L - w)``.
    """
    L, w, T = num_layers, warmup_layers, decay_tokens
    d = max_layers - min_layers
    r = max_layers - (L - w)
    if r <= 0:
        s0 = 0
    elif d == 0:
        s0 = T
    else:  # floor((2ds + T - 1) / 2T) < r  <=>  s < (2Tr - T + 1) / 2d
        s0 = min(T, -(-(2 * T * r - T + 1) // (2 * d)))
    drops = _floor_sum(T, 2 * T, 2 * d, T - 1) - _floor_sum(s0, 2 * T, 2 * d, T - 1)
    return s0 * L + (T - s0) * (w + max_layers) - drops


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

    def out_of_reach(self) -> str:
        below, above = self.nearest()
        setup = f"for {self.L} layers with {self.w} warm-up layer(s) over {self.T} decay tokens"

        def pair(found: tuple[float, int, int]) -> str:
            return f"{found[0]:.2f}x (max_layers={found[1]}, min_layers={found[2]})"

        if above is None:  # faster than the fastest schedule
            advice = "; use fewer --warmup-layers to go faster" if self.w else ""
            return (f"target speedup {self.k:g}x is out of reach {setup}: the fastest schedule gives "
                    f"{pair(below)}{advice}")
        nearest = " and ".join(pair(found) for found in (below, above) if found is not None)
        return (f"target speedup {self.k:g}x is not reachable within 5% {setup}: the nearest schedules give "
                f"{nearest}; pass one of those or change --decay-tokens/--warmup-layers")


def format_layers(layers: tuple[int, ...]) -> str:
    """``(0, 1, 5, 6, 7)`` -> ``"0-1,5-7"``."""
    parts: list[str] = []
    start = prev = None
    for layer in layers:
        if prev is not None and layer == prev + 1:
            prev = layer
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = layer
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)
