"""``skipdeploy build-engines``: TensorRT engines for this GPU."""

from __future__ import annotations

from pathlib import Path

import click

from .options import Device


@click.command("build-engines")
@click.argument("directory", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--max-batch", type=click.IntRange(min=1), help="Largest batch [default: the export's --max-batch].")
@click.option("--max-length", type=click.IntRange(min=1), help="Longest prompt + generation [default: the export's, "
              "at most 2048].")
@click.option("--max-prompt", type=click.IntRange(min=1), help="Longest prompt (prefill chunk) [default: 256].")
@click.option("--opt-batch", type=click.IntRange(min=1), help="Batch size TensorRT tunes its kernels for [default: 8].")
@click.option("--force", is_flag=True, help="Rebuild even when engines for this machine are up to date.")
@click.option("--device", type=Device(cpu=False), default="cuda", show_default=True, metavar="cuda|cuda:N",
              help="The GPU to build for (engines are keyed by its model).")
def command(directory: Path, max_batch: int | None, max_length: int | None, max_prompt: int | None,
            opt_batch: int | None, force: bool, device: str) -> None:
    """Build TensorRT engines (one per graph) for this GPU into EXPORT/engines.

    Engines are keyed by GPU, compute capability, TensorRT version, dtype and profile: the
    runtime refuses engines built elsewhere and says to run this command. fp16 engines come
    from an fp16 export (export --dtype float16).
    """
    from ..engines.tensorrt_build import build_engines

    entry = build_engines(directory, max_batch=max_batch, max_length=max_length, max_prompt=max_prompt,
                          opt_batch=opt_batch, force=force, device_id=device, log=lambda m: click.echo(m, err=True))
    meta = entry.metadata
    click.echo(f"TensorRT engines for {meta['gpu']} (TensorRT {meta['tensorrt']}, {meta['dtype']}) in {entry.directory}")
