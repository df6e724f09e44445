"""``skipdeploy generate``: text or token ids with a SkipDecode schedule."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..runtime.text import CompletionText
from .options import (backend_options, comma_list, engine_options, json_option, max_new_tokens_option, pop_request,
                      sampling_options, schedule_options)


@click.command("generate")
@click.argument("directory", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="A text prompt (repeat for a batch).")
@click.option("--input-ids", "input_ids", multiple=True, metavar="1,2,3",
              help="A prompt as comma-separated token ids (repeat for a batch).")
@max_new_tokens_option(32)
@backend_options
@schedule_options
@click.option("--full", is_flag=True, help="Run every layer at every step (no skipping).")
@sampling_options
@click.option("--stream", is_flag=True, help="Print text as tokens are generated (one prompt); with --json, one "
              "JSON line per token, then the result.")
@json_option("tokens, text and per-step layer counts")
def command(directory: Path, prompts: tuple[str, ...], input_ids: tuple[str, ...], max_new_tokens: int,
            backend: str, device: str | None, threads: int | None, stream: bool, as_json: bool, **kwargs) -> None:
    """Generate with SkipDecode from text prompts or token ids.

    Without schedule options the export's default schedule is used; options that give part of a
    schedule modify it. --decay-tokens defaults to this generation's decode steps
    (--max-new-tokens - 1), so that --target-speedup K is met over it. The schedule follows the
    generation step, which all rows of a batch share (prompts are left-padded).
    """
    from ..runtime import load

    if bool(prompts) == bool(input_ids):
        raise click.UsageError("give either --prompt or --input-ids (each may be repeated)")
    if stream and len(prompts) + len(input_ids) != 1:
        raise click.UsageError("--stream prints one prompt; give a single --prompt or --input-ids")
    request = pop_request(kwargs, max_new_tokens)
    runtime = load(directory, **engine_options(backend, device, threads))
    sched = request.schedule_for(runtime.spec.num_layers, runtime.manifest.schedule)
    knobs = request.knobs()
    rows = [runtime.tokenizer.encode(p) for p in prompts] if prompts else \
        [comma_list(v, "--input-ids", int, allow_empty=True) for v in input_ids]  # empty: the runtime names the prompt
    has_text = runtime.manifest.tokenizer_path is not None
    if stream:
        result = _stream(runtime, rows[0], max_new_tokens, sched, knobs, as_json)
    else:
        result = runtime.generate(rows, max_new_tokens, sched, **knobs)
    if has_text:  # every door's stop rule: the text ends before the stop string
        result.text = [CompletionText(runtime.tokenizer.decode, request.stop, t).text() for t in result.tokens]
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    if not stream:
        for r, tokens in enumerate(result.tokens):
            body = result.text[r] if result.text is not None else ",".join(map(str, tokens))
            click.echo(f"[{r}] {body}" if len(result.tokens) > 1 else body)
    steps = len(result.layers_per_step)
    per_token = f", {1e3 * result.decode_seconds / steps:.1f} ms/step" if steps else ""
    click.echo(f"{sum(map(len, result.tokens))} tokens; {result.mean_layers_per_token:.2f} of {sched.num_layers} "
               f"layers per token (layer speedup {result.layer_speedup:.2f}x over {steps} decode steps); "
               f"prefill {1e3 * result.prefill_seconds:.1f} ms{per_token}", err=True)


def _stream(runtime, prompt: list[int], max_new_tokens: int, sched, knobs: dict, as_json: bool):
    """Print each token as it comes (text, ids, or a JSON line per token); return the result. The
    text is held back where it may begin a stop string or half a character (``CompletionText``)."""
    text = CompletionText(runtime.tokenizer.decode, knobs.get("stop_strings", ())) \
        if runtime.manifest.tokenizer_path is not None else None
    steps = runtime.stream([prompt], max_new_tokens, sched, **knobs)
    try:
        while True:
            try:
                step = next(steps)
            except StopIteration as done:
                result = done.value
                break
            token = step.tokens[0]
            if token is None:
                continue
            delta = text.add(token) if text is not None else None
            if as_json:
                click.echo(json.dumps({"step": step.index, "token": token, "text": delta, "layers": step.layers}))
            elif text is not None:
                click.echo(delta, nl=False)
            else:
                click.echo(f"{token},", nl=False)
    except KeyboardInterrupt:
        click.echo()  # end the streamed line: the CLI's "interrupted" goes on its own
        raise
    if text is not None and not as_json:
        click.echo(text.rest(), nl=False)
    if not as_json:
        click.echo()
    return result
