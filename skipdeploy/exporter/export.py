"""``skipdeploy.export``: checkpoint in, a verified export directory out, atomically."""

from __future__ import annotations

import datetime
import inspect
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import onnx
from onnx import external_data_helper

from .. import __version__
from ..errors import BackendError, CheckpointError, ExportError, SkipDeployError
from ..families import for_model_type
from ..manifest import (FORMAT_VERSION, HEAD_IO, KV_CONTRACT, KV_LAYOUT, Manifest, describe_file, model_spec_dict,
                        read_manifest, write_manifest)
from ..numerics import GRAPH_TOLERANCE
from ..schedule import LayerSchedule, Schedule
from . import check, checkpoint, graphs
from .quantize import SCHEMES, quantize_export
from .staging import move_into_place, staging_directory

DTYPES = ("float32", "float16")
MIN_OPSET, DEFAULT_OPSET, MAX_OPSET = 17, 17, 23
# Past this many bytes of weights a graph keeps them in a side file (protobuf caps files at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
TOKENIZER_FILE = "tokenizer.json"
# The token-embedding matrix, stored once as ONNX external data that embed.onnx and (when the LM
# head is tied to it, as in OPT) head.onnx both reference: the runtime then holds it once.
SHARED_EMBEDDINGS = "embeddings.bin"


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
    ``quantize="int8"`` writes the int8-weight export (``quantize_export``) of the float32 graphs
    to ``out`` instead of the float32 export itself. A second export to the same ``out`` while
    this one writes it is refused (ExportError); see ``staging``.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    _check_options(dtype, opset, max_batch, quantize, tensorrt)
    out = Path(out).expanduser()
    if out.exists() and not force:  # early, before the slow load; checked again under the lock
        raise ExportError(f"{out} already exists; pass --force (force=True) to replace it")

    model = checkpoint.local_source(model, log)  # gguf:FILE -> its converted checkpoint
    spec, hf_model = checkpoint.load_model(model)
    if max_length is None:
        max_length = min(spec.max_positions, spec.sliding_window or spec.max_positions)
    if not 1 <= max_length <= spec.max_positions:
        raise ExportError(f"max length must be between 1 and the model's {spec.max_positions} positions "
                          f"(got {max_length})")
    if spec.sliding_window is not None and max_length > spec.sliding_window:
        raise ExportError(f"the model attends over a sliding window of {spec.sliding_window} positions and the "
                          f"layers attend over every cached one: export with --max-length {spec.sliding_window} "
                          f"or less (got {max_length})")
    schedule = _default_schedule(schedule, spec, hf_model)

    with staging_directory(out, force=force) as tmp:
        data: dict[str, list[str]] = {}  # graph file -> the external data files it reads
        errors = _write_graphs(tmp, spec, hf_model, dtype, opset, check_graphs, progress, data)
        worst = max(errors, key=errors.get) if errors else None
        if worst is not None:
            log(f"checked {len(errors)} graphs against PyTorch: max abs error {errors[worst]:.2e} ({worst})")
            limit = GRAPH_TOLERANCE[dtype]
            bad = {name: err for name, err in errors.items() if err > limit}
            if bad:
                raise ExportError("graphs disagree with PyTorch beyond " + f"{limit:g}: " +
                                  ", ".join(f"{n} ({e:.2e})" for n, e in bad.items()))
        tokenizer = _copy_tokenizer(model, tmp, log)
        files = {p.name: describe_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_manifest(tmp, {
            "format_version": FORMAT_VERSION,
            "model_type": spec.model_type,
            "model": model_spec_dict(spec),
            "dtype": dtype,
            "opset": opset,
            "kv_contract": KV_CONTRACT,
            "kv_layout": KV_LAYOUT,
            "schedule": schedule.to_dict(),
            "limits": {"max_batch": max_batch, "max_length": max_length},
            "graphs": {"embed": _graph_entry("embed.onnx", graphs.embed_io(spec), data),
                       "layers": [_graph_entry(_layer_file(i), graphs.layer_io(spec), data)
                                  for i in range(spec.num_layers)],
                       "head": _graph_entry("head.onnx", HEAD_IO, data)},
            "tokenizer": tokenizer,
            "files": files,
            "check": {"tolerance": GRAPH_TOLERANCE[dtype], "max_abs_error": errors},
            "tools": _tool_versions(),
            "source": str(model),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
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
    if max_batch < 1:
        raise ExportError(f"max batch must be >= 1 (got {max_batch})")
    if quantize is not None:
        if quantize not in SCHEMES:
            raise ExportError(f"quantize must be one of {', '.join(SCHEMES)} (got {quantize!r})")
        if dtype != "float32":
            raise ExportError(f"int8 quantization starts from float32 graphs (got --dtype {dtype})")
        if tensorrt:
            raise ExportError("--quantize int8 is for the CPU; TensorRT engines are built from float exports")
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


def _layer_file(index: int) -> str:
    return f"layer_{index:02d}.onnx"


def _graph_entry(filename: str, io: dict, data: dict[str, list[str]]) -> dict:
    entry = {"file": filename, **io}
    if data.get(filename):
        entry["data"] = data[filename]
    return entry


def _write_graphs(tmp: Path, spec, hf_model, dtype: str, opset: int, check_graphs: bool,
                  progress: bool | None, data: dict[str, list[str]] | None = None) -> dict[str, float]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a progress bar is optional (GPU images may lack tqdm)
        def tqdm(items, **_):
            return _NoBar(items)

    family = for_model_type(spec.model_type)
    jobs = [("embed", "embed.onnx"), *((i, _layer_file(i)) for i in range(spec.num_layers)), ("head", "head.onnx")]
    errors: dict[str, float] = {}
    bar = tqdm(jobs, desc="export", unit="graph", disable=None if progress is None else not progress,
               file=sys.stderr)
    for job, filename in bar:
        bar.set_postfix_str(filename)
        path = tmp / filename
        if job == "embed":
            proto, kind = graphs.build_embed(spec, family.embed_weights(hf_model, spec), dtype, opset), "embed"
        elif job == "head":
            proto, kind = graphs.build_head(spec, family.head_weights(hf_model, spec), dtype, opset), "head"
        else:
            proto = graphs.build_layer(spec, family.layer_weights(hf_model, job, spec), dtype, opset,
                                       name=f"layer_{job:02d}")
            kind = "layer"
        frozen = graphs.check_symbolic_dims(proto, kind)
        if frozen:
            raise ExportError(f"{filename}: dimensions frozen to a number: {', '.join(frozen)}")
        files = []
        if job in ("embed", "head") and _share_embeddings(
                proto, tmp, "embed_tokens.weight" if job == "embed" else "lm_head.weight"):
            files.append(SHARED_EMBEDDINGS)
        _save(proto, path)
        if (tmp / (filename + ".data")).is_file():  # a graph over 1 GiB keeps its weights aside
            files.append(filename + ".data")
        if data is not None and files:
            data[filename] = files
        if check_graphs:
            seed = 1234 + len(errors)
            if job == "embed":
                errors[filename] = check.check_embed(path, hf_model, spec, seed)
            elif job == "head":
                errors[filename] = check.check_head(path, hf_model, spec, dtype, seed)
            else:
                errors[filename] = check.check_layer(path, hf_model, job, spec, dtype, seed)
    bar.close()
    return errors


def _share_embeddings(proto: onnx.ModelProto, tmp: Path, name: str) -> bool:
    """Move the token-embedding matrix into ``embeddings.bin`` (written with the embed graph) and
    point the head's matrix at the same bytes when they are identical (a tied head).

    onnxruntime maps external data instead of copying it, so the embedding costs only the rows
    it gathers, and a tied model keeps one copy of its largest matrix instead of two.
    """
    tensor = next((t for t in proto.graph.initializer if t.name == name), None)
    if tensor is None or not tensor.HasField("raw_data"):
        return False
    data, path = tensor.raw_data, tmp / SHARED_EMBEDDINGS
    if name == "embed_tokens.weight":
        path.write_bytes(data)
    elif not path.is_file() or path.stat().st_size != len(data) or path.read_bytes() != data:
        return False  # an untied head keeps its own matrix inside head.onnx
    external_data_helper.set_external_data(tensor, SHARED_EMBEDDINGS, offset=0, length=len(data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    return True


class _NoBar(list):
    def set_postfix_str(self, *_):
        pass

    def close(self):
        pass


def _save(proto: onnx.ModelProto, path: Path) -> None:
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


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
