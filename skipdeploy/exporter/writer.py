"""Writing an export's graphs and manifest from numpy weights: the exporter's torch-free half.

``export`` feeds it the family's weights of a transformers model and checks each graph against
PyTorch as it is written; a torch-free caller (the tests of an install without torch) feeds it
numpy weights of the same names and layouts and no check. Either way the files, the shared
embedding and the manifest fields are the ones written here.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Callable, Protocol

import onnx
from onnx import external_data_helper

from ..errors import ExportError
from ..manifest import FORMAT_VERSION, HEAD_IO, KV_CONTRACT, KV_LAYOUT, describe_file, model_spec_dict
from ..numerics import GRAPH_TOLERANCE
from ..schedule import LayerSchedule
from . import graphs

# Past this many bytes of weights a graph keeps them in a side file (protobuf caps files at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
TOKENIZER_FILE = "tokenizer.json"
# The token-embedding matrix, stored once as ONNX external data that embed.onnx and (when the LM
# head is tied to it, as in OPT) head.onnx both reference: the runtime then holds it once.
SHARED_EMBEDDINGS = "embeddings.bin"


class Weights(Protocol):
    """Where the graphs' weights come from (named and laid out as the families' ``*_weights``)."""

    def embed(self) -> dict: ...

    def layer(self, index: int) -> dict: ...

    def head(self) -> dict: ...


# (job, path) -> the graph's max abs error against a reference; job is "embed", "head" or a layer index
Check = Callable[[object, Path], float]


def layer_file(index: int) -> str:
    return f"layer_{index:02d}.onnx"


def write_graphs(tmp: Path, spec, weights: Weights, dtype: str, opset: int, progress: bool | None,
                 check: Check | None = None) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Every graph of ``spec`` into ``tmp``: (max abs error per checked graph, the external data
    files each graph reads)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a progress bar is optional (GPU images may lack tqdm)
        def tqdm(items, **_):
            return _NoBar(items)

    jobs = [("embed", "embed.onnx"), *((i, layer_file(i)) for i in range(spec.num_layers)), ("head", "head.onnx")]
    errors: dict[str, float] = {}
    data: dict[str, list[str]] = {}
    bar = tqdm(jobs, desc="export", unit="graph", disable=None if progress is None else not progress,
               file=sys.stderr)
    for job, filename in bar:
        bar.set_postfix_str(filename)
        path = tmp / filename
        if job == "embed":
            proto, kind = graphs.build_embed(spec, weights.embed(), dtype, opset), "embed"
        elif job == "head":
            proto, kind = graphs.build_head(spec, weights.head(), dtype, opset), "head"
        else:
            proto, kind = graphs.build_layer(spec, weights.layer(job), dtype, opset, name=f"layer_{job:02d}"), "layer"
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
        if files:
            data[filename] = files
        if check is not None:
            errors[filename] = check(job, path)
    bar.close()
    return errors, data


def manifest_body(tmp: Path, spec, *, dtype: str, opset: int, schedule: LayerSchedule, max_batch: int,
                  max_length: int, data: dict[str, list[str]], tokenizer: str | None, errors: dict[str, float],
                  tools: dict[str, str], source: str) -> dict:
    """The manifest of the files now in ``tmp`` (written last, by ``write_manifest``)."""
    def entry(filename: str, io: dict) -> dict:
        return {"file": filename, **io, **({"data": data[filename]} if data.get(filename) else {})}

    return {
        "format_version": FORMAT_VERSION,
        "model_type": spec.model_type,
        "model": model_spec_dict(spec),
        "dtype": dtype,
        "opset": opset,
        "kv_contract": KV_CONTRACT,
        "kv_layout": KV_LAYOUT,
        "schedule": schedule.to_dict(),
        "limits": {"max_batch": max_batch, "max_length": max_length},
        "graphs": {"embed": entry("embed.onnx", graphs.embed_io(spec)),
                   "layers": [entry(layer_file(i), graphs.layer_io(spec)) for i in range(spec.num_layers)],
                   "head": entry("head.onnx", HEAD_IO)},
        "tokenizer": tokenizer,
        "files": {p.name: describe_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        "check": {"tolerance": GRAPH_TOLERANCE[dtype], "max_abs_error": errors},
        "tools": tools,
        "source": source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def default_max_length(spec) -> int:
    return min(spec.max_positions, spec.sliding_window or spec.max_positions)


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
