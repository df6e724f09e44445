"""The ``skipdeploy`` command line: export, inspect, schedule, generate.

Exit status: 0 on success, 1 on a user error (one line on stderr, no traceback), 2 on a usage
error (click's own).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import SkipDeployError
from .schedule import LayerSchedule, Schedule, TableSchedule, format_layers


class _Group(click.Group):
    """Turns every SkipDeployError (and OS errors such as a full disk) into one line and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SkipDeployError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="skipdeploy")
def main() -> None:
    """Deploy SkipDecode OPT models: per-layer ONNX graphs plus a small batched runtime.

    \b
    Typical use:
      skipdeploy export facebook/opt-125m --out opt-125m-sd --target-speedup 2
      skipdeploy inspect opt-125m-sd
      skipdeploy generate opt-125m-sd --prompt "def fib(n):" --max-new-tokens 32
    """


# -- schedule options, shared by export, schedule and generate ----------------------------------
def schedule_options(func):
    options = [
        click.option("--target-speedup", type=float, metavar="K",
                     help="Pick max/min layers so that the ideal speedup over --decay-tokens steps is K (within 5%)."),
        click.option("--max-layers", type=int, metavar="N", help="Top-block size at the first generated token "
                     "[default: all layers]."),
        click.option("--min-layers", type=int, metavar="N", help="Floor of the top block [default: --max-layers]."),
        click.option("--warmup-layers", type=int, metavar="N", help="Bottom layers every token runs [default: 1]."),
        click.option("--decay-tokens", type=int, metavar="T",
                     help="Generated tokens over which the top block shrinks linearly [default: 64; "
                          "for generate, --max-new-tokens]."),
        click.option("--prompt-layers", type=click.Choice(["full", "schedule"]),
                     help="Run the prompt through all layers (full, the default) or the step-0 layer set."),
        click.option("--table", metavar="N,N,...", help="Explicit top-block size per step (non-increasing; "
                     "the last holds), instead of the linear decay."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _schedule_from(opts: dict, num_layers: int, default: LayerSchedule | None, decay_default: int) -> LayerSchedule:
    target, max_l, min_l = opts.get("target_speedup"), opts.get("max_layers"), opts.get("min_layers")
    warmup, decay, prompt = opts.get("warmup_layers"), opts.get("decay_tokens"), opts.get("prompt_layers")
    table = opts.get("table")
    if table is not None:
        if any(v is not None for v in (target, max_l, min_l, decay)) or opts.get("full"):
            raise click.UsageError("--table replaces --target-speedup/--max-layers/--min-layers/--decay-tokens/--full")
        try:
            tops = [int(x) for x in table.split(",") if x.strip()]
        except ValueError:
            raise SkipDeployError(f"--table takes comma-separated integers (got {table!r})") from None
        return TableSchedule(num_layers, tops, warmup_layers=1 if warmup is None else warmup, prompt=prompt or "full")
    if target is not None and (max_l is not None or min_l is not None):
        raise click.UsageError("--target-speedup picks --max-layers/--min-layers itself; give one or the other")
    if opts.get("full"):
        if any(v is not None for v in (target, max_l, min_l, warmup, decay, prompt)):
            raise click.UsageError("--full excludes the other schedule options")
        return Schedule.full(num_layers)
    common = dict(decay_tokens=decay or decay_default, warmup_layers=1 if warmup is None else warmup,
                  prompt=prompt or "full")
    if decay is not None and decay < 1:
        common["decay_tokens"] = decay  # let Schedule name the bound
    if target is not None:
        return Schedule.target_speedup(num_layers, target, **common)
    if any(v is not None for v in (max_l, min_l, warmup, decay, prompt)):
        return Schedule(num_layers, max_l, min_l, **common)
    return default or Schedule.full(num_layers)


def _schedule_kwargs(kwargs: dict) -> dict:
    keys = ("target_speedup", "max_layers", "min_layers", "warmup_layers", "decay_tokens", "prompt_layers", "table",
            "full")
    return {k: kwargs.pop(k) for k in keys if k in kwargs}


# -- export ----------------------------------------------------------------------------------------
@main.command()
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Export directory to create.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Graph precision; float16 is for GPUs (LayerNorm and softmax stay float32).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (17..23).")
@click.option("--max-length", type=int, help="Longest prompt + generation the export serves [default: the "
              "model's positions].")
@click.option("--max-batch", type=int, default=64, show_default=True, help="Largest batch the export serves.")
@schedule_options
@click.option("--tensorrt", is_flag=True, help="Also build TensorRT engines for this GPU into DIR/engines "
              "(needs TensorRT and a GPU; see build-engines).")
@click.option("--quantize", type=click.Choice(["int8"]),
              help="Write int8-weight graphs for CPU decoding instead (see the quantize command).")
@click.option("--force", is_flag=True, help="Replace DIR if it exists (only once the new export is complete).")
@click.option("--no-check", is_flag=True, help="Skip the per-graph check against PyTorch.")
def export(model: str, out: Path, dtype: str, opset: int, max_length: int | None, max_batch: int,
           tensorrt: bool, quantize: str | None, force: bool, no_check: bool, **kwargs) -> None:
    """Export an OPT checkpoint (local directory or hub id) to per-layer ONNX graphs and a manifest.

    Each graph is checked against the PyTorch model on random inputs right after it is written;
    the directory appears only when everything is written and verified.
    """
    from . import export as run_export

    opts = _schedule_kwargs(kwargs)
    manifest = run_export(model, out, dtype=dtype, opset=opset, max_length=max_length, max_batch=max_batch,
                          schedule=(lambda num_layers: _schedule_from(opts, num_layers, None, 64))
                          if any(v is not None for v in opts.values()) else None, force=force,
                          check_graphs=not no_check, tensorrt=tensorrt, quantize=quantize,
                          log=lambda m: click.echo(m, err=True))
    weights = f"{quantize} weights, " if quantize else ""
    click.echo(f"exported {manifest.model.num_layers} layers to {out} "
               f"({weights}{_size(manifest.total_bytes)}; default schedule: {manifest.schedule.describe()})")


# -- quantize --------------------------------------------------------------------------------------
@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the quantized export.")
@click.option("--weights", type=click.Choice(["int8"]), default="int8", show_default=True)
@click.option("--per-tensor", is_flag=True, help="One scale per weight matrix instead of one per output channel "
              "(less accurate).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new export is complete).")
def quantize(directory: Path, out: Path, weights: str, per_tensor: bool, force: bool) -> None:
    """Write an int8-weight copy of a float32 export, for CPU decoding.

    The decoder layers and the LM head multiply with int8 weights (onnxruntime dynamic
    quantization, standard ONNX ops): about 4x fewer weight bytes per token, 2.5-3x faster
    decoding on a 2-core CPU. Attention, LayerNorm, the KV cache and the logits stay float32.
    Each graph's error against float32 is recorded in the manifest; `skipdeploy verify OUT`
    checks decoding against the float32 export.
    """
    from .exporter.quantize import quantize_export
    from .manifest import read_manifest

    source = read_manifest(directory, verify=False)
    manifest = quantize_export(directory, out, weights=weights, per_channel=not per_tensor, force=force,
                               log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {out} ({weights} weights, {_size(manifest.total_bytes)}; the float32 export is "
               f"{_size(source.total_bytes)})")


# -- inspect ---------------------------------------------------------------------------------------
@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--no-verify", is_flag=True, help="Check file sizes only, not sha256 checksums.")
def inspect(directory: Path, as_json: bool, no_verify: bool) -> None:
    """Summarize an export directory (and verify its files)."""
    from .manifest import read_manifest

    m = read_manifest(directory, verify=not no_verify)
    if as_json:
        click.echo(json.dumps(m.raw, indent=2))
        return
    s = m.model
    check = m.raw.get("check", {}).get("max_abs_error") or {}
    rows = [
        ("export", f"{m.directory} (format {m.raw['format_version']}, skipdeploy {m.tools.get('skipdeploy', '?')})"),
        ("model", f"{s.model_type}, {s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} heads x {s.head_dim}, "
                  f"ffn {s.ffn_dim}, vocab {s.vocab_size}, {s.max_positions} positions, {s.layer_norm}-LayerNorm"),
        ("graphs", f"{m.dtype}, opset {m.opset}, KV {m.raw.get('kv_contract')} ({m.raw.get('kv_layout')})"),
        *([("weights", _describe_quantization(m.quantization))] if m.quantization else []),
        ("schedule", m.schedule.describe()),
        ("limits", f"max batch {m.limits.get('max_batch')}, max length {m.limits.get('max_length')}"),
        ("tokenizer", m.raw.get("tokenizer") or "none (use --input-ids)"),
        ("files", f"{len(m.files)} files, {_size(m.total_bytes)} "
                  f"({'sizes checked' if no_verify else 'sha256 verified'})"),
        ("check", (f"max abs error vs PyTorch {max(check.values()):.1e}"
                   f"{' (float32 graphs, before quantization)' if m.quantization else ''}") if check else "not run"),
        ("source", m.source),
    ]
    for key, value in rows:
        click.echo(f"{key:<10} {value}")


def _describe_quantization(q: dict) -> str:
    errors = q.get("max_error_vs_float") or {}
    worst = f"; max error vs float32 {max(errors.values()):.1e}" if errors else ""
    source = f"; from {q['source']}" if q.get("source") else ""
    return (f"{q.get('weights')} in {len(q.get('graphs', []))} graphs "
            f"({'per channel' if q.get('per_channel') else 'per tensor'}){worst}{source}")


# -- schedule --------------------------------------------------------------------------------------
@main.command()
@click.option("--layers", "num_layers", type=int, required=True, help="Decoder layers in the model.")
@schedule_options
@click.option("--steps", type=int, help="Steps to show [default: --decay-tokens + 1].")
@click.option("--json", "as_json", is_flag=True, help="Print the per-step layer sets as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG of layers per step.")
def schedule(num_layers: int, steps: int | None, as_json: bool, plot: Path | None, **kwargs) -> None:
    """Show the layers a schedule runs at each generation step, and its ideal speedup.

    The step is the generation step shared by the whole batch (step 0 is the forward pass of the
    first generated token), not a row's absolute position: with left padding all rows of a batch
    are at the same step.
    """
    if num_layers < 1:
        raise SkipDeployError(f"--layers must be >= 1 (got {num_layers})")
    sched = _schedule_from(_schedule_kwargs(kwargs), num_layers, None, 64)
    steps = steps or sched.horizon + 1
    if steps < 1:
        raise SkipDeployError(f"--steps must be >= 1 (got {steps})")
    table = [{"step": s, "top": sched.top(s), "layers": list(sched.layers(s))} for s in range(steps)]
    summary = {"schedule": sched.to_dict(), "prompt_layers": list(sched.prompt_layers()), "steps": table,
               "mean_layers_per_token": sched.mean_layers(steps), "ideal_speedup": sched.ideal_speedup(steps)}
    if plot:
        _plot_schedule(sched, steps, plot)
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(sched.describe())
    click.echo(f"prompt     {len(sched.prompt_layers())} layers [{format_layers(sched.prompt_layers())}]")
    click.echo(f"{'step':>6} {'top':>4} {'run':>4}  layers")
    previous = None
    for row in table:
        key = tuple(row["layers"])
        if key == previous and row["step"] != steps - 1:
            continue
        previous = key
        click.echo(f"{row['step']:>6} {row['top']:>4} {len(key):>4}  {format_layers(key)}")
    click.echo(f"over {steps} steps: {summary['mean_layers_per_token']:.2f} of {num_layers} layers per token, "
               f"ideal speedup {summary['ideal_speedup']:.2f}x (decoder layers only)")
    if plot:
        click.echo(f"plot written to {plot}")


def _plot_schedule(sched: LayerSchedule, steps: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SkipDeployError("--plot needs matplotlib: pip install 'skipdeploy[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = list(range(steps))
    ax.step(xs, [sched.count(s) for s in xs], where="post", label="layers run")
    ax.step(xs, [sched.top(s) for s in xs], where="post", linestyle="--", label="top block")
    ax.set(xlabel="generation step", ylabel="layers", ylim=(0, sched.num_layers + 0.5),
           title=f"SkipDecode schedule, ideal speedup {sched.ideal_speedup(steps):.2f}x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- generate --------------------------------------------------------------------------------------
def _parse_ids(values: tuple[str, ...]) -> list[list[int]]:
    rows = []
    for value in values:
        try:
            rows.append([int(x) for x in value.replace(" ", "").split(",") if x != ""])
        except ValueError:
            raise SkipDeployError(f"--input-ids takes comma-separated integers (got {value!r})") from None
    return rows


def sampling_options(func):
    options = [
        click.option("--temperature", type=float, help="Sample at this temperature; 0 (the default) is greedy. "
                     "--top-k/--top-p alone imply 1.0."),
        click.option("--top-k", type=int, help="Sample among the K most likely tokens."),
        click.option("--top-p", type=float, help="Sample among the smallest set of tokens whose mass reaches P."),
        click.option("--repetition-penalty", type=float, help="Penalize tokens already in the prompt or output "
                     "(Hugging Face semantics; 1 is off)."),
        click.option("--seed", type=int, help="Seed for sampling: same seed, same tokens, on every backend."),
        click.option("--stop", "stop_strings", multiple=True, metavar="TEXT",
                     help="Stop a row once its text contains TEXT (repeatable)."),
        click.option("--stop-token-id", "stop_token_ids", multiple=True, type=int, metavar="ID",
                     help="Stop a row at this token id, like EOS (repeatable)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _generation_knobs(kwargs: dict) -> dict:
    knobs = {k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed",
                                         "stop_strings", "stop_token_ids")}
    if knobs["temperature"] is None and (knobs["top_k"] is not None or knobs["top_p"] is not None):
        knobs["temperature"] = 1.0
    return {k: v for k, v in knobs.items() if v is not None and v != ()}


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="A text prompt (repeat for a batch).")
@click.option("--input-ids", "input_ids", multiple=True, metavar="1,2,3",
              help="A prompt as comma-separated token ids (repeat for a batch).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime",
              show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]),
              help="Where the backend runs [default: cpu; tensorrt: cuda]. cuda needs onnxruntime-gpu, a CUDA "
                   "build of torch (fp16, CUDA graphs) or TensorRT engines (build-engines).")
@schedule_options
@click.option("--full", is_flag=True, help="Run every layer at every step (no skipping).")
@sampling_options
@click.option("--stream", is_flag=True, help="Print text as tokens are generated (one prompt).")
@click.option("--json", "as_json", is_flag=True, help="Print tokens, text and per-step layer counts as JSON.")
@click.option("--threads", type=int, help="Intra-op threads for onnxruntime [default: all cores].")
def generate(directory: Path, prompts: tuple[str, ...], input_ids: tuple[str, ...], max_new_tokens: int,
             backend: str, stream: bool, as_json: bool, threads: int | None, **kwargs) -> None:
    """Generate with SkipDecode from text prompts or token ids.

    Without schedule options the export's default schedule is used. --decay-tokens defaults to
    --max-new-tokens, so that --target-speedup K is met over this generation. The schedule
    follows the generation step, which all rows of a batch share (prompts are left-padded).
    """
    from .runtime import load

    if bool(prompts) == bool(input_ids):
        raise click.UsageError("give either --prompt or --input-ids (each may be repeated)")
    knobs = _generation_knobs(kwargs)
    options = {"threads": threads} if threads and backend == "onnxruntime" else {}
    device = kwargs.pop("device", None)
    if device:
        options["device"] = device
    runtime = load(directory, backend=backend, **options)
    sched = _schedule_from(_schedule_kwargs(kwargs), runtime.spec.num_layers, runtime.manifest.schedule,
                           max_new_tokens)
    rows = [runtime.tokenizer.encode(p) for p in prompts] if prompts else _parse_ids(input_ids)
    if stream and not as_json:
        result = _stream(runtime, rows, max_new_tokens, sched, knobs)
    else:
        result = runtime.generate(rows, max_new_tokens, sched, **knobs)
        if runtime.manifest.tokenizer_path is not None:
            result.text = [runtime.tokenizer.decode(t) for t in result.tokens]
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    if not stream:
        for r, tokens in enumerate(result.tokens):
            body = result.text[r] if result.text is not None else ",".join(map(str, tokens))
            click.echo(f"[{r}] {body}" if len(result.tokens) > 1 else body)
    steps = len(result.layers_per_step)
    per_token = f", {1e3 * result.decode_seconds / steps:.1f} ms/step" if steps else ""
    click.echo(f"{sum(map(len, result.tokens))} tokens; {result.mean_layers_per_token:.2f} of "
               f"{sched.num_layers} layers per token (ideal speedup {result.ideal_speedup:.2f}x); "
               f"prefill {1e3 * result.prefill_seconds:.1f} ms{per_token}", err=True)


def _stream(runtime, rows, max_new_tokens, sched, knobs):
    if len(rows) != 1:
        raise click.UsageError("--stream prints one prompt; give a single --prompt or --input-ids")
    has_text = runtime.manifest.tokenizer_path is not None
    steps = runtime.stream(rows, max_new_tokens, sched, **knobs)
    emitted: list[int] = []
    printed = ""
    while True:
        try:
            step = next(steps)
        except StopIteration as done:
            result = done.value
            break
        if step.tokens[0] is None:
            continue
        emitted.append(step.tokens[0])
        if has_text:
            text = runtime.tokenizer.decode(emitted)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                click.echo(text[len(printed):], nl=False)
                printed = text
        else:
            click.echo(f"{step.tokens[0]},", nl=False)
    click.echo()
    if has_text:
        result.text = [runtime.tokenizer.decode(t) for t in result.tokens]
    return result


# -- verify ----------------------------------------------------------------------------------------
@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path),
              help="The checkpoint the export came from: compare against transformers itself.")
@click.option("--backend", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime",
              show_default=True, help="Backend to verify (tensorrt: each engine against onnxruntime, then decoding).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="For an int8 export: the float32 export it was quantized from [default: the one its manifest "
                   "names].")
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(directory: Path, model: Path | None, backend: str, reference: Path | None, max_new_tokens: int,
           as_json: bool) -> None:
    """Check an export's runtime against the PyTorch reference; exit 1 beyond tolerance.

    Per graph: max error of hidden states and cached keys/values on random inputs, relative to
    max(1, |reference|). Per schedule (full and the export's default, or a 2x skip when the
    default is full): logits error and greedy token agreement over a batch of three prompts.
    An int8 export is compared with its float32 source, with int8 tolerances.
    """
    from .verify import verify as run_verify

    report = run_verify(directory, model=model, backend=backend, max_new_tokens=max_new_tokens, reference=reference)
    click.echo(json.dumps(report.to_dict()) if as_json else report.table())
    if not report.ok:
        failed = [c.name for c in report.graphs + report.decode if not c.ok]
        raise click.ClickException(f"verification failed beyond tolerance: {', '.join(failed)}")


# -- finetune, eval (defined in skipdeploy/training/commands.py) -----------------------------------
from .training.commands import eval_command, finetune_command  # noqa: E402

main.add_command(finetune_command)
main.add_command(eval_command)


# -- build-engines ---------------------------------------------------------------------------------
@main.command("build-engines")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--max-batch", type=int, help="Largest batch [default: the export's --max-batch].")
@click.option("--max-length", type=int, help="Longest prompt + generation [default: the export's, at most 2048].")
@click.option("--max-prompt", type=int, help="Longest prompt (prefill chunk) [default: 256].")
@click.option("--opt-batch", type=int, help="Batch size TensorRT tunes its kernels for [default: 8].")
@click.option("--force", is_flag=True, help="Rebuild even when engines for this machine are up to date.")
def build_engines(directory: Path, max_batch: int | None, max_length: int | None, max_prompt: int | None,
                  opt_batch: int | None, force: bool) -> None:
    """Build TensorRT engines (one per graph) for this GPU into DIR/engines.

    Engines are keyed by GPU, compute capability, TensorRT version, dtype and profile: the
    runtime refuses engines built elsewhere and says to run this command. fp16 engines come
    from an fp16 export (export --dtype float16).
    """
    from .engines.tensorrt_build import build_engines as run_build

    entry = run_build(directory, max_batch=max_batch, max_length=max_length, max_prompt=max_prompt,
                      opt_batch=opt_batch, force=force, log=lambda m: click.echo(m, err=True))
    meta = entry.metadata
    click.echo(f"TensorRT engines for {meta['gpu']} (TensorRT {meta['tensorrt']}, {meta['dtype']}) in {entry.directory}")


# -- bench (skipdeploy/bench.py) -------------------------------------------------------------------
from .bench import bench_command  # noqa: E402

main.add_command(bench_command())


# -- demo ------------------------------------------------------------------------------------------
@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the checkpoint and the export [default: a temporary directory].")
@click.option("--prompt", help="Prompt [default: the start of a Python class; random model: 'def greet(name):'].")
@click.option("--max-new-tokens", type=int, help="Tokens to generate [default: 64; random model: 24].")
@click.option("--target-speedup", type=float, help="SkipDecode target [default: 3; random model: 2].")
@click.option("--random", "use_random", is_flag=True, help="Use a random 8-layer model instead of the bundled one.")
def demo(workdir: Path | None, prompt: str | None, max_new_tokens: int | None, target_speedup: float | None,
         use_random: bool) -> None:
    """Offline tour: export the bundled model, complete a Python prompt with and without SkipDecode.

    The bundled model is a small OPT (12 layers, ~7M parameters) trained on Python's standard
    library and fine-tuned with SkipDecode schedules (see EVAL.md). Without it (or with --random),
    a random 8-layer checkpoint is made instead: its text is noise, but the path and the layers
    saved are the same.
    """
    import tempfile

    from . import export as run_export
    from .bundled import bundled_model, run_demo
    from .random_checkpoint import make_checkpoint
    from .runtime import load

    if bundled_model() is not None and not use_random:
        run_demo(workdir, prompt, max_new_tokens or 64, target_speedup or 3.0, click.echo)
        return
    prompt, max_new_tokens = prompt or "def greet(name):", max_new_tokens or 24
    target_speedup = target_speedup or 2.0
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="skipdeploy-demo-"))
    ckpt = make_checkpoint(workdir / "checkpoint", "small", weight_scale=3.0)
    click.echo(f"1/3 random 8-layer OPT checkpoint -> {ckpt}")
    out = workdir / "export"
    run_export(ckpt, out, force=True, log=lambda m: click.echo(f"    {m}"))
    click.echo(f"2/3 exported to {out}")
    runtime = load(out)
    skip = Schedule.target_speedup(runtime.spec.num_layers, target_speedup, decay_tokens=max_new_tokens)
    click.echo(f"3/3 generate {max_new_tokens} tokens after {prompt!r}")
    results = {}
    for label, sched in (("full", Schedule.full(runtime.spec.num_layers)), (f"skip {target_speedup:g}x", skip)):
        runtime.generate_text([prompt], max_new_tokens, schedule=sched)  # warm-up
        results[label] = r = runtime.generate_text([prompt], max_new_tokens, schedule=sched)
        steps = max(1, len(r.layers_per_step))
        click.echo(f"    {label:<9} {r.mean_layers_per_token:5.2f} layers/token (ideal {r.ideal_speedup:.2f}x), "
                   f"{1e3 * r.decode_seconds / steps:6.2f} ms/step: {r.text[0]!r}")
    full, skipped = results.values()
    speed = (full.decode_seconds / max(1, len(full.layers_per_step))) / \
        (skipped.decode_seconds / max(1, len(skipped.layers_per_step)))
    click.echo(f"measured decode speedup {speed:.2f}x; schedule: {skip.describe()}")
    click.echo(f"next: skipdeploy inspect {out}; skipdeploy generate {out} --prompt 'for i in' --target-speedup 2")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


if __name__ == "__main__":  # pragma: no cover
    main()
