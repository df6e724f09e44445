"""The HTTP side of ``skipdeploy serve``: an OpenAI-compatible FastAPI app over a ServingEngine,
run by uvicorn.

    app = create_app(lambda observer: ServingEngine("opt-sd", observer=observer), model_name="opt-sd",
                     num_layers=12)
    status = serve(app, "127.0.0.1", 8000)

Routes: ``POST /v1/completions``, ``GET /v1/models[/{id}]`` (with an API key, only ``/v1/*`` needs
it), ``GET /health``, ``GET /metrics``. The engine loads in a thread once the socket is bound
(``/health``: 503 ``starting``). The first SIGTERM or SIGINT drains: ``/health`` and new
completions answer 503 while what was admitted finishes, for at most the drain timeout (then it
is cancelled); then uvicorn stops and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import socket
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, Callable

import uvicorn
from fastapi import Body, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import SkipDeployError
from . import completions as answer
from . import openai_api as api
from .engine import ServingEngine
from .metrics import Metrics

log = logging.getLogger("uvicorn.error")
MAX_BODY_BYTES = 1 << 20
_DISCARD_BYTES = 16 << 20
_REJECTIONS = {400: "invalid", 401: "unauthorized", 404: "not_found", 413: "too_large", 429: "queue_full",
               503: "unavailable"}


class ServerState:
    """The engine (once loaded), the requests in flight, and the drain."""

    def __init__(self, load_engine: Callable[[Metrics], ServingEngine], metrics: Metrics, model_name: str,
                 drain_timeout: float) -> None:
        self.load_engine, self.metrics, self.model_name = load_engine, metrics, model_name
        self.drain_timeout = drain_timeout
        self.created = int(time.time())
        self.serving: ServingEngine | None = None
        self.load_error: str | None = None
        self.drain_deadline: float | None = None
        self.active: set = set()  # engine requests whose HTTP request is still being answered
        self.url: str | None = None  # where it listens, once bound (serve)

    # -- lifecycle -------------------------------------------------------------------------------
    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="skipdeploy-load", daemon=True).start()

    def _load(self) -> None:
        engine = None
        try:
            engine = self.load_engine(self.metrics)
            if engine.manifest.tokenizer_path is not None:
                engine.tokenizer  # noqa: B018 - read it now, not on the first request
        except Exception as exc:  # reported, and the server exits 1
            self.load_error = str(exc) or type(exc).__name__
            log.error("the engine did not start: %s", self.load_error)
            if engine is not None:
                engine.shutdown(0)
            return
        self.metrics.bind(engine)
        self.serving = engine
        log.info("ready: serving %s as %r%s: %d slots of %d positions, schedule %s", engine.manifest.directory,
                 self.model_name, f" on {self.url}" if self.url else "", engine.max_batch, engine.max_length,
                 engine.schedule.describe())

    @property
    def status(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self.drain_deadline is not None:
            return "draining"
        if self.serving is None:
            return "starting"
        return "ready" if self.serving.ready else "failed"

    def begin_drain(self) -> None:
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.drain_timeout
            log.info("draining: finishing %d request(s), at most %g s", len(self.active), self.drain_timeout)

    def idle(self) -> bool:
        return not self.active and (self.serving is None or self.serving.running + self.serving.queue_depth == 0)

    def cancel_all(self) -> None:
        for request in list(self.active):
            request.cancel()

    def shutdown(self) -> None:
        if self.serving is not None:
            left = self.drain_timeout if self.drain_deadline is None else self.drain_deadline - time.monotonic()
            self.serving.shutdown(max(0.0, left))

    # -- requests --------------------------------------------------------------------------------
    def ready_engine(self) -> ServingEngine:
        status = self.status
        if status != "ready":
            raise api.APIError(503, f"the server is {status}; try again later", "server_error", code="unavailable",
                               headers=answer.RETRY)
        return self.serving

    def submit(self, engine: ServingEngine, params: api.CompletionParams, rows: list[list[int]], schedule,
               completion_id: str) -> list:
        requests = answer.submit(engine, params, rows, schedule, completion_id)
        self.active.update(requests)
        return requests

    def release(self, requests: list) -> None:
        """The HTTP request is answered or gone: cancel what still runs."""
        for request in requests:
            if not request.done:
                request.cancel()
            self.active.discard(request)

    def error_response(self, error: api.APIError) -> JSONResponse:
        if error.status in _REJECTIONS:
            self.metrics.reject(_REJECTIONS[error.status])
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class _Gate:
    """ASGI middleware, before any parsing: the API key on /v1/* (401) and the body size (413)."""

    def __init__(self, app, state: ServerState, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.state, self.max_body_bytes = app, state, max_body_bytes
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.key is not None and (scope["path"] + "/").startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                error = api.APIError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                     code="invalid_api_key")
                return await self.state.error_response(error)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._too_large(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # read it all here, bounded, then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await self._too_large(scope, receive, send, more)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, more: bool = True) -> None:
        # Read (and drop) a moderately oversized body first, so that the client, still sending,
        # gets the 413 rather than a broken pipe; past _DISCARD_BYTES the connection just closes.
        dropped = 0
        while more and dropped <= _DISCARD_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            dropped += len(message.get("body", b""))
            more = message.get("more_body", False)
        error = api.APIError(413, f"the request body exceeds {self.max_body_bytes} bytes", code="body_too_large")
        await self.state.error_response(error)(scope, receive, send)


def create_app(load_engine: Callable[[Metrics], ServingEngine], *, model_name: str, num_layers: int,
               api_key: str | None = None, drain_timeout: float = 30.0,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app; ``load_engine(observer)`` builds the engine (in a thread, at startup)."""
    if api_key is not None and not api_key.strip():  # an empty key would silently turn authentication off
        raise SkipDeployError("api_key is empty: give a key, or None to serve without authentication")
    if isinstance(drain_timeout, bool) or not isinstance(drain_timeout, (int, float)) \
            or not math.isfinite(drain_timeout) or drain_timeout < 0:
        raise SkipDeployError(f"drain_timeout must be a finite number of seconds >= 0 (got {drain_timeout!r})")
    state = ServerState(load_engine, Metrics(num_layers), model_name, drain_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="skipdeploy", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serving = state
    app.add_middleware(_Gate, state=state, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(api.APIError)
    async def _api_error(request: HTTPRequest, exc: api.APIError):
        return state.error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: HTTPRequest, exc: RequestValidationError):
        return state.error_response(api.from_validation_errors(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http_error(request: HTTPRequest, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        error = api.APIError(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))
        return state.error_response(error)

    @app.exception_handler(Exception)
    async def _internal_error(request: HTTPRequest, exc: Exception):  # logged by uvicorn as well
        return state.error_response(api.APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    @app.get("/health")
    async def health():
        status = state.status
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type=state.metrics.content_type)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": state.created, "owned_by": "skipdeploy"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        _check_model(model, model_name)
        return model_card()

    @app.api_route("/v1/chat/completions", methods=["GET", "POST"])
    async def chat_completions():
        raise api.APIError(404, "this server answers only the completions API (POST /v1/completions with a "
                           "\"prompt\"); /v1/chat/completions is not served", code="not_found")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest, body: dict[str, Any] = Body(...)):
        engine = state.ready_engine()
        params = api.parse_completion(body)
        if params.model is not None:
            _check_model(params.model, model_name)
        schedule = api.request_schedule(params, engine.spec.num_layers, engine.schedule)
        decode = engine.tokenizer.decode if engine.manifest.tokenizer_path is not None else None
        encode = engine.tokenizer.encode if decode is not None else None
        rows = await asyncio.to_thread(api.prompt_ids, params, encode, engine.spec.vocab_size, engine.max_length)
        reply = answer.Reply(model_name, params, rows, schedule, decode)
        reply.requests = state.submit(engine, params, rows, schedule, reply.id)
        if params.stream:
            return answer.EventStream(reply.events(), on_close=lambda: state.release(reply.requests))
        try:
            return await reply.wait(request)
        finally:
            state.release(reply.requests)

    return app


def _check_model(name: str, model_name: str) -> None:
    if name != model_name:
        raise api.APIError(404, f"the model {name!r} does not exist (this server has {model_name!r})",
                           param="model", code="model_not_found")


class _Server(uvicorn.Server):
    """uvicorn, with a drain before its own shutdown, and exit 0 after a signal (uvicorn re-raises it)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        if self.state.drain_deadline is None and not self.should_exit:
            self.state.begin_drain()
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        state = self.state
        if state.load_error is not None:
            self.should_exit = True
        elif state.drain_deadline is not None and not self.should_exit:
            if state.idle():
                self.should_exit = True
            elif time.monotonic() > state.drain_deadline:
                log.warning("drain timeout: cancelling %d request(s)", len(state.active))
                state.cancel_all()
                self.should_exit = True
        return await super().on_tick(counter)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is reported at once, not
    after a minute of loading (SkipDeployError)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SkipDeployError(f"cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may reuse the port
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SkipDeployError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another server using "
                              "it? pick another port") from None
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          sock: socket.socket | None = None) -> int:
    """Run ``app`` until a signal has drained it; the exit status (1 if the engine did not start).
    ``sock`` is a socket from :func:`bind` (default: bound here, before anything loads)."""
    state: ServerState = app.state.serving
    sock = sock or bind(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=5)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    state.url = f"http://{shown}:{bound_port}"
    # Not uvicorn's "running on": the model is still loading; the ready line comes when it is done.
    log.info("listening on %s; loading the model (GET /health answers 503 until it is ready)", state.url)
    _Server(config, state).run(sockets=[sock])
    return 1 if state.load_error is not None else 0
