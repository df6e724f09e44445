"""One request of the in-flight engine: what it asked for, how far it got, and its token stream.

The engine's thread writes (``emit``, ``finish``); any number of client threads or asyncio tasks
read (``stream``, ``result``, ``astream``). A request follows its own schedule from its own step
0 and samples from its own random generator, exactly as ``Runtime.generate`` of it alone would.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import AsyncIterator, Callable, Iterator

import numpy as np

from ..errors import SkipDeployError
from ..runtime.generator import GenerationResult
from ..runtime.sampling import GenerationConfig, TokenPicker
from ..schedule import LayerSchedule

FINISH_REASONS = ("eos", "stop", "length", "cancelled", "error")
_ids = itertools.count()


class Request:
    def __init__(self, prompt: list[int], config: GenerationConfig, schedule: LayerSchedule, eos: set[int],
                 num_layers: int, request_id: str | None = None) -> None:
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt, self.config, self.schedule, self.eos = prompt, config, schedule, eos
        self.picker = TokenPicker(config, [prompt])
        self.tokens: list[int] = []
        # Entry i: the layers of the forward pass that produced token i (entry 0: the prompt's).
        self.layers_per_token: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        # Engine-side progress.
        self.slot: int | None = None
        self.prefilled = 0                                   # prompt positions cached so far
        self.valid = np.zeros(num_layers, np.int64)         # cached positions per layer
        self.cancelled = False
        # Timing (perf_counter seconds).
        self.created = time.perf_counter()
        self.admitted: float | None = None
        self.token_times: list[float] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def layers_per_step(self) -> list[int]:
        """Layers run by decode step s (the forward of token s, which produced token s + 1), as in
        ``GenerationResult.layers_per_step``: the prompt's forward is not a decode step."""
        return self.layers_per_token[1:]

    @property
    def step(self) -> int:
        """The decode step the next forward pass of this request is (token s feeds step s)."""
        return len(self.tokens) - 1

    def cancel(self) -> None:
        """Stop generating (a client went away); the engine frees the slot at its next iteration."""
        self.cancelled = True

    # -- written by the engine's thread --------------------------------------------------------
    def emit(self, token: int, layers: int) -> None:
        with self._cond:
            self.tokens.append(token)
            self.layers_per_token.append(layers)
            self.token_times.append(time.perf_counter())
            self._cond.notify_all()
        self._wake()

    def finish(self, reason: str, error: str | None = None, observe: Callable[[], None] | None = None) -> None:
        """End the request; ``observe`` (the engine's metrics) runs before any reader can see it done,
        so a client that has its answer also finds it counted."""
        with self._cond:
            if self.finish_reason is None:
                self.finish_reason, self.error = reason, error
                if observe is not None:
                    observe()
            self._cond.notify_all()
        self._wake()

    def _wake(self) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # the client's loop has closed: nobody is listening
                pass

    # -- read by clients -----------------------------------------------------------------------
    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Token ids as they are generated (blocking); raises if the request failed."""
        seen = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while len(self.tokens) == seen and not self.done:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise SkipDeployError(f"request {self.id}: no token within {timeout} s")
                    self._cond.wait(left)
                new, finished = self.tokens[seen:], self.done
            yield from new
            seen += len(new)
            if finished and seen == len(self.tokens):
                self._raise_if_failed()
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        for _ in self.stream(timeout):
            pass
        return self.to_result()

    async def astream(self) -> AsyncIterator[int]:
        """Token ids as they are generated, for asyncio (the request must have been submitted
        from the running loop, see ``ServingEngine.submit``)."""
        if self._event is None:
            raise SkipDeployError("this request was not submitted from an asyncio loop")
        seen = 0
        while True:
            self._event.clear()
            with self._cond:
                new, finished = self.tokens[seen:], self.done
            for token in new:
                yield token
            seen += len(new)
            if finished and seen == len(self.tokens):
                self._raise_if_failed()
                return
            if not new:
                await self._event.wait()

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._event = loop, asyncio.Event()

    def _raise_if_failed(self) -> None:
        if self.finish_reason == "error":
            raise SkipDeployError(f"request {self.id} failed: {self.error}")

    def to_result(self) -> GenerationResult:
        first = self.token_times[0] if self.token_times else time.perf_counter()
        return GenerationResult(tokens=[list(self.tokens)], layers_per_step=self.layers_per_step,
                                prompt_layers=len(self.schedule.prompt_layers()),
                                finish_reasons=[self.finish_reason or "length"], schedule=self.schedule,
                                prefill_seconds=first - (self.admitted or self.created),
                                decode_seconds=(self.token_times[-1] - first) if self.token_times else 0.0)

    # -- timing --------------------------------------------------------------------------------
    @property
    def time_to_first_token(self) -> float | None:
        return self.token_times[0] - self.created if self.token_times else None

    def time_per_output_token(self) -> list[float]:
        return list(np.diff(self.token_times)) if len(self.token_times) > 1 else []
