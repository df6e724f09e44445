"""``ServingEngine``: in-flight batching of many requests, each with its own SkipDecode schedule.

One thread owns the backend and runs iterations (``iteration.py``); requests join between
iterations (their prompts run in chunks alongside the decode steps of the others) and leave as
soon as they finish (EOS, a stop, their length, cancellation, an error), freeing their slot.
Every request gets exactly the tokens ``Runtime.generate`` gives it alone with the same schedule
and knobs (up to float rounding under a different batch shape, which can only flip a near-tie).

Memory is fixed when the engine starts: a slot cache of ``max_batch`` slots of ``max_length``
positions per layer, checked against what the machine has free. A request takes one slot for its
lifetime; one that finds none waits in a bounded queue, and past the queue it is refused
(``QueueFullError``). Load never grows memory.

    engine = ServingEngine("opt-sd", max_batch=16)
    request = engine.submit([2, 100, 200], max_new_tokens=32, schedule=Schedule.target_speedup(12, 2))
    for token in request.stream(): ...          # or request.result(); ``async for`` with astream()
    engine.shutdown()
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from ..errors import CapacityError, InputError, SkipDeployError
from ..runtime.core import EngineCore, check_integer, check_memory_limit, open_engine
from ..runtime.generator import GenerationResult
from ..runtime.inputs import DEFAULT, check_schedule
from ..runtime.sampling import GenerationConfig
from ..runtime.tokenizer import Tokenizer
from ..schedule import LayerSchedule
from . import iteration
from .request import Request

POLICIES = ("continuous", "aligned", "drain")


class QueueFullError(CapacityError):
    """Every slot is busy and the waiting queue is full: try again later."""


class ServingEngine:
    """In-flight batching over one loaded export.

    ``policy``: ``continuous`` admits a waiting request as soon as a slot is free; ``aligned``
    admits only every ``align_steps`` iterations (or into an empty batch), so that requests
    admitted together stay at the same step and share layer sets: fewer, fuller layer calls
    under SkipDecode, at the price of waiting; ``drain`` admits only when nothing runs (static
    batches, for comparison). ``prefill_chunk``: prompt
    positions run per iteration, in all, so that a long prompt does not stall the running rows
    for its whole length. ``prefill_first``: iterations that run prompt chunks run only them, so
    that a new request's first token waits for prompts only (lower time to first token; the
    running rows skip that iteration, never two in a row). ``observer``: an object whose optional methods ``on_iteration(stats,
    seconds)`` and ``on_finish(request)`` the engine's thread calls (the server's metrics).
    ``backend``, ``device``, ``threads``, ``check_files``, ``memory_limit`` and the backend's own
    options mean what they mean to ``skipdeploy.load``: both open the export through
    ``runtime.core``. ``engine`` is the backend engine (an ``InflightEngine``).
    """

    def __init__(self, directory: str | Path, *, backend: str = "onnxruntime", device: str | None = None,
                 threads: int | None = None, max_batch: int = 16, max_queue: int = 64, max_length: int | None = None,
                 prefill_chunk: int = 64, policy: str = "continuous", align_steps: int = 16,
                 prefill_first: bool = True, schedule: LayerSchedule | None = None, check_files: bool = True,
                 memory_limit: int | None = None, observer=None, **backend_options) -> None:
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                                 ("prefill_chunk", prefill_chunk, 1), ("align_steps", align_steps, 1)):
            check_integer(name, value, low)
        if policy not in POLICIES:
            raise InputError(f"unknown admission policy {policy!r}; choose one of {', '.join(POLICIES)}")
        memory_limit = check_memory_limit(memory_limit)
        manifest, engine = open_engine(directory, backend=backend, device=device, inflight=True, threads=threads,
                                       check_files=check_files, max_length=max_length, **backend_options)
        # The same core as Runtime's: ``engine`` is the backend engine, ``core`` what surrounds it.
        self.core = EngineCore(manifest, engine, memory_limit, inflight=True)
        self.manifest, self.engine, self.spec = manifest, engine, manifest.model
        self.max_length = max_length or manifest.max_length
        self.schedule = check_schedule(schedule or manifest.schedule, self.spec.num_layers)
        self.max_batch, self.max_queue, self.prefill_chunk, self.policy = max_batch, max_queue, prefill_chunk, policy
        self.align_steps, self.prefill_first = align_steps, prefill_first
        self._prompts_only = False  # whether the last iteration held the decoding rows back
        self.iterations = 0
        self.slot_bytes = 2 * self.spec.num_layers * self.max_length * self.spec.kv_dim * engine.cache_itemsize
        self.core.check_fits(self.slot_bytes * max_batch,
                             f"{max_batch} slots of {self.max_length} positions need {{need}} of KV cache",
                             "lower max_batch or max_length")
        self.cache = self.engine.allocate_slots(max_batch, self.max_length)
        self.observer = observer
        self._queue: deque[Request] = deque()
        self._running: list[Request] = []
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="skipdeploy-engine", daemon=True)
        self._thread.start()

    # -- text ------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self.core.tokenizer

    # -- requests --------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], max_new_tokens: int | None = None, schedule: LayerSchedule | None = None,
               *, config: GenerationConfig | None = None, eos_token_id=DEFAULT, request_id: str | None = None,
               **knobs) -> Request:
        """Queue one prompt (token ids); returns its :class:`Request` at once. Called from a running
        asyncio loop, the request can also be read with ``async for token in request.astream()``.
        Bad input raises here (``InputError``, ``CapacityError``); a full queue ``QueueFullError``."""
        checked = self.core.check_request([prompt], max_new_tokens, schedule, config, knobs, eos_token_id,
                                          default_schedule=self.schedule, max_length=self.max_length,
                                          holder="this engine")
        config = checked.config
        if config.stop_strings:
            self.tokenizer  # noqa: B018 - stop strings need text: fail now, not mid-generation
        request = Request(checked.rows[0], config, checked.schedule, checked.eos, self.spec.num_layers, request_id)
        try:
            request.attach_loop(asyncio.get_running_loop())
        except RuntimeError:
            pass  # not called from a running event loop
        with self._cond:
            if self._stopping:
                raise SkipDeployError("the engine is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue + len(self._free_slots):
                raise QueueFullError(f"all {self.max_batch} slots are busy and {len(self._queue)} requests wait "
                                     f"(the queue holds {self.max_queue}); try again later")
            self._queue.append(request)
            self._cond.notify_all()
        return request

    def generate(self, prompt: Sequence[int], max_new_tokens: int | None = None, schedule: LayerSchedule | None = None,
                 **kwargs) -> GenerationResult:
        """Submit and wait: the same result ``Runtime.generate([prompt], ...)`` returns."""
        return self.submit(prompt, max_new_tokens, schedule, **kwargs).result()

    # -- state -----------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def cache_bytes_in_use(self) -> int:
        return self.slot_bytes * len(self._running)

    @property
    def ready(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def shutdown(self, drain_timeout: float | None = 30.0) -> None:
        """Stop admitting; let running and queued requests finish (at most ``drain_timeout``
        seconds, then cancel what is left), and stop the engine's thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = None if drain_timeout is None else time.monotonic() + drain_timeout
        while self._thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                with self._cond:
                    for r in list(self._queue) + self._running:
                        r.cancel()
                    self._cond.notify_all()
                deadline = None
            self._thread.join(0.05)

    # -- the engine's thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled_waiting()
                self._admit()
                if not self._running:
                    if self._stopping and not self._queue:
                        return
                    self._cond.wait(0.5)
                    continue
                running = list(self._running)
            self._iterate(running)

    def _admit(self) -> None:
        if self._running and (self.policy == "drain" or
                              (self.policy == "aligned" and self.iterations % self.align_steps)):
            return
        while self._queue and self._free_slots:
            request = self._queue.popleft()
            request.slot = self._free_slots.pop()
            request.admitted = time.perf_counter()
            self._running.append(request)

    def _drop_cancelled_waiting(self) -> None:
        for request in [r for r in self._queue if r.cancelled]:
            self._queue.remove(request)
            self._finished(request, "cancelled")

    def _iterate(self, running: list[Request]) -> None:
        for request in [r for r in running if r.cancelled]:
            self._release(request, "cancelled")
            running.remove(request)
        # Never two prompt-only iterations in a row: decoding rows must not starve under arrivals.
        parts = iteration.plan(running, self.prefill_chunk, self.prefill_first and not self._prompts_only)
        if not parts:
            return
        self._prompts_only = all(p.prefill for p in parts) and len(parts) < len(running)
        self.iterations += 1
        start = time.perf_counter()
        try:
            logits, stats = iteration.run(self.engine, self.cache, parts)
        except SkipDeployError as exc:  # fail this iteration's requests, keep serving the others
            for p in parts:
                self._release(p.request, "error", str(exc))
            return
        row = 0
        for p in parts:
            if p.prefill:
                p.request.prefilled += len(p.ids)
            if not p.logits:
                continue
            request = p.request
            token = int(request.picker.pick(logits[row:row + 1])[0])
            row += 1
            request.emit(token, len(p.layers))
            reason = self._finish_reason(request, token)
            if reason:
                self._release(request, reason)
        self._notify("on_iteration", stats, time.perf_counter() - start)

    def _finish_reason(self, request: Request, token: int) -> str | None:
        reason = request.config.finish_reason(token, request.tokens, request.eos, lambda ids: self.tokenizer.decode(ids))
        if reason is None and len(request.tokens) >= request.config.max_new_tokens:
            return "length"
        return reason

    def _release(self, request: Request, reason: str, error: str | None = None) -> None:
        with self._cond:
            if request in self._running:
                self._running.remove(request)
                self._free_slots.append(request.slot)
                self._cond.notify_all()
        self._finished(request, reason, error)

    def _finished(self, request: Request, reason: str, error: str | None = None) -> None:
        request.finish(reason, error, observe=lambda: self._notify("on_finish", request))

    def _notify(self, event: str, *args) -> None:
        hook: Callable | None = getattr(self.observer, event, None)
        if hook is not None:
            try:
                hook(*args)
            except Exception:  # metrics must never take the engine down
                pass
