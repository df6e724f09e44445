"""int8 weights for the CPU: an export whose layer and head graphs use dynamically quantized MatMuls.

``quantize_export(SRC, OUT)`` reads a float32 export (no checkpoint needed) and writes a new export
directory whose decoder layers and LM head multiply with int8 weights: onnxruntime's dynamic
quantization replaces each weight MatMul by ``DynamicQuantizeLinear`` (the activations, per call)
+ ``MatMulInteger`` (standard ONNX ops; onnxruntime fuses them into ``DynamicQuantizeMatMul``
and runs u8 x s8 kernels, VNNI where the CPU has it). Weights are quantized per output channel,
symmetric. Attention (query x keys, probabilities x values), LayerNorm, softmax, the KV cache and
the logits stay float32; the embedding graph is copied unchanged.

Weight bytes read per token drop about 4x, which is what bounds decoding at batch 1. The price is
accuracy: the manifest records the error of every quantized graph against its float32 original
on random inputs, and ``skipdeploy bench --quantize int8`` reports token agreement with float32.
The export keeps ``"dtype": "float32"`` (activations and KV cache) and says what was quantized
in its ``"quantization"`` entry; backends that read float weights (the torch reference) refuse it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ExportError
from ..manifest import MANIFEST, Manifest, describe_file, read_manifest, write_manifest
from ..numerics import relative_error
from .staging import move_into_place, staging_directory

SCHEMES = ("int8",)
METHOD = "onnxruntime dynamic quantization (DynamicQuantizeLinear + MatMulInteger), weights int8 per channel"


def quantize_export(source: str | os.PathLike, out: str | os.PathLike, *, weights: str = "int8",
                    per_channel: bool = True, force: bool = False, progress: bool | None = None,
                    log: Callable[[str], None] | None = None, record_source: bool = True) -> Manifest:
    """Write an int8-weight copy of the float32 export ``source`` to ``out`` (atomically) and
    return its manifest. ``record_source=False`` when ``source`` is transient (``export
    --quantize``): the manifest then names no float32 export to verify against. A second export
    to the same ``out`` while this one writes it is refused (ExportError); see ``staging``."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if weights not in SCHEMES:
        raise ExportError(f"weights must be one of {', '.join(SCHEMES)} (got {weights!r})")
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # onnxruntime.quantization needs the onnx package
        raise ExportError(f"quantizing needs onnx ({exc}); pip install 'skipdeploy[export]'") from None
    src = read_manifest(source, verify=True)
    if src.raw.get("quantization"):
        raise ExportError(f"{source} is already quantized ({src.raw['quantization'].get('weights')}); "
                          "quantize the float32 export instead")
    if src.dtype != "float32":
        raise ExportError(f"{source} holds {src.dtype} graphs; int8 quantization starts from a float32 export")
    out = Path(out).expanduser()
    if out.resolve() == src.directory.resolve():
        raise ExportError("the quantized export needs its own directory (--out differs from the source)")
    if out.exists() and not force:  # early; checked again under the lock
        raise ExportError(f"{out} already exists; pass force=True to replace it")

    from tqdm.auto import tqdm

    with staging_directory(out, force=force) as tmp:
        graphs = json.loads(json.dumps(src.graphs))  # a deep copy to edit
        quantized = [g["file"] for g in graphs["layers"]] + [graphs["head"]["file"]]
        errors: dict[str, float] = {}
        bar = tqdm(quantized, desc="quantize", unit="graph", disable=None if progress is None else not progress,
                   file=sys.stderr)
        for name in bar:
            bar.set_postfix_str(name)
            with _quiet_root_logger():  # it suggests pre-processing for every graph
                quantize_dynamic(src.directory / name, tmp / name, weight_type=QuantType.QInt8,
                                 per_channel=per_channel, op_types_to_quantize=["MatMul", "Gemm"],
                                 extra_options={"MatMulConstBOnly": True})
            errors[name] = _graph_error(src, name, src.directory / name, tmp / name)
        bar.close()
        for entry in graphs["layers"] + [graphs["head"]]:
            entry.pop("data", None)  # int8 weights live inside the graph
        kept = {graphs["embed"]["file"], *graphs["embed"].get("data", [])}
        if src.raw.get("tokenizer"):
            kept.add(src.raw["tokenizer"])
        for name in sorted(kept):
            shutil.copy2(src.directory / name, tmp / name)
        worst = max(errors, key=errors.get)
        log(f"quantized {len(errors)} graphs to int8 weights: max error against float32 {errors[worst]:.2e} "
            f"({worst}, relative to the output's scale)")
        data = dict(src.raw)
        data.update({
            "graphs": graphs,
            "files": {p.name: describe_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
            "quantization": {
                "weights": weights, "method": METHOD, "per_channel": per_channel, "graphs": quantized,
                "max_error_vs_float": errors,
                **({"source": str(src.directory.resolve()),
                    "source_manifest_sha256": describe_file(src.directory / MANIFEST)["sha256"]}
                   if record_source else {"source": None}),
            },
            "tools": {**src.tools, "onnxruntime": _ort_version()},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        write_manifest(tmp, data)
        manifest = read_manifest(tmp, verify=True)
        move_into_place(tmp, out)
    manifest.directory = out
    return manifest


def is_quantized_from(quantized: Manifest, source: Manifest) -> bool:
    """Whether ``quantized`` was made from ``source`` as it is now (its manifest unchanged)."""
    recorded = (quantized.quantization or {}).get("source_manifest_sha256")
    return recorded is not None and recorded == describe_file(source.directory / MANIFEST)["sha256"]


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _graph_error(manifest: Manifest, name: str, reference: Path, quantized: Path, seed: int = 0) -> float:
    """Max abs difference of the quantized graph's outputs from the float graph's, on random
    inputs (B=2, T=2, P=3 for layers), relative to the reference output's scale when above 1."""
    import onnxruntime as ort

    spec = manifest.model
    rng = np.random.default_rng(seed)
    B, T, P = 2, 2, 3
    if name == manifest.graphs["head"]["file"]:
        feeds = {"hidden": rng.standard_normal((B, spec.hidden_size)).astype(np.float32)}
    else:
        shape = (P, B, spec.kv_heads, spec.head_dim)
        feeds = {"hidden": rng.standard_normal((B, T, spec.hidden_size)).astype(np.float32),
                 "past_key": rng.standard_normal(shape).astype(np.float32),
                 "past_value": rng.standard_normal(shape).astype(np.float32),
                 "attention_bias": np.zeros((B, P + T), np.float32)}
        if manifest.layers_take_positions:
            feeds["position_ids"] = np.arange(P, P + T, dtype=np.int64)[None].repeat(B, 0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    want = ort.InferenceSession(str(reference), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    return max(relative_error(g, w) for g, w in zip(got, want))


__all__ = ["quantize_export", "is_quantized_from", "SCHEMES"]
