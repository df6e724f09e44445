"""The Python behind the C API: what each ``sd_*`` function does, in Python terms.

Two layers. :class:`Bridge` takes and returns plain Python values (ids, lists, str) and raises
skipdeploy errors; it is importable and testable without a C compiler. :func:`install` binds it
to the cffi library the build made (``@ffi.def_extern`` for every ``extern "Python"`` function
of ``header.CDEF``): it converts C arguments, writes results into the caller's buffers, and turns
every exception into a status (``status_of``) plus a one-line message for ``sd_last_error``
(which lives in C, per thread). No Python exception ever reaches C.

An ``sd_runtime *`` is an integer id cast to a pointer, looked up in ``Bridge.handles``; ids are
never reused, so a freed handle is reported as such, not confused with a newer one. Each handle
holds a :class:`~skipdeploy.serving.ServingEngine`, so concurrent calls from C threads batch in
its in-flight engine; a call waits for its request with the GIL released.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .. import __version__
from ..errors import (BackendError, CapacityError, ExportError, InputError, ManifestError, ScheduleError,
                      SkipDeployError)
from ..runtime.inputs import DEFAULT
from ..schedule import LayerSchedule
from ..schedule_options import FIELDS, schedule_from_options
from .header import PY_BASE

OK, ERR_INPUT, ERR_CAPACITY, ERR_EXPORT, ERR_BUFFER, ERR_INTERNAL = range(6)
STATUS_NAMES = ("SD_OK", "SD_ERR_INPUT", "SD_ERR_CAPACITY", "SD_ERR_EXPORT", "SD_ERR_BUFFER", "SD_ERR_INTERNAL")

# options_json of sd_load: ServingEngine's arguments, plus device (the in-flight engine is CPU-only).
OPTION_KEYS = ("backend", "device", "threads", "memory_limit", "check_files", "max_batch", "max_queue", "max_length",
               "prefill_chunk")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
# params_json of the generate calls.
PARAM_KEYS = ("max_new_tokens", *FIELDS, "full", "table", *SAMPLING_KEYS, "stop", "stop_token_ids", "ignore_eos")
DEFAULT_MAX_NEW_TOKENS = 32
MESSAGE_LIMIT = 1000   # bytes; the C buffer holds 1023
_PARAMS_CACHE = 64     # parsed params_json strings kept per runtime


# -- errors ----------------------------------------------------------------------------------------

def status_of(exc: BaseException, loading: bool = False) -> int:
    """The sd_status of an exception: bad input, does not fit, a bad export (at load), or internal."""
    if isinstance(exc, (InputError, ScheduleError)):
        return ERR_INPUT
    if isinstance(exc, CapacityError):  # QueueFullError included
        return ERR_CAPACITY
    if loading and isinstance(exc, (ManifestError, ExportError, BackendError)):
        return ERR_EXPORT
    return ERR_INTERNAL


def message_of(exc: BaseException, where: str = "") -> str:
    """One line for sd_last_error: skipdeploy's own message, or the exception's type and text."""
    text = str(exc) if isinstance(exc, SkipDeployError) else f"{type(exc).__name__}: {exc}".rstrip(": ")
    return one_line(f"{where}: {text}" if where else text)


def one_line(text: str) -> str:
    text = " ".join(text.split())
    data = text.encode("utf-8", "replace")
    if len(data) > MESSAGE_LIMIT:
        text = data[:MESSAGE_LIMIT - 3].decode("utf-8", "ignore") + "..."
    return text


# -- options and parameters ------------------------------------------------------------------------

def json_object(text: str | None, what: str) -> dict[str, Any]:
    """``text`` (None or "" for none) as a JSON object, or an InputError naming ``what``."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object (got {type(value).__name__}: {text.strip()[:40]})")
    return value


def _unknown(given, known, what: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(map(repr, unknown))} in {what}; known: {', '.join(known)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def engine_options(text: str | None) -> dict[str, Any]:
    """sd_load's ``options_json`` as ServingEngine keyword arguments (checked)."""
    options = json_object(text, "options_json")
    _unknown(options, OPTION_KEYS, "options_json")
    options = {k: v for k, v in options.items() if v is not None}
    device = options.pop("device", "cpu")
    if device != "cpu":
        raise BackendError(f"the C API serves through the in-flight engine, which runs on the CPU (device 'cpu'); "
                           f"got device {device!r}")
    backend = options.get("backend", "onnxruntime")
    if backend not in ("onnxruntime", "torch"):
        raise BackendError(f"the C API's in-flight engine runs the onnxruntime or torch backend (got {backend!r})")
    for name, low in (("threads", 1), ("memory_limit", 1), ("max_batch", 1), ("max_queue", 0), ("max_length", 2),
                      ("prefill_chunk", 1)):
        if name in options and (not _is_int(options[name]) or options[name] < low):
            raise InputError(f"{name} must be an integer >= {low} (got {options[name]!r})")
    if "check_files" in options and not isinstance(options["check_files"], bool):
        raise InputError(f"check_files must be true or false (got {options['check_files']!r})")
    return options


@dataclass(frozen=True)
class Params:
    """A parsed ``params_json``: what ``ServingEngine.submit`` takes."""

    max_new_tokens: int
    schedule: LayerSchedule
    knobs: dict[str, Any]
    eos_token_id: Any = DEFAULT   # DEFAULT: the model's; None: never stop at EOS (ignore_eos)

    def submit(self, engine, prompt: Sequence[int]):
        return engine.submit(prompt, self.max_new_tokens, self.schedule, eos_token_id=self.eos_token_id, **self.knobs)


def parse_params(text: str | None, num_layers: int, default_schedule: LayerSchedule | None) -> Params:
    """A generate call's ``params_json`` (None: the export's schedule, greedy, 32 new tokens)."""
    params = json_object(text, "params_json")
    _unknown(params, PARAM_KEYS, "params_json")
    n = params.get("max_new_tokens")
    n = DEFAULT_MAX_NEW_TOKENS if n is None else n
    if not _is_int(n) or n < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1 (got {n!r})")
    try:
        schedule = schedule_from_options({k: params.get(k) for k in (*FIELDS, "full", "table") if k in params},
                                         num_layers, default_schedule, decode_steps=n - 1)
    except SkipDeployError:
        raise
    except (TypeError, ValueError) as exc:  # a field of the wrong type that the schedule did not name
        raise ScheduleError(f"bad schedule in params_json: {exc}") from None
    knobs = {k: params[k] for k in SAMPLING_KEYS if params.get(k) is not None}
    stop = params.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InputError(f"stop must be a string or a list of strings (got {params['stop']!r})")
        if stop:
            knobs["stop_strings"] = tuple(stop)
    ids = params.get("stop_token_ids")
    if ids is not None:
        if isinstance(ids, int):
            ids = [ids]
        if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
            raise InputError(f"stop_token_ids must be a list of token ids (got {params['stop_token_ids']!r})")
        knobs["stop_token_ids"] = tuple(ids)
    ignore_eos = params.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InputError(f"ignore_eos must be true or false (got {ignore_eos!r})")
    return Params(n, schedule, knobs, None if ignore_eos else DEFAULT)


# -- the calls ----------------------------------------------------------------------------------

class Handle:
    """One sd_runtime: a ServingEngine and the params_json strings it has parsed."""

    def __init__(self, engine, backend: str) -> None:
        self.engine = engine
        self.backend = backend
        self._params: dict[str | None, Params] = {}

    def params(self, text: str | None) -> Params:
        parsed = self._params.get(text)
        if parsed is None:
            parsed = parse_params(text, self.engine.spec.num_layers, self.engine.schedule)
            if len(self._params) >= _PARAMS_CACHE:
                self._params.clear()
            self._params[text] = parsed
        return parsed


class Bridge:
    """The C API's calls on Python values. ``engine_factory`` makes the engine of sd_load
    (``ServingEngine`` unless a test passes another)."""

    def __init__(self, engine_factory: Callable | None = None) -> None:
        self.handles: dict[int, Handle] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._engine_factory = engine_factory

    def load(self, directory: str, options_json: str | None = None) -> int:
        options = engine_options(options_json)
        if self._engine_factory is None:
            from ..serving import ServingEngine

            self._engine_factory = ServingEngine
        if not directory:
            raise ManifestError("export_dir is empty; pass the directory `skipdeploy export` wrote")
        engine = self._engine_factory(directory, **options)
        with self._lock:
            handle_id = next(self._ids)
            self.handles[handle_id] = Handle(engine, options.get("backend", "onnxruntime"))
        return handle_id

    def handle(self, handle_id: int) -> Handle:
        handle = self.handles.get(handle_id)
        if handle is None:
            raise InputError(f"rt ({handle_id:#x}) is not a live sd_runtime: it was freed, or did not come from "
                             "sd_load")
        return handle

    def submit(self, handle_id: int, prompt: Sequence[int], params_json: str | None = None):
        handle = self.handle(handle_id)
        if len(prompt) == 0:
            raise InputError("the prompt is empty; pass at least one token id (e.g. the BOS token)")
        return handle.params(params_json).submit(handle.engine, prompt)

    def generate(self, handle_id: int, prompt: Sequence[int], params_json: str | None = None) -> list[int]:
        request = self.submit(handle_id, prompt, params_json)
        try:
            request.result()
        finally:
            if not request.done:
                request.cancel()
        return list(request.tokens)

    def stream(self, handle_id: int, prompt: Sequence[int], params_json: str | None,
               callback: Callable[[int], Any]) -> None:
        """Call ``callback(token)`` per token; a true return cancels the request."""
        request = self.submit(handle_id, prompt, params_json)
        try:
            for token in request.stream():
                if callback(token):
                    request.cancel()
                    break
        finally:
            if not request.done:
                request.cancel()

    def generate_text(self, handle_id: int, prompt: str, params_json: str | None = None) -> str:
        tokenizer = self.handle(handle_id).engine.tokenizer
        return tokenizer.decode(self.generate(handle_id, tokenizer.encode(prompt), params_json))

    def tokenize(self, handle_id: int, text: str) -> list[int]:
        return self.handle(handle_id).engine.tokenizer.encode(text)

    def detokenize(self, handle_id: int, ids: Sequence[int]) -> str:
        engine = self.handle(handle_id).engine
        vocab = engine.spec.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise InputError(f"token id {t} is outside the vocabulary [0, {vocab})")
        return engine.tokenizer.decode(list(ids))

    def info(self, handle_id: int) -> str:
        handle = self.handle(handle_id)
        engine, spec = handle.engine, handle.engine.spec
        return json.dumps({
            "version": __version__, "export": str(engine.manifest.directory), "backend": handle.backend,
            "num_layers": spec.num_layers, "vocab_size": spec.vocab_size, "max_length": engine.max_length,
            "eos_token_id": spec.eos_token_id, "bos_token_id": spec.bos_token_id, "pad_token_id": spec.pad_token_id,
            "has_tokenizer": engine.manifest.tokenizer_path is not None, "schedule": engine.schedule.to_dict(),
            "max_batch": engine.max_batch, "max_queue": engine.max_queue, "dtype": engine.manifest.dtype})

    def free(self, handle_id: int) -> None:
        with self._lock:
            handle = self.handles.pop(handle_id, None)
        if handle is None:
            raise InputError(f"sd_free: rt ({handle_id:#x}) is not a live sd_runtime (freed twice?)")
        handle.engine.shutdown()
        close = getattr(getattr(handle.engine, "engine", None), "close", None)
        if close is not None:
            close()

    def free_all(self) -> None:
        for handle_id in list(self.handles):
            self.free(handle_id)


BRIDGE = Bridge()


# -- the cffi binding --------------------------------------------------------------------------

def install(ffi, lib, bridge: Bridge = BRIDGE) -> None:
    """Attach the ``extern "Python"`` functions of the built library to ``bridge``. Called once,
    by the library's init code, with the library's own ``ffi`` and ``lib``."""

    def report(status: int, message: str) -> int:
        lib._sd_set_error(message.encode("utf-8", "replace"))
        return PY_BASE + status

    def fail(exc: BaseException, where: str, loading: bool = False) -> int:
        return report(status_of(exc, loading), message_of(exc, where))

    def onerror(exc_type, exc_value, tb) -> None:
        # Only reached if the handling below itself failed: the call returns SD_ERR_INTERNAL.
        try:
            lib._sd_set_error(message_of(exc_value, "internal error").encode("utf-8", "replace"))
        except BaseException:
            pass

    def extern(func):
        return ffi.def_extern(name=func.__name__, error=PY_BASE + ERR_INTERNAL, onerror=onerror)(func)

    def text_arg(ptr, what: str) -> str | None:
        if ptr == ffi.NULL:
            return None
        try:
            return ffi.string(ptr).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{what} is not valid UTF-8 (byte {exc.start})") from None

    def handle_id(rt) -> int:
        return int(ffi.cast("uintptr_t", rt))

    def put_ids(where: str, ids: list[int], out, capacity: int, out_len) -> int:
        out_len[0] = len(ids)
        if len(ids) > capacity:
            if capacity:
                out[0:capacity] = ids[:capacity]
            return report(ERR_BUFFER, f"{where}: out_capacity is {capacity} and {len(ids)} token ids were produced; "
                                      f"*out_len says how many to make room for")
        if ids:
            out[0:len(ids)] = ids
        return PY_BASE + OK

    def put_text(where: str, text: str, out, capacity: int, out_len) -> int:
        data = text.encode("utf-8", "replace")
        out_len[0] = len(data)
        if len(data) + 1 > capacity:
            if capacity:
                prefix = data[:capacity - 1].decode("utf-8", "ignore").encode("utf-8")
                ffi.memmove(out, prefix + b"\0", len(prefix) + 1)
            return report(ERR_BUFFER, f"{where}: the text is {len(data)} bytes and needs out_capacity >= "
                                      f"{len(data) + 1} (with the NUL); out_capacity is {capacity}")
        ffi.memmove(out, data + b"\0", len(data) + 1)
        return PY_BASE + OK

    @extern
    def _sdpy_load(export_dir, options_json, out):
        try:
            directory = os.fsdecode(ffi.string(export_dir))
            hid = bridge.load(directory, text_arg(options_json, "options_json"))
            out[0] = ffi.cast("sd_runtime *", hid)
            return PY_BASE + OK
        except BaseException as exc:
            return fail(exc, "sd_load", loading=True)

    @extern
    def _sdpy_generate(rt, prompt, prompt_len, params_json, out, out_capacity, out_len):
        try:
            ids = ffi.unpack(prompt, prompt_len) if prompt_len else []
            tokens = bridge.generate(handle_id(rt), ids, text_arg(params_json, "params_json"))
            return put_ids("sd_generate", tokens, out, out_capacity, out_len)
        except BaseException as exc:
            return fail(exc, "sd_generate")

    @extern
    def _sdpy_stream(rt, prompt, prompt_len, params_json, fn, user):
        try:
            ids = ffi.unpack(prompt, prompt_len) if prompt_len else []
            bridge.stream(handle_id(rt), ids, text_arg(params_json, "params_json"), lambda token: fn(token, user))
            return PY_BASE + OK
        except BaseException as exc:
            return fail(exc, "sd_generate_stream")

    @extern
    def _sdpy_text(rt, prompt, params_json, out, out_capacity, out_len):
        try:
            text = bridge.generate_text(handle_id(rt), text_arg(prompt, "prompt"), text_arg(params_json, "params_json"))
            return put_text("sd_generate_text", text, out, out_capacity, out_len)
        except BaseException as exc:
            return fail(exc, "sd_generate_text")

    @extern
    def _sdpy_tokenize(rt, text, out, out_capacity, out_len):
        try:
            ids = bridge.tokenize(handle_id(rt), text_arg(text, "text"))
            return put_ids("sd_tokenize", ids, out, out_capacity, out_len)
        except BaseException as exc:
            return fail(exc, "sd_tokenize")

    @extern
    def _sdpy_detokenize(rt, ids, ids_len, out, out_capacity, out_len):
        try:
            text = bridge.detokenize(handle_id(rt), ffi.unpack(ids, ids_len) if ids_len else [])
            return put_text("sd_detokenize", text, out, out_capacity, out_len)
        except BaseException as exc:
            return fail(exc, "sd_detokenize")

    @extern
    def _sdpy_info(rt, out, out_capacity, out_len):
        try:
            return put_text("sd_runtime_info", bridge.info(handle_id(rt)), out, out_capacity, out_len)
        except BaseException as exc:
            return fail(exc, "sd_runtime_info")

    @extern
    def _sdpy_free(rt):
        try:
            bridge.free(handle_id(rt))
            return PY_BASE + OK
        except BaseException as exc:
            return fail(exc, "sd_free")
