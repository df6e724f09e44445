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
from typing import Any

from .errors import ScheduleError
from .schedule_search import TARGET_TOLERANCE, TargetOutOfReach, _linear_layer_sum, _LinearSearch

__all__ = ["MAX_LAYERS", "MAX_POSITIONS", "PROMPT_MODES", "TARGET_TOLERANCE", "LayerSchedule", "Schedule",
           "TableSchedule", "TargetOutOfReach", "format_layers"]

PROMPT_MODES = ("full", "schedule")
# What a model can have, so that a typed size is refused up front instead of filling memory or
# running for minutes (a schedule command of 10**8 layers or steps). The deepest open models have
# ~130 decoder layers, the longest contexts ~1M positions; both bounds leave headroom above that.
MAX_LAYERS = 1024
MAX_POSITIONS = 1 << 20  # decay_tokens, a table's steps, the steps a figure is averaged over


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
        _check_range("num_layers", self.num_layers, 1, MAX_LAYERS,
                     f"{MAX_LAYERS}, more layers than any model has")
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
        return self._layer_sum(_check_steps(steps)) / steps

    def _layer_sum(self, steps: int) -> int:
        return sum(self.count(s) for s in range(steps))

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
        _check_range("decay_tokens", self.decay_tokens, 1, MAX_POSITIONS, _POSITIONS)

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
            raise search.out_of_reach()
        return cls(probe.num_layers, found[0], found[1], probe.decay_tokens, probe.warmup_layers, prompt)

    def top(self, step: int) -> int:
        if step >= self.decay_tokens:
            return self.min_layers
        # round_half_up(max - d * s / T) in integers: max - floor((2 d s + T - 1) / 2T)
        d, T = self.max_layers - self.min_layers, self.decay_tokens
        return max(self.min_layers, self.max_layers - (2 * d * step + T - 1) // (2 * T))

    def _layer_sum(self, steps: int) -> int:  # closed form: microseconds at MAX_POSITIONS steps
        within = min(steps, self.decay_tokens)
        return (_linear_layer_sum(self.num_layers, self.warmup_layers, self.decay_tokens, self.max_layers,
                                  self.min_layers, within)
                + (steps - within) * self.count(self.decay_tokens))

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
        if len(tops) > MAX_POSITIONS:
            raise ScheduleError(f"a schedule table may have at most {MAX_POSITIONS} steps, more positions than any "
                                f"model has (got {len(tops)})")
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


_POSITIONS = f"{MAX_POSITIONS}, more positions than any model has"


def _check_steps(steps: int) -> int:
    steps = _int("steps", steps)
    _check_range("steps", steps, 1, MAX_POSITIONS, _POSITIONS)
    return steps


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
