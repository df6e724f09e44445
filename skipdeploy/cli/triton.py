"""``skipdeploy triton``: a Triton Inference Server model repository for an export."""

from __future__ import annotations

from pathlib import Path

import click

from .options import pop_schedule_options, schedule_from, schedule_options, slot_options


@click.command("triton")
@click.argument("export", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model repository to write the model into (Triton's --model-repository): created if missing; "
              "the other models in it stay.")
@click.option("--model-name", metavar="NAME", help="The model's name in Triton [default: the export directory's "
              "name].")
@slot_options
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances (processes), each its own engine; give each --threads cores' share.")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads per instance "
              "[default: all cores].")
@click.option("--backend", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime", show_default=True,
              help="Engine that runs the graphs (in-flight batching runs on the CPU).")
@schedule_options
@click.option("--full", is_flag=True, help="Default schedule: every layer at every step.")
@click.option("--copy-export", is_flag=True, help="Copy the export into the repository (REPO/NAME/1/export), so "
              "that the repository stands alone (a container image, a volume); otherwise it names the export's "
              "absolute path.")
@click.option("--force", is_flag=True, help="Replace the model's directory (REPO/NAME) if it exists (only once the "
              "new one is complete); the repository's other models stay.")
def command(export: Path, out: Path, model_name: str | None, max_batch: int, instances: int, max_queue: int,
            max_length: int | None, prefill_chunk: int, threads: int | None, backend: str, copy_export: bool,
            force: bool, **kwargs) -> None:
    """Write a model that serves EXPORT into a Triton Inference Server model repository.

    The model is Triton's Python backend (decoupled) over the in-flight batching engine, with the
    inputs and outputs of Triton's vLLM backend (text_input, stream, sampling_parameters,
    exclude_input_in_output -> text_output) plus token ids (input_ids -> output_ids), so that the
    generate endpoints, tritonclient and Triton's LLM tools work unchanged. Schedule options set
    the default schedule (partial ones modify the export's); a request's sampling_parameters may
    carry its own "skipdecode" object. Serve it with NVIDIA's tritonserver image (docs/triton.md)
    or, locally, python -m skipdeploy.triton.server REPO. Run it again with another --model-name
    to serve several exports from one repository. The engine options are checked now with the
    limits the engine applies when the server loads the model (its KV cache against this machine's
    available memory included).
    """
    from ..manifest import read_manifest
    from ..triton.repository import write_repository

    opts = pop_schedule_options(kwargs)
    schedule = None
    if any(v for v in opts.values()):
        manifest = read_manifest(export, verify=False)
        schedule = schedule_from(opts, manifest.model.num_layers, manifest.schedule, None)
    model_dir = write_repository(export, out, model_name=model_name, max_batch=max_batch, instances=instances,
                                 copy_export=copy_export, force=force, max_queue=max_queue, max_length=max_length,
                                 prefill_chunk=prefill_chunk, threads=threads, backend=backend, schedule=schedule,
                                 log=lambda m: click.echo(m, err=True))
    if instances > 1 and threads is None:
        click.echo(f"note: {instances} instances each run onnxruntime on all cores; give --threads (cores / "
                   "instances) so that they do not contend", err=True)
    what = "a copy of the export" if copy_export else str(export.resolve())
    sched = f"; default schedule: {schedule.describe()}" if schedule is not None else ""
    click.echo(f"wrote {model_dir} ({instances} instance(s) x {max_batch} slots over {what}{sched})")
    click.echo(f"serve it: tritonserver --model-repository={out.resolve()}   "
               f"(or locally: python -m skipdeploy.triton.server {out})")
