"""``skipdeploy quantize``: an int8-, int4- or int8-dynamic-weight copy of a float32 export."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ExportError
from ..exporter.quantize import SCHEMES
from .options import format_size


@click.command("quantize")
@click.argument("directory", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the quantized export.")
@click.option("--weights", type=click.Choice(SCHEMES), default="int8", show_default=True,
              help="Weight precision of the decoder layers and the LM head (the same option as export's): int8 or "
                   "int4 in blocks (onnxruntime MatMulNBits; int4 has about 1.8x fewer bytes than int8), or "
                   "int8-dynamic (int8 weights per output channel and int8 activations with one scale per call: "
                   "a little faster than int8, less accurate; what int8 meant before).")
@click.option("--per-tensor", is_flag=True, help="int8-dynamic only: one scale per weight matrix instead of one per "
              "output channel (less accurate).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new export is complete).")
def command(directory: Path, out: Path, weights: str, per_tensor: bool, force: bool) -> None:
    """Write an int8-, int4- or int8-dynamic-weight copy of a float32 export, for CPU decoding.

    The decoder layers and the LM head multiply with quantized weights: int8 and int4 through
    onnxruntime's MatMulNBits (blocks of 32 weights along the input dimension, each with its own
    scale; about 3.5x and 6x fewer weight bytes per token), int8-dynamic through onnxruntime
    dynamic quantization (standard ONNX ops; one activation scale per call, so a row's tokens
    depend on the rows batched with it). Attention, LayerNorm, the KV cache and the logits stay
    float32; the onnxruntime backend runs the result. Each graph's error against
    float32 is recorded in the manifest; `skipdeploy verify OUT` checks decoding against the
    float32 export.
    """
    from ..exporter.quantize import quantize_export
    from ..manifest import read_manifest

    if per_tensor and weights != "int8-dynamic":
        raise ExportError(f"--per-tensor is for int8-dynamic weights; {weights} weights have one scale per block")
    if out.exists() and not force:  # the API's own check names force=True; this is the flag
        raise ExportError(f"{out} already exists; pass --force to replace it")

    source = read_manifest(directory, verify=False)
    manifest = quantize_export(directory, out, weights=weights, per_channel=not per_tensor, force=force,
                               log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {out} ({weights} weights, {format_size(manifest.total_bytes)}; the float32 export is "
               f"{format_size(source.total_bytes)})")
