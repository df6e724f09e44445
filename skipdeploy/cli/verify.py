"""``skipdeploy verify``: an export's runtime against the PyTorch reference."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import json_option, max_new_tokens_option


@click.command("verify")
@click.argument("directory", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path),
              help="The checkpoint the export came from: compare against transformers itself.")
@click.option("--backend", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime",
              show_default=True, help="Backend to verify (tensorrt: each engine against onnxruntime, then decoding).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="For a quantized (int8, int4, int8-dynamic) export: the float32 export it was quantized "
                   "from [default: the one its manifest names].")
@max_new_tokens_option(16, help="Tokens generated per prompt by the decoding checks.")
@json_option("the report")
def command(directory: Path, model: Path | None, backend: str, reference: Path | None, max_new_tokens: int,
            as_json: bool) -> None:
    """Check an export's runtime against the PyTorch reference; exit 1 beyond tolerance.

    Per graph: max error of hidden states and cached keys/values on random inputs, relative to
    max(1, |reference|). Per schedule (full and the export's default, or a 2x skip when the
    default is full): logits error and greedy token agreement over a batch of three prompts.
    A quantized export (int8, int4, int8-dynamic) is compared with its float32 source, with its
    scheme's tolerances.
    """
    from ..verify import verify

    report = verify(directory, model=model, backend=backend, max_new_tokens=max_new_tokens, reference=reference)
    click.echo(json.dumps(report.to_dict()) if as_json else report.table())
    if not report.ok:
        failed = [c.name for c in report.graphs + report.decode if not c.ok]
        raise click.ClickException(f"verification failed beyond tolerance: {', '.join(failed)}")
