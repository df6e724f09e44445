"""``skipdeploy eval``: held-out perplexity and greedy agreement per schedule."""

from __future__ import annotations

import json

import click

from .options import AliasedOption, comma_list, json_option


@click.command("eval")
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True, metavar="PATH",
              help="Held-out text: a file, a directory, or stdlib:heldout (repeatable).")
@click.option("--reference", metavar="EXPORT",
              help="Measure greedy agreement against this export's (or checkpoint's) full schedule, e.g. the "
                   "original model of a fine-tune [default: MODEL's own full schedule].")
@click.option("--target-speedup", default="1,2,3,5", show_default=True, metavar="K,K,...",
              help="Schedules to evaluate (1 = full).")
@click.option("--decay-tokens", type=int, metavar="T",
              help="Decay horizon of the schedules [default: the export's fine-tuned schedule's, else "
                   "--seq-len minus --context].")
@click.option("--warmup-layers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Bottom layers every token runs.")
@click.option("--prompt-layers", type=click.Choice(["full", "schedule"]), default="full", show_default=True,
              help="Run the context through all layers (full) or the step-0 layer set.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per perplexity chunk.")
@click.option("--context", type=int, help="Context tokens per chunk; the rest is scored [default: half].")
@click.option("--chunks", type=click.IntRange(min=1), default=64, show_default=True, help="Held-out chunks for perplexity.")
@click.option("--prompts", type=click.IntRange(min=1), default=32, show_default=True, help="Prompts for greedy agreement.")
@click.option("--max-new-tokens", "new_tokens", type=click.IntRange(min=1), cls=AliasedOption,
              hidden_aliases=("--new-tokens",), help="Greedy tokens per prompt [default: --decay-tokens].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Rows per runtime call.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed that picks the chunks and prompts from the data.")
@json_option("{\"results\": [...], ...}")
def command(model: str, data: tuple[str, ...], reference: str | None, target_speedup: str, decay_tokens,
            warmup_layers: int, prompt_layers: str, seq_len: int, context, chunks: int, prompts: int, new_tokens,
            batch_size: int, seed: int, as_json: bool) -> None:
    """Held-out perplexity and greedy agreement with the full schedule, per SkipDecode schedule.

    MODEL is an export directory or a checkpoint (exported to a temporary directory first). All
    figures come from the skipdeploy runtime: perplexity by teacher forcing the scored part of each
    chunk through the schedule; agreement as the fraction of greedy tokens identical, position by
    position, to the reference's (the full schedule of MODEL, or of --reference) over prompts cut
    from the data, and prefix as the mean length of the identical start of each continuation.
    """
    from ..training.evaluate import evaluate

    report = evaluate(model, list(data), comma_list(target_speedup, "--target-speedup"), reference=reference,
                      seq_len=seq_len,
                      context=context, decay_tokens=decay_tokens, warmup_layers=warmup_layers, prompt=prompt_layers,
                      chunks=chunks, prompts=prompts, new_tokens=new_tokens, batch_size=batch_size, seed=seed,
                      log=(lambda m: None) if as_json else (lambda m: click.echo(m, err=True)))
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"{'target':>7} {'layers':>7} {'measured':>9} {'layers':>7} {'perplexity':>11} {'agreement':>10} "
               f"{'identical prefix':>17}")
    click.echo(f"{'':>7} {'speedup':>7} {'speedup':>9} {'/token':>7} {'':>11} {'':>10} {'tokens (share)':>17}")
    for r in report["results"]:
        click.echo(f"{r['target_speedup']:>6g}x {r['layer_speedup']:>6.2f}x {r['measured_speedup']:>8.2f}x "
                   f"{r['layers_per_token']:>7.2f} {r['perplexity']:>11.3f} {r['agreement']:>10.3f} "
                   f"{r['prefix_tokens']:>8.1f} ({r['prefix']:.3f})")
    click.echo(f"{report['tokens_scored']} tokens scored ({report['context']} context + "
               f"{report['seq_len'] - report['context']} scored per chunk), {report['prompts']} prompts x "
               f"{report['new_tokens']} greedy tokens, decay over {report['decay_tokens']} tokens; agreement with "
               f"{'the full schedule of ' + report['reference'] if report['reference'] else 'its own full schedule'}",
               err=True)
