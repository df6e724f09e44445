"""``skipdeploy finetune``: train a checkpoint with SkipDecode schedules."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..errors import InputError
from .options import comma_list


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
@click.option("--steps", type=click.IntRange(min=1), default=500, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-4, show_default=True,
              help="Peak learning rate (AdamW, cosine decay).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Linear learning-rate warm-up.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per step.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per training sequence.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the data order, the context lengths and the schedule draws.")
@click.option("--full-share", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="P",
              help="Share of batches trained with the full schedule instead of the drawn one (keeps full-depth "
                   "quality).")
@click.option("--distill", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="W",
              help="Self-distillation: loss = (1-W) CE + W KL(frozen starting model's full schedule || student).")
@click.option("--loss-positions", type=click.Choice(["all", "generated"]), default="all", show_default=True,
              help="Score every position, or only the generated ones (those run under the schedule).")
@click.option("--save-every", type=click.IntRange(min=1), default=100, show_default=True, help="Steps between resumable saves.")
@click.option("--force", is_flag=True, help="Start over even if --out holds a fine-tune.")
def command(model: str, data: tuple[str, ...], out: Path, target_speedup: str | None, max_layers, min_layers,
                     warmup_layers, decay_tokens, prompt_layers, full: bool, steps: int, lr: float,
                     warmup_steps: int, batch_size: int, seq_len: int, seed: int, full_share: float,
                     distill: float, loss_positions: str, save_every: int, force: bool) -> None:
    """Fine-tune a checkpoint (OPT, Llama, Mistral, Qwen2) with SkipDecode schedules applied as decoding applies them.

    Each batch gets a context length c in [seq_len/8, seq_len/2]: positions before c run the
    prompt layers, the position holding generated token j runs the layers of step j (teacher
    forcing, one batched full-sequence forward). --full-share mixes in full-schedule batches and
    --distill pulls the skip paths toward the starting model's full-schedule distribution. The
    schedules are stored in the checkpoint's config.json, and `skipdeploy export` uses the first
    as the export's default.
    """
    from ..exporter.checkpoint import load_config
    from ..training.finetune import FinetuneConfig, default_decay_tokens, finetune, schedules_from_options

    for name, value in (("--lr", lr), ("--full-share", full_share), ("--distill", distill)):
        if not math.isfinite(value):  # click's range lets nan (and, for --lr, inf) through
            raise InputError(f"{name} must be a finite number{' > 0' if name == '--lr' else ' in [0, 1]'} "
                             f"(got {value})")
    speedups = comma_list(target_speedup, "--target-speedup")
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
                         warmup_steps=warmup_steps, save_every=save_every, full_share=full_share,
                         distill=distill, loss_positions=loss_positions)
    for s in scheds:
        click.echo(f"schedule: {s.describe()}", err=True)
    finetune(cfg, force=force, log=lambda m: click.echo(m, err=True))
    click.echo(f"fine-tuned checkpoint in {out}; next: skipdeploy export {out} --out {out}-sd")
