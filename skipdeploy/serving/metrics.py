"""Prometheus metrics of the server (``GET /metrics``), all named ``skipdeploy_*``.

One :class:`Metrics` per app, each with its own ``CollectorRegistry`` (never the global one), so
that one process can hold several apps. It is the engine's observer: ``on_iteration`` and
``on_finish`` run on the engine's thread (prometheus_client is thread-safe); the gauges read the
engine when scraped.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Finish reasons of engine requests, and why the server refused an HTTP request before any generation.
OUTCOMES = ("eos", "stop", "length", "cancelled", "error")
REJECTIONS = ("invalid", "unauthorized", "not_found", "too_large", "queue_full", "unavailable")

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, num_layers: int) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("skipdeploy_requests", "Completions (one per choice) by how they finished",
                                ["outcome"], registry=r)
        self.rejected = Counter("skipdeploy_rejected_requests", "HTTP requests refused before generation, by reason",
                                ["reason"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for reason in REJECTIONS:
            self.rejected.labels(reason)
        self.queue_depth = Gauge("skipdeploy_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("skipdeploy_running_requests", "Requests holding a slot (rows in flight)", registry=r)
        self.cache_bytes = Gauge("skipdeploy_cache_bytes_in_use", "KV cache bytes held by running requests",
                                 registry=r)
        self.cache_capacity = Gauge("skipdeploy_cache_bytes_capacity", "KV cache bytes allocated at start",
                                    registry=r)
        self.prompt_tokens = Counter("skipdeploy_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("skipdeploy_generated_tokens", "Tokens generated", registry=r)
        self.iterations = Counter("skipdeploy_iterations", "Engine iterations (forward passes of the batch)",
                                  registry=r)
        self.time_to_first_token = Histogram("skipdeploy_time_to_first_token_seconds",
                                             "From submission (queueing included) to the first token",
                                             buckets=_LATENCY, registry=r)
        self.time_per_output_token = Histogram("skipdeploy_time_per_output_token_seconds",
                                               "Time between consecutive tokens of a request", buckets=_LATENCY,
                                               registry=r)
        self.iteration_seconds = Histogram("skipdeploy_iteration_seconds", "Duration of one engine iteration",
                                           buckets=_LATENCY, registry=r)
        self.layers_per_iteration = Histogram("skipdeploy_layers_per_iteration",
                                              "Decoder layers run (by at least one row) per iteration",
                                              buckets=tuple(range(1, num_layers + 1)), registry=r)
        self.rows_per_iteration = Histogram("skipdeploy_rows_per_iteration", "Requests advanced per iteration",
                                            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)

    def bind(self, engine) -> None:
        """Read the engine's state at every scrape."""
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.running.set_function(lambda: engine.running)
        self.cache_bytes.set_function(lambda: engine.cache_bytes_in_use)
        self.cache_capacity.set(engine.slot_bytes * engine.max_batch)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    # -- the engine's observer (its thread) --------------------------------------------------------
    def on_iteration(self, stats, seconds: float) -> None:
        self.iterations.inc()
        self.iteration_seconds.observe(seconds)
        self.layers_per_iteration.observe(stats.layer_calls)
        self.rows_per_iteration.observe(stats.rows)
        self.generated_tokens.inc(stats.tokens)

    def on_finish(self, request) -> None:
        self.requests.labels(request.finish_reason or "error").inc()
        self.prompt_tokens.inc(len(request.prompt))
        if request.time_to_first_token is not None:
            self.time_to_first_token.observe(request.time_to_first_token)
        for gap in request.time_per_output_token():
            self.time_per_output_token.observe(gap)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
