"""Option groups shared by the commands, so that one thing has one flag name everywhere.

- ``schedule_options``: --target-speedup K, --max-layers, --min-layers, --warmup-layers,
  --decay-tokens, --prompt-layers, --table (export, schedule, generate, serve);
- ``sampling_options``: --temperature, --top-k, --top-p, --repetition-penalty, --seed, --stop,
  --stop-token-id, --ignore-eos (generate; ``pop_request`` reads them as ``request_params`` does);
- ``backend_options``: --backend, --device, --threads;
- ``max_new_tokens_option``, ``json_option``; ``comma_list`` for every "1,2,3" value.
"""

from __future__ import annotations

from typing import Callable

import click

from ..errors import ScheduleError, SkipDeployError
from ..request_params import CLI, SCHEDULE_FIELDS, RequestParams, check, schedule_from_options
from ..request_params import parse as parse_request
from ..schedule import LayerSchedule


def _apply(func, options):
    for option in reversed(options):
        func = option(func)
    return func


class AliasedOption(click.Option):
    """An option that still accepts an old spelling, without showing it in --help."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = hidden_aliases
        self.opts += list(hidden_aliases)

    def get_help_record(self, ctx):
        shown, self.opts = self.opts, [o for o in self.opts if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def comma_list(value: str | None, option: str, kind: Callable = float, allow_empty: bool = False) -> list | None:
    """``"1,2, 3"`` -> ``[1, 2, 3]`` (``kind`` each), or one clear line naming ``option``."""
    if value is None:
        return None
    parts = value.replace(" ", "").split(",") if value.strip() else []
    if "" in parts:
        raise SkipDeployError(f"{option} has an empty item in {value!r}; separate values with single commas")
    try:
        items = [kind(x) for x in parts]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise SkipDeployError(f"{option} takes comma-separated {noun} (got {value!r})") from None
    if not items and not allow_empty:
        raise SkipDeployError(f"{option} needs at least one value")
    return items


def unescape(text: str) -> str:
    r"""Backslash escapes as a shell leaves them (``--stop "\n\n"``): \n, \t, \\, \xHH, \uHHHH."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        raise SkipDeployError(f"invalid escape in {text!r}") from None


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


# -- options ---------------------------------------------------------------------------------------
def json_option(what: str):
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON.")


def max_new_tokens_option(default: int | None, help: str = "Tokens to generate per prompt.", **kwargs):
    return click.option("--max-new-tokens", type=click.IntRange(min=1), default=default,
                        show_default=default is not None, help=help, **kwargs)


class Device(click.ParamType):
    """cpu, cuda or cuda:N (a CUDA device by index, as torch and ``nvidia-smi`` number them)."""

    name = "device"

    def __init__(self, cpu: bool = True) -> None:
        self.cpu = cpu

    def convert(self, value, param, ctx):
        from ..engines import parse_device  # the reading create_engine applies
        from ..errors import BackendError

        value = str(value)
        try:
            kind, _ = parse_device(value)
        except BackendError:
            kind = None
        if kind == "cuda" or (kind == "cpu" and self.cpu):
            return value
        choices = "cpu, cuda or cuda:N" if self.cpu else "cuda or cuda:N"
        self.fail(f"{value!r} is not a device; use {choices}", param, ctx)


def backend_options(func):
    return _apply(func, [
        click.option("--backend", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime",
                     show_default=True, help="Engine that runs the graphs (torch: the PyTorch reference; "
                     "tensorrt: engines from build-engines)."),
        click.option("--device", type=Device(), metavar="cpu|cuda|cuda:N",
                     help="Where the backend runs: cpu, cuda or cuda:N [default: cpu; tensorrt: cuda]. cuda needs "
                          "onnxruntime-gpu, a CUDA build of torch (fp16, CUDA graphs) or TensorRT engines "
                          "(build-engines)."),
        click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads for onnxruntime "
                     "[default: all cores]."),
    ])


def engine_options(backend: str, device: str | None, threads: int | None) -> dict:
    """``load`` keyword arguments from the backend options."""
    options: dict = {"backend": backend}
    if device:
        options["device"] = device
    if threads and backend == "onnxruntime":
        options["threads"] = threads
    return options


def slot_options(func):
    """The in-flight engine's sizes (serve, triton)."""
    return _apply(func, [
        click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Requests decoded at once: KV-cache slots, allocated when the engine starts."),
        click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
                     help="Requests that may wait for a slot; past that a request is refused (HTTP 429, Triton "
                          "UNAVAILABLE)."),
        click.option("--max-length", type=click.IntRange(min=2), help="Positions per slot: a prompt of P tokens "
                     "allows P + max_tokens - 1 <= max-length [default: the export's limit]."),
        click.option("--prefill-chunk", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Prompt positions run per iteration in all, so that long prompts do not stall decoding."),
    ])


def schedule_options(func):
    return _apply(func, [
        click.option("--target-speedup", type=float, metavar="K",
                     help="Pick max/min layers so that the layer speedup (all layers over the mean run per decode "
                          "step, over --decay-tokens steps) is K, within 5%."),
        click.option("--max-layers", type=int, metavar="N", help="Top-block size at the first generated token "
                     "[default: the default schedule's, else all layers]."),
        click.option("--min-layers", type=int, metavar="N", help="Floor of the top block [default: the default "
                     "schedule's, else --max-layers]."),
        click.option("--warmup-layers", type=int, metavar="N", help="Bottom layers every token runs [default: the "
                     "default schedule's, else 1]."),
        click.option("--decay-tokens", type=int, metavar="T",
                     help="Decode steps over which the top block shrinks linearly [default: the default schedule's; "
                          "with --target-speedup or on a full default, this generation's decode steps "
                          "(--max-new-tokens - 1), or 64 where nothing is generated]."),
        click.option("--prompt-layers", type=click.Choice(["full", "schedule"]),
                     help="Run the prompt through all layers (full) or the step-0 layer set [default: the default "
                          "schedule's, else full]."),
        click.option("--table", metavar="N,N,...", help="Explicit top-block size per step (non-increasing; "
                     "the last holds), instead of the linear decay."),
    ])


SCHEDULE_KEYS = tuple(f.name for f in SCHEDULE_FIELDS)


def pop_schedule_options(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in SCHEDULE_KEYS if k in kwargs}


def schedule_from(opts: dict, num_layers: int, default: LayerSchedule | None, decode_steps: int | None) -> LayerSchedule:
    """The schedule the flags describe (``request_params.schedule_from_options``); a flag
    conflict is a usage error."""
    opts = {k: v for k, v in opts.items() if v is not None and v is not False}
    if "table" in opts:
        opts["table"] = comma_list(opts["table"], "--table", int)
    opts = {k: check(k, v, CLI.spelled(k)) for k, v in opts.items()}  # every door's ranges
    try:
        return schedule_from_options(opts, num_layers, default, decode_steps)
    except ScheduleError as exc:
        conflict = any(word in str(exc) for word in ("excludes", "replaces", "give one or the other"))
        if conflict:  # flags that contradict each other: a usage error, as click's own
            raise click.UsageError(str(exc).replace("_", "-")) from None
        raise


def sampling_options(func):
    return _apply(func, [
        click.option("--temperature", type=float, help="Sample at this temperature; 0 (the default) is greedy. "
                     "--top-k/--top-p alone imply 1.0."),
        click.option("--top-k", type=int, help="Sample among the K most likely tokens (0 or -1: off)."),
        click.option("--top-p", type=float, help="Sample among the smallest set of tokens whose mass reaches P."),
        click.option("--repetition-penalty", type=float, help="Penalize tokens already in the prompt or output "
                     "(Hugging Face semantics; 1 is off)."),
        click.option("--seed", type=int, help="Seed for sampling: same seed, same tokens, on every backend "
                     "(a 64-bit integer; negative ones are taken modulo 2**64)."),
        click.option("--stop", "stop_strings", multiple=True, metavar="TEXT",
                     help="Stop a row once its text contains TEXT; the text printed ends before it (repeatable; "
                          "\\n and \\t are read as escapes)."),
        click.option("--stop-token-id", "stop_token_ids", multiple=True, type=int, metavar="ID",
                     help="Stop a row at this token id, like EOS (repeatable)."),
        click.option("--ignore-eos", is_flag=True, default=None, help="Keep generating past the model's EOS token."),
    ])


def pop_request(kwargs: dict, max_new_tokens: int) -> RequestParams:
    """The sampling and schedule flags as one request (``request_params``: every door's ranges, a
    refusal naming the flag)."""
    values = {"max_new_tokens": max_new_tokens, **{k: kwargs.pop(k) for k in _SAMPLING if k in kwargs},
              **{k: v for k, v in pop_schedule_options(kwargs).items() if v is not None and v is not False}}
    values["stop"] = tuple(unescape(s) for s in values.pop("stop_strings", ())) or None
    values["stop_token_ids"] = values.get("stop_token_ids") or None
    if "table" in values:
        values["table"] = comma_list(values["table"], "--table", int)
    return parse_request({CLI.key(k): v for k, v in values.items()}, CLI)


_SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop_strings", "stop_token_ids",
             "ignore_eos")
