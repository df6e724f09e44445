"""``skipdeploy serve``: an OpenAI-compatible HTTP server (completions) with in-flight batching."""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path

import click

from .options import backend_options, pop_schedule_options, schedule_from, schedule_options, slot_options


@click.command("serve")
@click.argument("directory", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0: every interface; then set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@slot_options
@click.option("--policy", type=click.Choice(["continuous", "aligned", "drain"]), default="continuous",
              show_default=True, help="Admit waiting requests as soon as a slot frees (continuous), every "
              "--align-steps iterations so that they share steps and layer sets (aligned), or only when nothing "
              "runs (drain).")
@click.option("--align-steps", type=click.IntRange(min=1), default=16, show_default=True,
              help="Iterations between admissions under --policy aligned.")
@click.option("--model-name", metavar="NAME", help="The model id of /v1/models and requests [default: the export "
              "directory's name].")
@click.option("--api-key", envvar="SKIPDEPLOY_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* [env SKIPDEPLOY_API_KEY].")
@backend_options
@schedule_options
@click.option("--full", is_flag=True, help="Default to every layer at every step (no skipping).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="S",
              help="On SIGTERM, seconds to let admitted requests finish before cancelling them.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level (info logs every request).")
def command(directory: Path, host: str, port: int, max_batch: int, max_queue: int, max_length: int | None,
            prefill_chunk: int, policy: str, align_steps: int, model_name: str | None, api_key: str | None, backend: str,
            device: str | None, threads: int | None, drain_timeout: float, log_level: str, **kwargs) -> None:
    """Serve an export over HTTP: the OpenAI completions API with in-flight batching.

    \b
    POST /v1/completions   OpenAI completions (stream, n, seed, stop, echo), plus "skipdecode"
    GET  /v1/models        the one model (its id: --model-name)
    GET  /health           200 when ready; 503 while starting or draining
    GET  /metrics          Prometheus metrics (skipdeploy_*)

    Schedule options set the default schedule (without them the export's); a request's
    "skipdecode" object overrides it. With --target-speedup and no --decay-tokens the default
    decays over 64 decode steps. SIGTERM drains: admitted requests finish (at most
    --drain-timeout seconds), then the server exits 0. See docs/serving.md.
    """
    from ..errors import SkipDeployError
    from ..manifest import read_manifest
    from ..runtime.core import check_threads

    if api_key is not None and not api_key.strip():  # typed empty: it would silently turn authentication off
        raise click.ClickException("--api-key is empty; give a key, or leave --api-key out to serve without one")
    if not math.isfinite(drain_timeout):  # click's range lets nan and inf through
        raise click.ClickException(f"--drain-timeout must be a finite number of seconds (got {drain_timeout})")
    try:
        from ..serving.engine import ServingEngine
        from ..serving.server import bind, create_app, serve
    except ImportError as exc:
        raise click.ClickException(f"serve needs fastapi, uvicorn and prometheus_client ({exc}); "
                                   "pip install 'skipdeploy[serve]'") from None
    if backend not in ("onnxruntime", "torch") or device not in (None, "cpu"):
        raise click.UsageError("serve runs the onnxruntime or torch backend on the CPU (in-flight batching)")
    try:
        check_threads(threads)  # before the socket binds and the model loads
        manifest = read_manifest(directory, verify=False)  # the engine verifies the files as it loads
        schedule = schedule_from(pop_schedule_options(kwargs), manifest.model.num_layers, manifest.schedule, None)
    except SkipDeployError as exc:
        raise click.ClickException(str(exc)) from None
    if max_length is not None and max_length > manifest.max_length:
        raise click.ClickException(f"--max-length {max_length} exceeds the export's limit of {manifest.max_length} "
                                   f"positions; pass at most {manifest.max_length}, or export again with a larger "
                                   "--max-length")
    name = model_name or directory.resolve().name
    if not api_key and not _loopback(host):
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)

    def load_engine(observer) -> ServingEngine:
        return ServingEngine(directory, backend=backend, threads=threads, max_batch=max_batch, max_queue=max_queue,
                             max_length=max_length, prefill_chunk=prefill_chunk, policy=policy,
                             align_steps=align_steps, schedule=schedule,
                             observer=observer)

    try:  # errors as ClickException: this command also runs on its own (python -m skipdeploy.cli.serve)
        app = create_app(load_engine, model_name=name, num_layers=manifest.model.num_layers, api_key=api_key,
                         drain_timeout=drain_timeout)
        sock = bind(host, port)  # before the model loads: a port in use is reported at once
    except SkipDeployError as exc:
        raise click.ClickException(str(exc)) from None
    status = serve(app, host, port, log_level=log_level, sock=sock)
    if status:
        raise SystemExit(status)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    command()
