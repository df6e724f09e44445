"""``skipdeploy.export``: checkpoint in, a verified export directory out, atomically."""

from __future__ import annotations

import inspect
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import onnx

from .. import __version__
from ..errors import BackendError, CheckpointError, ExportError, SkipDeployError
from ..families import for_model_type
from ..manifest import Manifest, read_manifest, write_manifest
from ..numerics import GRAPH_TOLERANCE
from ..schedule import LayerSchedule, Schedule
from . import check, checkpoint, writer
from .quantize import SCHEMES, quantize_export
from .staging import move_into_place, staging_directory
from .writer import TOKENIZER_FILE

DTYPES = ("float32", "float16")
MIN_OPSET, DEFAULT_OPSET, MAX_OPSET = 17, 17, 23
# The largest batch an export may declare: the manifest's limit, refused up front past it rather than
# written down and failing later (a KV cache of that many rows would not fit any machine anyway).
MAX_BATCH = 4096


def export(model: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
           opset: int = DEFAULT_OPSET, schedule: LayerSchedule | Callable[[int], LayerSchedule] | None = None,
           max_length: int | None = None, max_batch: int = 64, force: bool = False, check_graphs: bool = True,
           tensorrt: bool = False, quantize: str | None = None, progress: bool | None = None,
           log: Callable[[str], None] | None = None) -> Manifest:
    """Export a checkpoint (OPT, Llama, Mistral or Qwen2; a local directory, a hub id, or
    ``gguf:FILE``) to ``out`` and return its manifest.

    ``out`` appears only when every graph is written, checked against PyTorch and listed with
    its sha256 in ``manifest.json``; an interrupted export leaves at most a hidden temporary
    sibling, never a directory the runtime accepts. ``schedule`` (the export's default) may be a
    function of the number of layers, which is known only once the checkpoint is read, or of the
    number of layers and the checkpoint's fine-tuned schedule (None when it has none), so that
    options giving part of a schedule can modify that one.
    ``quantize="int8"``, ``"int4"`` or ``"int8-dynamic"`` writes that quantized export (``quantize_export``) of the
    float32 graphs to ``out`` instead of the float32 export itself. A second export to the same ``out`` while
    this one writes it is refused (ExportError); see ``staging``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    _check_options(dtype, opset, max_batch, quantize, tensorrt)
    out = Path(out).expanduser()
    if out.exists() and not force:  # early, before the slow load; checked again under the lock
        raise ExportError(f"{out} already exists; pass force=True to replace it")

    model = checkpoint.local_source(model, log)  # gguf:FILE -> its converted checkpoint
    spec, hf_model = checkpoint.load_model(model)
    if max_length is None:
        max_length = writer.default_max_length(spec)
    if not 1 <= max_length <= spec.max_positions:
        raise ExportError(f"max length must be between 1 and the model's {spec.max_positions} positions "
                          f"(got {max_length})")
    if spec.sliding_window is not None and max_length > spec.sliding_window:
        raise ExportError(f"the model attends over a sliding window of {spec.sliding_window} positions and the "
                          f"layers attend over every cached one: export with --max-length {spec.sliding_window} "
                          f"or less (got {max_length})")
    schedule = _default_schedule(schedule, spec, hf_model)

    with staging_directory(out, force=force) as tmp:
        family = for_model_type(spec.model_type)
        errors, data = writer.write_graphs(tmp, spec, _ModelWeights(family, hf_model, spec), dtype, opset, progress,
                                           _checker(hf_model, spec, dtype) if check_graphs else None)
        worst = max(errors, key=errors.get) if errors else None
        if worst is not None:
            log(f"checked {len(errors)} graphs against PyTorch: max abs error {errors[worst]:.2e} ({worst})")
            limit = GRAPH_TOLERANCE[dtype]
            bad = {name: err for name, err in errors.items() if err > limit}
            if bad:
                raise ExportError("graphs disagree with PyTorch beyond " + f"{limit:g}: " +
                                  ", ".join(f"{n} ({e:.2e})" for n, e in bad.items()))
        tokenizer = _copy_tokenizer(model, tmp, log)
        write_manifest(tmp, writer.manifest_body(
            tmp, spec, dtype=dtype, opset=opset, schedule=schedule, max_batch=max_batch, max_length=max_length,
            data=data, tokenizer=tokenizer, errors=errors, tools=_tool_versions(), source=str(model)))
        if quantize is not None:  # quantize_export reads (and verifies) the staged float32 export itself
            manifest = quantize_export(tmp, out, weights=quantize, force=force, progress=progress, log=log,
                                       record_source=False)
            shutil.rmtree(tmp, ignore_errors=True)
            return manifest
        manifest = read_manifest(tmp, verify=True)
        move_into_place(tmp, out)
    manifest.directory = out
    if tensorrt:  # the export is complete and valid on its own; engines are cache entries beside it
        from ..engines.tensorrt_build import build_engines

        build_engines(out, log=log)
    return manifest


def _check_options(dtype: str, opset: int, max_batch: int, quantize: str | None, tensorrt: bool) -> None:
    """Refuse bad options before the (slow) checkpoint load."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be between {MIN_OPSET} and {MAX_OPSET} (got {opset})")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
        raise ExportError(f"max_batch must be an integer between 1 and {MAX_BATCH} (got {max_batch!r})")
    if quantize is not None:
        if quantize not in SCHEMES:
            raise ExportError(f"quantize must be one of {', '.join(SCHEMES)} (got {quantize!r})")
        if dtype != "float32":
            raise ExportError(f"{quantize} weights are made from float32 graphs (got dtype {dtype})")
        if tensorrt:
            raise ExportError(f"{quantize} weights are for the CPU; TensorRT engines are built from float exports")
    if tensorrt:
        _require_tensorrt()


def _default_schedule(schedule, spec, hf_model) -> LayerSchedule:
    """The export's default schedule: the one passed (or made from the layer count), else the one a
    `skipdeploy finetune` checkpoint names in config.json (``skipdecode``), else full."""
    stored = getattr(hf_model.config, "skipdecode", None)
    finetuned = LayerSchedule.from_dict(stored["schedule"]) \
        if isinstance(stored, dict) and stored.get("schedule") else None
    if callable(schedule):
        takes_default = len(inspect.signature(schedule).parameters) >= 2
        schedule = schedule(spec.num_layers, finetuned) if takes_default else schedule(spec.num_layers)
    schedule = schedule or finetuned or Schedule.full(spec.num_layers)
    if schedule.num_layers != spec.num_layers:
        raise ExportError(f"the schedule is for {schedule.num_layers} layers, the model has {spec.num_layers}")
    return schedule


def _require_tensorrt() -> None:
    """Fail before exporting, in one line, when TensorRT or a GPU is missing."""
    from ..engines.tensorrt_build import require_tensorrt

    try:
        require_tensorrt()
    except BackendError as exc:
        raise BackendError(f"--tensorrt: {exc}; export without --tensorrt here and run "
                           "`skipdeploy build-engines DIR` on the GPU machine") from None


class _ModelWeights:
    """The family's weights of a transformers model, graph by graph (``writer.Weights``)."""

    def __init__(self, family, hf_model, spec) -> None:
        self.family, self.hf_model, self.spec = family, hf_model, spec

    def embed(self) -> dict:
        return self.family.embed_weights(self.hf_model, self.spec)

    def layer(self, index: int) -> dict:
        return self.family.layer_weights(self.hf_model, index, self.spec)

    def head(self) -> dict:
        return self.family.head_weights(self.hf_model, self.spec)


def _checker(hf_model, spec, dtype: str) -> writer.Check:
    """Each graph against transformers' own module on random inputs (a seed per graph)."""
    seeds = iter(range(1234, 1 << 30))

    def run(job, path: Path) -> float:
        seed = next(seeds)
        if job == "embed":
            return check.check_embed(path, hf_model, spec, seed)
        if job == "head":
            return check.check_head(path, hf_model, spec, dtype, seed)
        return check.check_layer(path, hf_model, job, spec, dtype, seed)

    return run


def _copy_tokenizer(model: str | os.PathLike, tmp: Path, log: Callable[[str], None]) -> str | None:
    """Write ``tokenizer.json`` (what the runtime's ``tokenizers`` reads) when the checkpoint has a tokenizer."""
    try:
        tok = checkpoint.fast_tokenizer(model)
    except CheckpointError as exc:  # a broken or absent tokenizer must not fail the export
        log(f"{exc}: generate with --input-ids")
        return None
    if tok is None:
        log("the checkpoint has no tokenizer: generate with --input-ids")
        return None
    tok.save(str(tmp / TOKENIZER_FILE))
    return TOKENIZER_FILE


def _tool_versions() -> dict[str, str]:
    import numpy
    import onnxruntime
    import torch
    import transformers

    return {"skipdeploy": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__}


__all__ = ["export", "DTYPES", "SkipDeployError"]
