"""One request, one meaning, whichever door it comes through (the role vLLM's ``SamplingParams`` plays).

``SAMPLING_FIELDS`` and ``SCHEDULE_FIELDS`` are the list: each field's type, range, default and
meaning, checked by one function (``check``). A :class:`Door` maps its protocol's keys onto the
fields (OpenAI's ``max_tokens``, vLLM-on-Triton's string numbers, the C API's flat JSON, the
CLI's flags, Python's keywords) and names a refused field as that door spells it; the few
protocol defaults that differ (OpenAI's and vLLM's ``max_tokens`` 16 and temperature 1) live in
the door, and docs/DESIGN.md section 11 has their table. Everything else, including what is
refused, is the same for every door. Fields that depend on the model (token ids inside the
vocabulary, positions inside the export's limit, schedule sizes against the layer count) are
checked when the request meets the model (``RequestParams.schedule_for`` and the engine core).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InputError, ScheduleError, SkipDeployError
from .schedule import MAX_LAYERS, MAX_POSITIONS, LayerSchedule, Schedule, TableSchedule

MAX_STOP = 16            # stop strings per request
MAX_STOP_CHARS = 256     # characters per stop string
MAX_STOP_TOKEN_IDS = 64
SEED_RANGE = (-2**63, 2**64 - 1)  # any signed or unsigned 64-bit integer; negative ones modulo 2**64


@dataclass(frozen=True)
class Field:
    name: str
    kind: str                 # int, number, bool, texts, ids, choice
    default: Any
    meaning: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False    # low itself excluded
    choices: tuple = ()


SAMPLING_FIELDS = (
    Field("max_new_tokens", "int", 32, "tokens to generate; a prompt of P tokens needs P + N - 1 positions",
          1, MAX_POSITIONS),
    Field("temperature", "number", 0.0, "0 is greedy; unset, it is 1 when top_k or top_p restricts sampling", 0),
    Field("top_k", "int", 0, "sample among the K most likely tokens; 0 and -1 are off", -1),
    Field("top_p", "number", 1.0, "sample among the most likely tokens whose mass reaches P; 1 is off", 0, 1,
          open_low=True),
    Field("repetition_penalty", "number", 1.0, "Hugging Face's repetition penalty; 1 is off", 0, open_low=True),
    Field("seed", "int", None, "sampling seed (same seed, same tokens on every backend); negative values are "
          "taken modulo 2**64", *SEED_RANGE),
    Field("stop", "texts", (), f"stop strings (at most {MAX_STOP} of at most {MAX_STOP_CHARS} characters): the row "
          "stops once its text contains one, and the text ends before it"),
    Field("stop_token_ids", "ids", (), f"token ids that end a row like EOS (at most {MAX_STOP_TOKEN_IDS})", 0),
    Field("ignore_eos", "bool", False, "keep generating past the model's EOS token"),
)
SCHEDULE_FIELDS = (
    Field("target_speedup", "number", None, "pick max/min layers for this layer speedup (1: every layer)", 1,
          MAX_LAYERS),
    Field("max_layers", "int", None, "top-block size at the first generated token", 1, MAX_LAYERS),
    Field("min_layers", "int", None, "floor of the top block", 1, MAX_LAYERS),
    Field("warmup_layers", "int", None, "bottom layers every token runs", 0, MAX_LAYERS),
    Field("decay_tokens", "int", None, "decode steps over which the top block shrinks", 1, MAX_POSITIONS),
    Field("prompt_layers", "choice", None, "the prompt's layers: all (full) or the step-0 set (schedule)",
          choices=("full", "schedule")),
    Field("table", "ids", None, "explicit top-block size per decode step, non-increasing", 1, MAX_LAYERS),
    Field("full", "bool", False, "every layer at every step"),
)
FIELDS = {f.name: f for f in SAMPLING_FIELDS + SCHEDULE_FIELDS}
SCHEDULE_FIELDS_BY_NAME = {f.name: f for f in SCHEDULE_FIELDS}


class RequestError(InputError):
    """A refused field: ``param`` is its name as the door spells it (OpenAI's ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# -- schedule fields -> a schedule ---------------------------------------------------------------------
_SHAPE_FIELDS = tuple(f.name for f in SCHEDULE_FIELDS if f.name not in ("table", "full"))  # table, full: their own rules


def schedule_from_options(options: Mapping[str, Any], num_layers: int, default: LayerSchedule | None,
                          decode_steps: int | None) -> LayerSchedule:
    """The schedule ``options`` describe (keys: the names of ``SCHEDULE_FIELDS``; None values are
    absent), the one rule of every door: ``target_speedup`` picks the top block (1 means every
    layer); the other fields give a schedule directly, and fields that give only part of one modify
    ``default`` (an export's fine-tuned schedule keeps its decay when only the warm-up changes).
    ``decode_steps`` (None where nothing is generated: 64) is the decay of a new schedule.
    Conflicting or unknown keys are a ScheduleError."""
    unknown = set(options) - set(SCHEDULE_FIELDS_BY_NAME)
    if unknown:
        raise ScheduleError(f"unknown schedule option(s) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(SCHEDULE_FIELDS_BY_NAME)}")
    given = [k for k in _SHAPE_FIELDS if options.get(k) is not None]
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


# -- checking one value ------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _range_text(f: Field, integer: bool) -> str:
    noun = "an integer" if integer else "a number"
    low, high = f.low, f.high
    if f.name == "seed":
        return "a 64-bit integer (in [-2**63, 2**64))"
    if low is not None and high is not None:
        return f"{noun} in {'(' if f.open_low else '['}{low:,}, {high:,}]".replace(",", "_").replace("_ ", ", ")
    if low is not None:
        return f"{noun} {'>' if f.open_low else '>='} {low}"
    return noun


def _from_text(kind: str, value: Any) -> Any:
    """vLLM clients send numbers and booleans as strings ("0.7", "16", "true")."""
    if not isinstance(value, str):
        return value
    if kind == "bool" and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if kind in ("int", "number"):
        try:
            return int(value, 10)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


def _number(f: Field, value: Any, name: str, integer: bool, text_values: bool) -> Any:
    if text_values:
        value = _from_text("int" if integer else "number", value)
    if isinstance(value, float) and integer and math.isfinite(value) and value.is_integer():
        value = int(value)  # 16.0 from a JSON encoder that writes every number as a float
    ok = _is_int(value) if integer else \
        isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and f.low is not None:
        ok = value > f.low if f.open_low else value >= f.low
    if ok and f.high is not None:
        ok = value <= f.high
    if not ok:
        raise RequestError(name, f"{name} must be {_range_text(f, integer)} (got {_shown(value)})")
    return int(value) if integer else float(value)  # numpy scalars become plain numbers


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check(name: str, value: Any, spelled: str | None = None, text_values: bool = False) -> Any:
    """``value`` of field ``name`` checked and normalized, or a RequestError naming ``spelled``."""
    f, spelled = FIELDS[name], spelled or name
    if f.kind in ("int", "number"):
        value = _number(f, value, spelled, f.kind == "int", text_values)
        if name == "seed":
            value %= 2**64
        if name == "top_k" and value == -1:
            value = 0  # vLLM's "off"
        return value
    if f.kind == "bool":
        value = _from_text("bool", value) if text_values else value
        if not isinstance(value, bool):
            raise RequestError(spelled, f"{spelled} must be true or false (got {_shown(value)})")
        return value
    if f.kind == "choice":
        if value not in f.choices:
            raise RequestError(spelled, f"{spelled} must be one of {', '.join(f.choices)} (got {_shown(value)})")
        return value
    if f.kind == "texts":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) > MAX_STOP or \
                not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items):
            raise RequestError(spelled, f"{spelled} must be a non-empty string or a list of at most {MAX_STOP} "
                                        f"(of 1 to {MAX_STOP_CHARS} characters each) (got {_shown(value)})")
        return tuple(items)
    # ids: one integer or a list of them
    items = [value] if _is_int(value) or (text_values and isinstance(value, str)) else value
    limit = MAX_STOP_TOKEN_IDS if name == "stop_token_ids" else MAX_POSITIONS
    if not isinstance(items, (list, tuple)) or len(items) > limit:
        raise RequestError(spelled, f"{spelled} must be an integer or a list of at most {limit} integers "
                                    f"(got {_shown(value)})")
    item = Field(name, "int", None, "", f.low, f.high)
    return tuple(_number(item, v, spelled, True, text_values) for v in items)


# -- doors -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Door:
    """How one protocol spells a request: ``keys`` maps a field to the protocol's key (absent: the
    field's name), ``schedule_key`` names the object that holds the schedule fields (None: they sit
    beside the others), ``prefix`` goes before a key in a refusal, ``defaults`` are the protocol's own."""

    name: str
    keys: Mapping[str, str] = field(default_factory=dict)
    schedule_key: str | None = None
    prefix: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    text_values: bool = False   # numbers and booleans may come as strings
    ignore_unknown: bool = False

    def key(self, name: str) -> str:
        return self.keys.get(name, name)

    def spelled(self, name: str) -> str:
        """``name`` as a refusal names it."""
        if name in SCHEDULE_FIELDS_BY_NAME and self.schedule_key:
            return f"{self.prefix}{self.schedule_key}.{self.key(name)}"
        return f"{self.prefix}{self.key(name)}"

    def default(self, name: str) -> Any:
        return self.defaults.get(name, FIELDS[name].default)


PROTOCOL_DEFAULTS = {"max_new_tokens": 16, "temperature": 1.0}  # OpenAI's, and vLLM's

PYTHON = Door("python", keys={"stop": "stop_strings"})
C = Door("c", prefix="params_json: ")
OPENAI = Door("openai", keys={"max_new_tokens": "max_tokens"}, schedule_key="skipdecode", defaults=PROTOCOL_DEFAULTS,
              ignore_unknown=True)
TRITON = Door("triton", keys={"max_new_tokens": "max_tokens"}, schedule_key="skipdecode",
              prefix="sampling_parameters.", defaults=PROTOCOL_DEFAULTS, text_values=True)
CLI = Door("cli", keys={f.name: "--" + f.name.replace("_", "-") for f in SAMPLING_FIELDS + SCHEDULE_FIELDS}
           | {"stop_token_ids": "--stop-token-id"})


@dataclass(frozen=True)
class RequestParams:
    """A checked request: what ``Runtime.generate`` and ``ServingEngine.submit`` take."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    schedule: Mapping[str, Any] | None = None   # the schedule fields given; None: the default schedule
    door: Door = PYTHON

    def knobs(self, seed_offset: int = 0) -> dict:
        """``Runtime.generate`` / ``ServingEngine.submit`` keywords (``seed_offset``: OpenAI's choice
        i of n draws from seed + i)."""
        seed = None if self.seed is None else (self.seed + seed_offset) % 2**64
        knobs = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                     repetition_penalty=self.repetition_penalty, seed=seed, stop_strings=self.stop,
                     stop_token_ids=self.stop_token_ids)
        return {**knobs, "eos_token_id": None} if self.ignore_eos else knobs

    def schedule_for(self, num_layers: int, default: LayerSchedule | None) -> LayerSchedule | None:
        """The schedule the fields describe (modifying ``default``; a new decay spans this request's
        decode steps), or ``default`` when none is given; a RequestError names the door's key."""
        if not self.schedule:
            return default
        try:
            return schedule_from_options(self.schedule, num_layers, default, self.max_new_tokens - 1)
        except SkipDeployError as exc:
            where = self.door.schedule_key or "schedule"
            raise RequestError(self.door.prefix + where, f"{self.door.prefix}{where}: {exc}") from None


def schedule_of(schedule: LayerSchedule | Mapping[str, Any] | None, num_layers: int, default: LayerSchedule,
                max_new_tokens: int) -> LayerSchedule:
    """Python's ``schedule`` argument: a LayerSchedule as given, None for ``default``, or a mapping of
    the schedule fields (as the other doors send them; a new decay spans the decode steps)."""
    if schedule is None or isinstance(schedule, LayerSchedule):
        return schedule or default
    if not isinstance(schedule, Mapping):
        raise InputError(f"schedule must be a LayerSchedule or a mapping of schedule fields (got "
                         f"{type(schedule).__name__})")
    fields = {k: v for k, v in schedule.items() if v is not None}
    _refuse_unknown(fields, [f.name for f in SCHEDULE_FIELDS], "schedule", "schedule")
    fields = {k: check(k, v, f"schedule[{k!r}]") for k, v in fields.items()}
    return RequestParams(max_new_tokens=max_new_tokens, schedule=fields).schedule_for(num_layers, default)


def parse(values: Mapping[str, Any] | None, door: Door) -> RequestParams:
    """A request as ``door`` spells it -> RequestParams, or a RequestError naming the key. Keys
    whose value is None are absent."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    sampling_keys = {door.key(f.name): f.name for f in SAMPLING_FIELDS}
    schedule_keys = {door.key(f.name): f.name for f in SCHEDULE_FIELDS}
    schedule_values: Mapping[str, Any] = {}
    if door.schedule_key is not None:
        schedule_values = _schedule_object(values.pop(door.schedule_key, None), door)
    else:
        schedule_values = {k: values.pop(k) for k in list(values) if k in schedule_keys}
    if not door.ignore_unknown:
        _refuse_unknown(values, list(sampling_keys), door.prefix.rstrip(". :") or "the request", None)
    if door.schedule_key is not None:  # an object of ours: unknown keys are a mistake, whatever the protocol
        where = door.prefix + door.schedule_key
        _refuse_unknown(schedule_values, list(schedule_keys), where, where)
    given = {name: check(name, values[key], door.spelled(name), door.text_values)
             for key, name in sampling_keys.items() if key in values}
    schedule = {name: check(name, schedule_values[key], door.spelled(name), door.text_values)
                for key, name in schedule_keys.items() if key in schedule_values}
    if "temperature" not in given and "temperature" not in door.defaults and \
            (given.get("top_k", 0) > 0 or given.get("top_p", 1.0) < 1.0):
        given["temperature"] = 1.0
    merged = {f.name: given.get(f.name, door.default(f.name)) for f in SAMPLING_FIELDS}
    return RequestParams(**merged, schedule=schedule or None, door=door)


def _schedule_object(value: Any, door: Door) -> Mapping[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str) and door.text_values:  # an object sent as JSON text
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if not isinstance(value, dict):
        where = door.prefix + door.schedule_key
        raise RequestError(where, f"{where} must be an object of schedule fields "
                                  f"({', '.join(f.name for f in SCHEDULE_FIELDS)}) (got {_shown(value)})")
    return {k: v for k, v in value.items() if v is not None}


def _refuse_unknown(values: Mapping[str, Any], known: list[str], where: str, param: str | None) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RequestError(param or unknown[0], f"unknown key(s) {', '.join(unknown)} in {where}; known: "
                                                f"{', '.join(known)}")


