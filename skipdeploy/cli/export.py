"""``skipdeploy export``: a checkpoint to per-layer ONNX graphs and a manifest."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ExportError
from ..exporter.quantize import SCHEMES
from .options import AliasedOption, format_size, pop_schedule_options, schedule_from, schedule_options


@click.command("export")
@click.argument("model", metavar="MODEL")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Export directory to create.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Graph precision; float16 is for GPUs (LayerNorm and softmax stay float32).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (17..23).")
@click.option("--max-length", type=click.IntRange(min=1), help="Longest prompt + generation the export serves "
              "[default: the model's positions].")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Largest batch the export serves.")
@schedule_options
@click.option("--tensorrt", is_flag=True, help="Also build TensorRT engines for this GPU into the export's engines/ "
              "(needs TensorRT and a GPU; see build-engines).")
@click.option("--weights", "quantize", cls=AliasedOption, hidden_aliases=("--quantize",),
              type=click.Choice(SCHEMES), help="Write int8-, int4- or int8-dynamic-weight graphs for CPU decoding "
                   "instead of float ones (as the quantize command).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only once the new export is complete).")
@click.option("--no-check", is_flag=True, help="Skip the per-graph check against PyTorch.")
def command(model: str, out: Path, dtype: str, opset: int, max_length: int | None, max_batch: int,
            tensorrt: bool, quantize: str | None, force: bool, no_check: bool, **kwargs) -> None:
    """Export a checkpoint to per-layer ONNX graphs and a manifest.

    MODEL is a local checkpoint directory or a hub id of an OPT, Llama (2, 3.x, TinyLlama,
    SmolLM2), Mistral or Qwen2 model, or "bundled": the small OPT that ships with skipdeploy
    (the one `skipdeploy demo` runs).

    Each graph is checked against the PyTorch model on random inputs right after it is written;
    the directory appears only when everything is written and verified. Schedule options set the
    export's default schedule (otherwise the checkpoint's fine-tuned one, else full).
    """
    from .. import export as run_export

    if out.exists() and not force:  # the API's own check names force=True; this is the flag
        raise ExportError(f"{out} already exists; pass --force to replace it")
    opts = pop_schedule_options(kwargs)

    def schedule(num_layers: int, finetuned):  # partial options modify the checkpoint's fine-tuned schedule
        return schedule_from(opts, num_layers, finetuned, None)

    manifest = run_export(model, out, dtype=dtype, opset=opset, max_length=max_length, max_batch=max_batch,
                          schedule=schedule if any(v for v in opts.values()) else None, force=force,
                          check_graphs=not no_check, tensorrt=tensorrt, quantize=quantize,
                          log=lambda m: click.echo(m, err=True))
    weights = f"{quantize} weights, " if quantize else ""
    click.echo(f"exported {manifest.model.num_layers} layers to {out} "
               f"({weights}{format_size(manifest.total_bytes)}; default schedule: {manifest.schedule.describe()})")
