"""Answering one completions request: its choices submitted to the engine (all or none), then
awaited whole or streamed as server-sent events. A client that goes away cancels its choices
(non-streaming: polled while waiting; streaming: the response ends however it ends).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from ..errors import CapacityError, InputError, SkipDeployError
from . import openai_api as api
from .engine import QueueFullError, ServingEngine
from ..runtime.text import CompletionText

RETRY = {"Retry-After": "1"}


def submit(engine: ServingEngine, params: api.CompletionParams, rows: list[list[int]], schedule,
           completion_id: str) -> list:
    """One engine request per choice (prompt-major, as OpenAI numbers choices); all or none."""
    requests = []
    try:
        for p, row in enumerate(rows):
            for j in range(params.n):
                index = p * params.n + j
                requests.append(engine.submit(row, params.max_tokens, schedule, request_id=f"{completion_id}-{index}",
                                              **params.knobs(index)))
    except SkipDeployError as exc:
        for request in requests:
            request.cancel()
        if isinstance(exc, QueueFullError):
            raise api.APIError(429, str(exc), "rate_limit_error", code="queue_full", headers=RETRY) from None
        if isinstance(exc, (InputError, CapacityError, ValueError)):
            raise api.invalid(str(exc)) from None
        raise api.APIError(503, str(exc), "server_error", code="unavailable", headers=RETRY) from None
    return requests


def failure(request) -> api.APIError:
    """The error of a choice that did not finish."""
    if request.finish_reason == "cancelled":
        return api.APIError(503, "the server shut down before the request finished", "server_error",
                            code="unavailable", headers=RETRY)
    return api.APIError(500, f"generation failed: {request.error}", "server_error", code="engine_error")


class Reply:
    """One completions request's choices, answered whole (``wait``) or as events (``events``)."""

    def __init__(self, model_name: str, params: api.CompletionParams, rows: list[list[int]], schedule,
                 decode: Callable[[list[int]], str] | None) -> None:
        self.model_name, self.params, self.rows, self.schedule, self.decode = model_name, params, rows, schedule, decode
        self.id, self.created = api.completion_id(), int(time.time())
        self.requests: list = []

    def _prefix(self, index: int) -> str:
        p = index // self.params.n
        return api.echo_text(self.params.prompts[p], self.rows[p], self.decode) if self.params.echo else ""

    def _usage(self) -> dict:
        return api.usage(sum(map(len, self.rows)), sum(len(r.tokens) for r in self.requests))

    def _body(self, choices: list[dict], usage: dict | None = None, schedule: bool = False) -> dict:
        return api.completion(self.id, self.created, self.model_name, choices, usage,
                              self.schedule if schedule else None)

    async def wait(self, http_request: HTTPRequest):
        waiter = asyncio.ensure_future(asyncio.gather(*(_finished(r) for r in self.requests)))
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=0.25)
                if not waiter.done() and await http_request.is_disconnected():
                    return Response(status_code=499)  # nobody reads this; release() cancels the requests
        finally:
            waiter.cancel()
        failed = next((r for r in self.requests if r.finish_reason in ("cancelled", "error")), None)
        if failed is not None:
            raise failure(failed)
        choices = [api.choice(i, self._prefix(i) + CompletionText(self.decode, self.params.stop, r.tokens).text(),
                              api.finish_reason(r), api.choice_extension(r)) for i, r in enumerate(self.requests)]
        return self._body(choices, self._usage(), schedule=True)

    async def events(self):
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, request) -> None:
            try:
                async for token in request.astream():
                    queue.put_nowait((index, token))
            except SkipDeployError:
                pass  # reported from finish_reason below
            queue.put_nowait((index, None))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(self.requests)]
        texts = [CompletionText(self.decode, self.params.stop) for _ in self.requests]
        try:
            for i in range(len(self.requests) if self.params.echo else 0):
                yield api.sse(self._body([api.choice(i, self._prefix(i), None)]))
            left = len(self.requests)
            while left:
                index, token = await queue.get()
                request = self.requests[index]
                if token is not None:  # one chunk per token: text held back (a stop's start) comes later
                    delta = texts[index].add(token)
                    layers = request.layers_per_token[len(texts[index].tokens) - 1]
                    step = {"token_ids": [token], "layers_per_token": [layers]}
                    yield api.sse(self._body([api.choice(index, delta, None, step)]))
                    continue
                left -= 1
                if request.finish_reason in ("cancelled", "error"):
                    yield api.sse(failure(request).body())
                    return
                summary = {**api.choice_extension(request), "token_ids": [], "layers_per_token": []}  # sent already
                last = api.choice(index, texts[index].rest(), api.finish_reason(request), summary)
                yield api.sse(self._body([last], schedule=True))
            if self.params.include_usage:
                yield api.sse(self._body([], self._usage()))
            yield api.sse("[DONE]")
        finally:
            for task in tasks:
                task.cancel()


async def _finished(request) -> None:
    try:
        async for _ in request.astream():
            pass
    except SkipDeployError:
        pass  # the caller reads finish_reason


class EventStream(StreamingResponse):
    """Server-sent events that call ``on_close`` however it ends (client gone included)."""

    def __init__(self, content, on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                           "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
