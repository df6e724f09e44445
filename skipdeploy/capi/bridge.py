"""The Python behind the C API: what each ``sd_*`` function does, in Python terms.

Two layers. :class:`Bridge` takes and returns plain Python values (ids, lists, str) and raises
skipdeploy errors; it is importable and testable without a C compiler. :func:`install` binds it
to the cffi library the build made, one ``@ffi.def_extern`` per function of the table in
``functions.py`` (made by ``binding.py``, which converts C arguments, writes results into the
caller's buffers, and turns every exception into a status from ``status.py`` plus a one-line
message for ``sd_last_error``). No Python exception ever reaches C.

An ``sd_runtime *`` is an integer id cast to a pointer, looked up in ``Bridge.handles``; ids are
never reused, so a freed handle is reported as such, not confused with a newer one. Each handle
holds a :class:`~skipdeploy.serving.ServingEngine`, so concurrent calls from C threads batch in
its in-flight engine; a call waits for its request with the GIL released.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .. import __version__
from ..errors import BackendError, InputError, ManifestError
from ..runtime.core import check_integer, check_memory_limit, check_threads
from ..runtime.inputs import DEFAULT
from ..runtime.text import CompletionText
from ..schedule import LayerSchedule
from ..request_params import C
from ..request_params import parse as parse_request
from .binding import install as _install

# options_json of sd_load: ServingEngine's arguments, plus device (the in-flight engine is CPU-only).
OPTION_KEYS = ("backend", "device", "threads", "memory_limit", "check_files", "max_batch", "max_queue", "max_length",
               "prefill_chunk")
_PARAMS_CACHE = 64     # parsed params_json strings kept per runtime


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
    # The engine core's own checks, before anything loads (ServingEngine runs them again).
    check_threads(options.get("threads"))
    check_memory_limit(options.get("memory_limit"))
    for name, low in (("max_batch", 1), ("max_queue", 0), ("max_length", 2), ("prefill_chunk", 1)):
        if name in options:
            check_integer(name, options[name], low)
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
    """A generate call's ``params_json`` (None: the export's schedule, greedy, 32 new tokens): the
    fields of ``request_params`` under their own names, the schedule fields beside the others."""
    request = parse_request(json_object(text, "params_json"), C)
    schedule = request.schedule_for(num_layers, default_schedule)
    knobs = request.knobs()
    eos = knobs.pop("eos_token_id", DEFAULT)
    return Params(request.max_new_tokens, schedule, knobs, eos)


# -- the calls ----------------------------------------------------------------------------------

class Handle:
    """One sd_runtime: a ServingEngine and the params_json strings it has parsed."""

    def __init__(self, serving, backend: str) -> None:
        self.serving = serving
        self.backend = backend
        self._params: dict[str | None, Params] = {}

    def params(self, text: str | None) -> Params:
        parsed = self._params.get(text)
        if parsed is None:
            parsed = parse_params(text, self.serving.spec.num_layers, self.serving.schedule)
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
        serving = self._engine_factory(directory, **options)
        with self._lock:
            handle_id = next(self._ids)
            self.handles[handle_id] = Handle(serving, options.get("backend", "onnxruntime"))
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
        return handle.params(params_json).submit(handle.serving, prompt)

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
        """The completion's text, ending before its first stop string (every door's rule)."""
        handle = self.handle(handle_id)
        tokenizer = handle.serving.tokenizer
        tokens = self.generate(handle_id, tokenizer.encode(prompt), params_json)
        return CompletionText(tokenizer.decode, handle.params(params_json).knobs.get("stop_strings", ()), tokens).text()

    def tokenize(self, handle_id: int, text: str) -> list[int]:
        return self.handle(handle_id).serving.tokenizer.encode(text)

    def detokenize(self, handle_id: int, ids: Sequence[int]) -> str:
        serving = self.handle(handle_id).serving
        vocab = serving.spec.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise InputError(f"token id {t} is outside the vocabulary [0, {vocab})")
        return serving.tokenizer.decode(list(ids))

    def info(self, handle_id: int) -> str:
        handle = self.handle(handle_id)
        serving, spec = handle.serving, handle.serving.spec
        return json.dumps({
            "version": __version__, "export": str(serving.manifest.directory), "backend": handle.backend,
            "num_layers": spec.num_layers, "vocab_size": spec.vocab_size, "max_length": serving.max_length,
            "eos_token_id": spec.eos_token_id, "bos_token_id": spec.bos_token_id, "pad_token_id": spec.pad_token_id,
            "has_tokenizer": serving.manifest.tokenizer_path is not None, "schedule": serving.schedule.to_dict(),
            "max_batch": serving.max_batch, "max_queue": serving.max_queue, "dtype": serving.manifest.dtype})

    def free(self, handle_id: int) -> None:
        with self._lock:
            handle = self.handles.pop(handle_id, None)
        if handle is None:
            raise InputError(f"rt ({handle_id:#x}) is not a live sd_runtime (freed twice?)")  # the binding says sd_free
        handle.serving.shutdown()
        close = getattr(getattr(handle.serving, "engine", None), "close", None)  # the backend engine
        if close is not None:
            close()

    def free_all(self) -> None:
        for handle_id in list(self.handles):
            self.free(handle_id)


BRIDGE = Bridge()


# -- the cffi binding --------------------------------------------------------------------------

def install(ffi, lib, bridge: Bridge = BRIDGE) -> tuple[str, ...]:
    """Attach the ``extern "Python"`` functions of the built library to ``bridge``: one per
    function of ``functions.FUNCTIONS`` that runs Python (see ``binding.py``). Called once, by the
    library's init code, with the library's own ``ffi`` and ``lib``; returns the names bound."""
    return _install(ffi, lib, bridge)
