"""Click commands ``skipdeploy finetune`` and ``skipdeploy eval`` (registered in ``skipdeploy.cli``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import SkipDeployError


def _floats(value: str | None, option: str) -> list[float] | None:
    if value is None:
        return None
    try:
        items = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SkipDeployError(f"{option} takes comma-separated numbers (got {value!r})") from None
    if not items:
        raise SkipDeployError(f"{option} needs at least one number")
    return items


@click.command("finetune")
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True, metavar="PATH",
              help="Training text: a file, a directory (*.py, *.txt, recursively), or stdlib:train (repeatable).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output checkpoint directory (re-running the same command resumes it).")
@click.option("--target-speedup", metavar="K,K,...",
              help="Schedules to train with, one drawn per batch (1 = full); the first is the export default.")
@click.option("--max-layers", type=int, metavar="N", help="Top-block size at the first generated token.")
@click.option("--min-layers", type=int, metavar="N", help="Floor of the top block.")
@click.option("--warmup-layers", type=int, metavar="N", help="Bottom layers every token runs [default: 1].")
@click.option("--decay-tokens", type=int, metavar="T",
              help="Tokens over which the top block shrinks [default: --seq-len minus the longest context].")
@click.option("--prompt-layers", type=click.Choice(["full", "schedule"]), help="Layers run over the context.")
@click.option("--full", is_flag=True, help="Train with the full schedule (plain language-model training).")
@click.option("--steps", type=int, default=500, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Peak learning rate (AdamW, cosine decay).")
@click.option("--warmup-steps", type=int, default=0, show_default=True, help="Linear learning-rate warm-up.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per training sequence.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=int, default=100, show_default=True, help="Steps between resumable saves.")
@click.option("--force", is_flag=True, help="Start over even if --out holds a fine-tune.")
def finetune_command(model: str, data: tuple[str, ...], out: Path, target_speedup: str | None, max_layers, min_layers,
                     warmup_layers, decay_tokens, prompt_layers, full: bool, steps: int, lr: float,
                     warmup_steps: int, batch_size: int, seq_len: int, seed: int, save_every: int,
                     force: bool) -> None:
    """Fine-tune an OPT checkpoint with SkipDecode schedules applied as decoding applies them.

    Each batch gets a context length c in [seq_len/8, seq_len/2]: positions before c run the
    prompt layers, the position holding generated token j runs the layers of step j (teacher
    forcing, one batched full-sequence forward). The schedules are stored in the checkpoint's
    config.json, and `skipdeploy export` uses the first as the export's default.
    """
    from ..exporter.checkpoint import load_config
    from .finetune import FinetuneConfig, default_decay_tokens, finetune, schedules_from_options

    speedups = _floats(target_speedup, "--target-speedup")
    if full and (speedups or max_layers or min_layers):
        raise click.UsageError("--full excludes --target-speedup/--max-layers/--min-layers")
    if speedups and (max_layers or min_layers):
        raise click.UsageError("--target-speedup picks --max-layers/--min-layers itself; give one or the other")
    num_layers = load_config(model).num_hidden_layers
    scheds = schedules_from_options(num_layers, speedups, max_layers=max_layers, min_layers=min_layers,
                                    warmup_layers=warmup_layers, prompt=prompt_layers, full=full,
                                    decay_tokens=decay_tokens or default_decay_tokens(seq_len))
    cfg = FinetuneConfig(model=model, data=list(data), out=str(out), schedules=[s.to_dict() for s in scheds],
                         steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed,
                         warmup_steps=warmup_steps, save_every=save_every)
    for s in scheds:
        click.echo(f"schedule: {s.describe()}", err=True)
    finetune(cfg, force=force, log=lambda m: click.echo(m, err=True))
    click.echo(f"fine-tuned checkpoint in {out}; next: skipdeploy export {out} --out {out}-sd")


@click.command("eval")
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True, metavar="PATH",
              help="Held-out text: a file, a directory, or stdlib:heldout (repeatable).")
@click.option("--target-speedup", default="1,2,3,5", show_default=True, metavar="K,K,...",
              help="Schedules to evaluate (1 = full).")
@click.option("--decay-tokens", type=int, metavar="T",
              help="Decay horizon of the schedules [default: the export's fine-tuned schedule's, else "
                   "--seq-len minus --context].")
@click.option("--warmup-layers", type=int, default=1, show_default=True)
@click.option("--prompt-layers", type=click.Choice(["full", "schedule"]), default="full", show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per perplexity chunk.")
@click.option("--context", type=int, help="Context tokens per chunk; the rest is scored [default: half].")
@click.option("--chunks", type=int, default=64, show_default=True, help="Held-out chunks for perplexity.")
@click.option("--prompts", type=int, default=32, show_default=True, help="Prompts for greedy agreement.")
@click.option("--new-tokens", type=int, help="Greedy tokens per prompt [default: --decay-tokens].")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print {\"results\": [...], ...} as JSON.")
def eval_command(model: str, data: tuple[str, ...], target_speedup: str, decay_tokens, warmup_layers: int,
                 prompt_layers: str, seq_len: int, context, chunks: int, prompts: int, new_tokens, batch_size: int,
                 seed: int, as_json: bool) -> None:
    """Held-out perplexity and greedy agreement with the full schedule, per SkipDecode schedule.

    MODEL is an export directory or a checkpoint (exported to a temporary directory first). All
    figures come from the skipdeploy runtime: perplexity by teacher forcing the scored part of each
    chunk through the schedule, agreement as the fraction of greedy tokens identical, position by
    position, to the full model's over prompts cut from the data.
    """
    from .evaluate import evaluate

    if chunks < 1 or prompts < 1 or batch_size < 1:
        raise SkipDeployError("--chunks, --prompts and --batch-size must be >= 1")
    report = evaluate(model, list(data), _floats(target_speedup, "--target-speedup"), seq_len=seq_len,
                      context=context, decay_tokens=decay_tokens, warmup_layers=warmup_layers, prompt=prompt_layers,
                      chunks=chunks, prompts=prompts, new_tokens=new_tokens, batch_size=batch_size, seed=seed,
                      log=(lambda m: None) if as_json else (lambda m: click.echo(m, err=True)))
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"{'target':>7} {'ideal':>7} {'measured':>9} {'layers':>7} {'perplexity':>11} {'agreement':>10}")
    for r in report["results"]:
        click.echo(f"{r['target_speedup']:>6g}x {r['ideal_speedup']:>6.2f}x {r['measured_speedup']:>8.2f}x "
                   f"{r['layers_per_token']:>7.2f} {r['perplexity']:>11.3f} {r['agreement']:>10.3f}")
    click.echo(f"{report['tokens_scored']} tokens scored ({report['context']} context + "
               f"{report['seq_len'] - report['context']} scored per chunk), {report['prompts']} prompts x "
               f"{report['new_tokens']} greedy tokens, decay over {report['decay_tokens']} tokens", err=True)
