"""``skipdeploy demo``: the offline tour."""

from __future__ import annotations

from pathlib import Path

import click

from .options import max_new_tokens_option


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the checkpoint and the export, kept afterwards [default: a temporary "
              "directory, removed at the end].")
@click.option("--prompt", help="Prompt [default: the start of a Python class; random model: 'def greet(name):'].")
@max_new_tokens_option(None, help="Tokens to generate [default: 64; random model: 24].")
@click.option("--target-speedup", type=float, metavar="K", help="SkipDecode layer speedup [default: 3; random "
              "model: 2].")
@click.option("--random", "use_random", is_flag=True, help="Use a random 8-layer model instead of the bundled one.")
def command(workdir: Path | None, prompt: str | None, max_new_tokens: int | None, target_speedup: float | None,
            use_random: bool) -> None:
    """Offline tour: export the bundled model, complete a Python prompt with and without SkipDecode.

    The bundled model is a small OPT (12 layers, ~7M parameters) trained on Python's standard
    library and fine-tuned with SkipDecode schedules (see EVAL.md). Without it (or with --random),
    a random 8-layer checkpoint is made instead: its text is noise, but the path and the layers
    saved are the same.
    """
    from ..bundled import run_demo

    run_demo(workdir, prompt, max_new_tokens, target_speedup, click.echo, random=use_random)
