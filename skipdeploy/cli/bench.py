"""``skipdeploy bench``: decode speed per batch size and schedule, against Hugging Face generate and
(``--peers``) the CPU engines a user would pick instead."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from ..bench import BenchError, format_table, plot, run_bench
from ..bench.peers import PEERS, peer_names
from ..errors import InputError
from ..schedule import Schedule, TargetOutOfReach
from .options import AliasedOption, comma_list, json_option, max_new_tokens_option

PEER_NAMES = tuple(PEERS)


@click.command("bench")
@click.argument("directory", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,8", show_default=True, metavar="N,N,...", help="Batch sizes to measure.")
@click.option("--target-speedup", cls=AliasedOption, hidden_aliases=("--target-speedups",), default="2,3,5",
              show_default=True, metavar="K,K,...",
              help="SkipDecode schedules to measure, one per layer speedup K (Schedule.target_speedup); the full "
                   "schedule is always measured. Empty for none.")
@click.option("--prompt-length", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompt tokens per row (random ids).")
@max_new_tokens_option(64, help="Tokens generated per row (EOS is ignored); at least 2.", cls=AliasedOption,
                       hidden_aliases=("--new-tokens",))
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed rounds; each round runs every contender once, in rotating order.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Untimed runs per contender first.")
@click.option("--decay-tokens", type=click.IntRange(min=1), metavar="T",
              help="Decay length of the skip schedules [default: the decode steps, --max-new-tokens - 1].")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for onnxruntime and for PyTorch "
              "[default: all cores].")
@click.option("--quantize", "--weights", "quantize", metavar="SCHEME[,SCHEME]",
              help="Also measure the export with these weights (int8, int4, int8-dynamic; e.g. int8,int4): the full "
                   "schedule and every --target-speedup, and their token agreement with float32 full; made in a "
                   "temporary directory unless --quantized-dir names one.")
@click.option("--quantized-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Where the quantized exports are (reused: DIR/int8, DIR/int4, ...) or are written (kept).")
@click.option("--int8-export", type=click.Path(path_type=Path), hidden=True,
              help="The int8 export's own directory (reused or written; kept).")
@click.option("--checkpoint", "--model", "checkpoint", metavar="CKPT",
              help="Checkpoint for the Hugging Face baseline and the peers, a directory or gguf:FILE "
                   "(gguf:smollm2) [default: the export's source].")
@click.option("--peers", metavar="NAME,NAME,...",
              help="Also measure other engines on the checkpoint: ct2 (CTranslate2 float32 and int8; OPT and Llama "
                   "family), ortgenai (onnxruntime-genai fp32 and int4 from its model builder; Llama family), llamacpp "
                   "(llama.cpp on the GGUF file the checkpoint came from, as it is and in float32; pip install "
                   "llama-cpp-python), all, "
                   f"or single ones ({', '.join(PEER_NAMES)}). Each is converted once into --work-dir, runs in a "
                   "process of its own and takes its turn in every round; its rows have the same fields, and its "
                   "tokens are compared with the full schedule's. A peer whose package is missing (pip install "
                   "'skipdeploy[bench]') or that cannot take the checkpoint is skipped with one line.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Where the peers' conversions are cached [default: ~/.cache/skipdeploy/peers/CKPT-HASH].")
@click.option("--no-hf", is_flag=True, help="Skip the Hugging Face generate baseline.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory probe (a fresh process per export and batch "
              "size).")
@click.option("--no-bandwidth", is_flag=True, help="Skip the bandwidth probe (and the memory floor).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompts.")
@json_option("the results (every run, row and probe; the environment), not the table,")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Also write the results as JSON to FILE.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write a PNG to FILE: ms/token per schedule, and the measured speedup against the cost model's.")
def command(directory: Path, batch_sizes: str, target_speedup: str, prompt_length: int, max_new_tokens: int,
            repeats: int, warmup: int, decay_tokens: int | None, threads: int | None, quantize: str | None,
            quantized_dir: Path | None, int8_export: Path | None, checkpoint: str | None, peers: str | None, work_dir: Path | None, no_hf: bool,
            no_memory: bool, no_bandwidth: bool, seed: int, as_json: bool, output: Path | None,
            plot_path: Path | None) -> None:
    """Measure decode speed per batch size and schedule, against Hugging Face generate and other engines.

    Times to first token, time per output token (median, P90, P99), output tokens/s, layers
    per token, the speedup of each SkipDecode schedule over the full one next to the speedup a
    multiply-add cost model predicts (embed + layers run + head), and the same checkpoint in
    Hugging Face generate with the same threads; with --peers, CTranslate2 and onnxruntime-genai
    on the same checkpoint too. Contenders alternate run by run, so machine drift hits all
    alike. Prompts are random token ids; EOS is ignored so every row generates --max-new-tokens
    tokens. Exits 1, after printing what it measured, if a memory probe fails.

    \b
    Example:
      skipdeploy bench opt-125m-sd --batch-sizes 1,8 --target-speedup 2,3,5 \\
          --quantize int8,int4 --output bench.json --plot bench.png
      skipdeploy bench smollm2-sd --checkpoint smollm2-ckpt --peers ct2,ortgenai
    """
    peer_list = peer_names(comma_list(peers, "--peers", str)) if peers is not None else []
    targets = comma_list(target_speedup, "--target-speedup") if target_speedup.strip() else []
    given = click.get_current_context().get_parameter_source("target_speedup") != ParameterSource.DEFAULT
    targets = _reachable(directory, targets, decay_tokens or max(1, max_new_tokens - 1), given)
    for option, path in (("--output", output), ("--plot", plot_path)):  # before minutes of measuring
        if path is not None and not path.expanduser().resolve().parent.is_dir():
            raise InputError(f"{option} {path}: the directory {path.expanduser().resolve().parent} does not exist")
    failure = None
    try:
        results = run_bench(directory, batch_sizes=comma_list(batch_sizes, "--batch-sizes", int),
                            target_speedups=targets, prompt_length=prompt_length, new_tokens=max_new_tokens,
                            repeats=repeats, warmup=warmup, decay_tokens=decay_tokens, threads=threads,
                            hf=not no_hf, checkpoint=checkpoint,
                            quantize=comma_list(quantize, "--quantize", str) if quantize is not None else None,
                            int8_export=int8_export, quantized_dir=quantized_dir,
                            memory=not no_memory, bandwidth=not no_bandwidth, seed=seed, peers=peer_list,
                            work_dir=work_dir, log=lambda m: click.echo(m, err=True))
    except BenchError as exc:  # the timings are in: show them, then fail
        results, failure = exc.results, exc
    click.echo(json.dumps(results, indent=1) if as_json else format_table(results))
    if output:
        output.write_text(json.dumps(results, indent=1) + "\n")
        click.echo(f"results written to {output}", err=True)
    if plot_path:
        plot(results, plot_path)
        click.echo(f"plot written to {plot_path}", err=True)
    if failure is not None:
        raise click.ClickException(str(failure))


def _reachable(directory: Path, targets: list[float], decay: int, given: bool) -> list[float]:
    """The targets a schedule can meet over the steps measured: an unreachable default is left out
    (with a note), an unreachable given one is refused naming what bench can change, before any
    measurement."""
    from ..manifest import read_manifest

    if not any(k > 1 for k in targets):
        return targets  # k <= 1 is run_bench's to refuse
    num_layers = read_manifest(directory, verify=False).model.num_layers
    kept = []
    for k in targets:
        try:
            if k > 1:
                Schedule.target_speedup(num_layers, float(k), decay_tokens=decay)
        except TargetOutOfReach as exc:
            if given:
                raise InputError(exc.describe(None, None) + "; lower --target-speedup, or measure more decode "
                                 "steps (--max-new-tokens, --decay-tokens)") from None
            click.echo(f"note: {exc.describe(None, None)}; left out of the default --target-speedup", err=True)
            continue
        kept.append(k)
    return kept
