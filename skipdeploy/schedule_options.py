"""Schedules from what a user says: CLI flags, a request's ``"skipdecode"`` object, C parameters.

One rule everywhere: ``target_speedup`` picks the top block (1 means every layer); the fields
``max_layers``, ``min_layers``, ``warmup_layers``, ``decay_tokens``, ``prompt_layers`` (and the
CLI's ``table``) give a schedule directly, and fields that give only part of one modify the
default schedule (an export's fine-tuned one keeps its decay when only the warm-up changes). A
new schedule's decay is the decode steps of the generation where that is known.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ScheduleError
from .schedule import LayerSchedule, Schedule, TableSchedule

FIELDS = ("target_speedup", "max_layers", "min_layers", "warmup_layers", "decay_tokens", "prompt_layers")


def schedule_from_options(options: Mapping[str, Any], num_layers: int, default: LayerSchedule | None,
                          decode_steps: int | None) -> LayerSchedule:
    """The schedule ``options`` describe (keys: ``FIELDS``, ``table`` (a list of top-block sizes)
    and ``full``; None values are absent). ``decode_steps`` (None where nothing is generated) is
    the decay of a new schedule. Conflicting or unknown keys are a ScheduleError."""
    unknown = set(options) - set(FIELDS) - {"table", "full"}
    if unknown:
        raise ScheduleError(f"unknown schedule option(s) {', '.join(sorted(unknown))}; known: {', '.join(FIELDS)}")
    given = [k for k in FIELDS if options.get(k) is not None]
    target, table = options.get("target_speedup"), options.get("table")
    max_l, min_l, warmup = options.get("max_layers"), options.get("min_layers"), options.get("warmup_layers")
    decay, prompt = options.get("decay_tokens"), options.get("prompt_layers")
    if options.get("full"):
        if given or table is not None:
            raise ScheduleError("full excludes the other schedule options")
        return Schedule.full(num_layers)
    if table is not None:
        if any(v is not None for v in (target, max_l, min_l, decay)):
            raise ScheduleError("table replaces target_speedup/max_layers/min_layers/decay_tokens")
        base = default if default is not None and not default.is_full() else None
        return TableSchedule(num_layers, list(table),
                             warmup_layers=warmup if warmup is not None else (base.warmup_layers if base else 1),
                             prompt=prompt or (base.prompt if base else "full"))
    if not given:
        return default or Schedule.full(num_layers)
    if target is not None and (max_l is not None or min_l is not None):
        raise ScheduleError("target_speedup picks max_layers/min_layers itself; give one or the other")
    if isinstance(target, (int, float)) and not isinstance(target, bool) and target == 1 and len(given) == 1:
        return Schedule.full(num_layers)
    if isinstance(default, TableSchedule) and not default.is_full() and target is None \
            and not {"max_layers", "min_layers", "decay_tokens"} & set(given):
        return TableSchedule(num_layers, default.tops, warmup if warmup is not None else default.warmup_layers,
                             prompt or default.prompt)
    linear = default if isinstance(default, Schedule) and not default.is_full() else None
    fresh_decay = max(1, decode_steps) if decode_steps is not None else 64
    warmup = warmup if warmup is not None else (linear.warmup_layers if linear else 1)
    prompt = prompt or (linear.prompt if linear else "full")
    if target is not None:
        return Schedule.target_speedup(num_layers, target, decay_tokens=decay if decay is not None else fresh_decay,
                                       warmup_layers=warmup, prompt=prompt)
    if linear is not None:
        return Schedule(num_layers, max_l if max_l is not None else linear.max_layers,
                        min_l if min_l is not None else linear.min_layers,
                        decay if decay is not None else linear.decay_tokens, warmup, prompt)
    return Schedule(num_layers, max_l, min_l, decay if decay is not None else fresh_decay, warmup, prompt)
