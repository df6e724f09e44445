"""Quantized weights for the CPU: an export whose layer and head graphs multiply with int8 or int4 weights.

``quantize_export(SRC, OUT, weights=...)`` reads a float32 export (no checkpoint needed) and
writes a new export directory whose decoder layers and LM head multiply with quantized weights.
Attention (query x keys, probabilities x values), LayerNorm, softmax, the KV cache and the logits
stay float32; the embedding graph (and ``embeddings.bin``) is copied unchanged. The export keeps
``"dtype": "float32"`` (activations and KV cache) and says what was quantized in its
``"quantization"`` entry; backends that read float weights (the torch reference) refuse it.

Three schemes (``SCHEMES``):
- ``int8`` and ``int4``: weight-only, onnxruntime's ``MatMulNBits`` (``nbits.py`` writes it; the
  format below): weights in blocks along K, each with its own scale, 8 or 4 bits; with
  ``accuracy_level`` 4 the kernel rounds activations to int8 per row and block, so a row's
  numbers never depend on the other rows of its call.
- ``int8-dynamic`` (what ``int8`` meant before issue 18): onnxruntime's dynamic quantization
  replaces each weight MatMul by ``DynamicQuantizeLinear`` (the activations, one scale per call
  over all its rows) + ``MatMulInteger`` (standard ONNX ops; onnxruntime fuses them into
  ``DynamicQuantizeMatMul``, u8 x s8 kernels, VNNI where the CPU has it). Weights per output
  channel (or per tensor), symmetric. A little faster than ``int8``, much less accurate (its
  single activation scale), and a row's tokens depend on what shares its batch.

The MatMulNBits graph format (``int4``, ``int8``), exactly:
- every ``Gemm``/``MatMul`` whose B input is a 2-D float32 initializer W (layers: ``qkv.weight``,
  ``out_proj.weight``, the MLP matrices (``fc1.weight``/``fc2.weight``, Llama's gate/up/down);
  head: ``lm_head.weight``; the family's ``LAYER_WEIGHTS``/``HEAD_WEIGHTS``: another constant
  matrix, such as Llama's ``rope.rotate_half``, stays a float ``MatMul``, in every scheme)
  becomes ONE node ``MatMulNBits`` (domain ``com.microsoft``; the model imports opset
  ``com.microsoft`` 1), named ``<node>_Q4`` (int4) or ``<node>_Q8`` (int8), writing the original
  node's output;
- its logical weight is [K, N] = W as the graph multiplies by it: the layers' Gemm B as stored
  ([in, out]); the head's ``lm_head.weight`` [V, E] (Gemm ``transB=1``) transposed, K=E, N=V;
- inputs: ``A``, ``<W>_Q4`` (uint8 [N, ceil(K/bs), bs/2]: 4-bit values, two per byte, low nibble
  first) or ``<W>_Q8`` (uint8 [N, ceil(K/bs), bs]: one value per byte), blocks of ``bs`` along K,
  K zero-padded to whole blocks; ``<W>_scales`` (float32 [N, ceil(K/bs)]), then zero points:
  omitted when symmetric (the default: value = (q - 8) x scale for int4, (q - 128) x scale for
  int8), else ``<W>_zero_points`` (uint8 [N, ceil(ceil(K/bs)/2)], two per byte, for int4;
  [N, ceil(K/bs)] for int8); input 4 (g_idx) empty; input 5 the Gemm's bias initializer under its
  own name (``qkv.bias``, ...), [N], unchanged float32, when the Gemm has one (a bias of another
  shape becomes an ``Add`` after the node);
- attributes ``K``, ``N``, ``bits`` (4 or 8), ``block_size`` and ``accuracy_level`` (left out
  when 0; 4 = int8 activations inside the kernel) as recorded in the manifest's
  ``"quantization"`` entry (``bits``, ``block_size``, ``accuracy_level``, ``symmetric``);
- the float W initializers are gone from the graph; the head holds its own quantized copy, so
  its manifest entry lists no ``"data"`` (``embed.onnx`` still reads ``embeddings.bin``).
``nbits.dequantize`` turns the three tensors back into W [K, N].

Weight bytes read per token drop about 3.5-4x (int8, int8-dynamic) or 6-7x (int4, with its
scales), which is what bounds decoding at batch 1. The price is accuracy: the manifest records the error of every
quantized graph against its float32 original on random inputs, and ``skipdeploy bench
--quantize int8`` reports token agreement with float32.
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
from ..families import for_model_type
from ..manifest import MANIFEST, Manifest, describe_file, read_manifest, write_manifest
from ..numerics import relative_error
from .nbits import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, check_options, quantize_graph
from .staging import move_into_place, staging_directory

SCHEMES = ("int8", "int4", "int8-dynamic")
BITS = {"int8": 8, "int4": 4}  # the MatMulNBits schemes
METHODS = {
    "int8": "onnxruntime MatMulNBits (com.microsoft), weights int8 in blocks along K, round to nearest",
    "int4": "onnxruntime MatMulNBits (com.microsoft), weights int4 in blocks along K, round to nearest",
    "int8-dynamic": "onnxruntime dynamic quantization (DynamicQuantizeLinear + MatMulInteger), weights int8 per "
                    "channel",
}
METHOD = METHODS["int8-dynamic"]  # the name this module exported before int4: the dynamic method


def quantize_export(source: str | os.PathLike, out: str | os.PathLike, *, weights: str = "int8",
                    per_channel: bool = True, block_size: int | None = None, accuracy_level: int | None = None,
                    symmetric: bool | None = None, force: bool = False, progress: bool | None = None,
                    log: Callable[[str], None] | None = None, record_source: bool = True) -> Manifest:
    """Write a copy of the float32 export ``source`` with ``weights`` (one of ``SCHEMES``) layer
    and head matrices to ``out`` (atomically) and return its manifest. int8 and int4:
    ``block_size``, ``accuracy_level`` (defaults chosen by tools/int4_choice.py) and
    ``symmetric`` (default True); int8-dynamic: ``per_channel`` (False: one scale per matrix).
    ``record_source=False`` when ``source`` is transient (``export --weights``): the manifest
    then names no float32 export to verify against. A second export to the same ``out`` while
    this one writes it is refused (ExportError); see ``staging``."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    options = _check_options(weights, per_channel, block_size, accuracy_level, symmetric)
    try:
        import onnx  # noqa: F401  (both schemes rewrite graphs with it)
        if weights == "int8-dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # onnxruntime.quantization needs the onnx package
        raise ExportError(f"quantizing needs onnx ({exc}); pip install 'skipdeploy[export]'") from None
    src = read_manifest(source, verify=True)
    if src.raw.get("quantization"):
        raise ExportError(f"{source} is already quantized ({src.raw['quantization'].get('weights')}); "
                          "quantize the float32 export instead")
    if src.dtype != "float32":
        raise ExportError(f"{source} holds {src.dtype} graphs; {weights} quantization starts from a float32 export")
    out = Path(out).expanduser()
    if out.resolve() == src.directory.resolve():
        raise ExportError("the quantized export needs its own directory (--out differs from the source)")
    if out.exists() and not force:  # early; checked again under the lock
        raise ExportError(f"{out} already exists; pass force=True to replace it")

    from tqdm.auto import tqdm

    with staging_directory(out, force=force) as tmp:
        graphs = json.loads(json.dumps(src.graphs))  # a deep copy to edit
        entries = graphs["layers"] + [graphs["head"]]
        quantized = [g["file"] for g in entries]
        errors: dict[str, float] = {}
        bar = tqdm(quantized, desc="quantize", unit="graph", disable=None if progress is None else not progress,
                   file=sys.stderr)
        family = for_model_type(src.model.model_type)
        for name in bar:
            bar.set_postfix_str(name)
            names = family.HEAD_WEIGHTS if name == graphs["head"]["file"] else family.LAYER_WEIGHTS
            if weights in BITS:
                quantize_graph(src.directory / name, tmp / name, options["bits"], options["block_size"],
                               options["accuracy_level"], options["symmetric"], names)
            else:
                with _quiet_root_logger():  # it suggests pre-processing for every graph
                    quantize_dynamic(src.directory / name, tmp / name, weight_type=QuantType.QInt8,
                                     per_channel=per_channel, op_types_to_quantize=["MatMul", "Gemm"],
                                     nodes_to_exclude=_constant_matrices_besides(src.directory / name, names),
                                     extra_options={"MatMulConstBOnly": True})
            errors[name] = _graph_error(src, name, src.directory / name, tmp / name)
        bar.close()
        # The float bytes a quantized graph replaces include its external data (the head's tied matrix).
        float_bytes = sum((src.directory / n).stat().st_size for g in entries for n in [g["file"], *g.get("data", [])])
        for entry in entries:
            entry.pop("data", None)  # quantized weights live inside the graph
        kept = {graphs["embed"]["file"], *graphs["embed"].get("data", [])}
        if src.raw.get("tokenizer"):
            kept.add(src.raw["tokenizer"])
        for name in sorted(kept):
            shutil.copy2(src.directory / name, tmp / name)
        worst = max(errors, key=errors.get)
        log(f"quantized {len(errors)} graphs to {weights} weights: max error against float32 {errors[worst]:.2e} "
            f"({worst}, relative to the output's scale)")
        data = dict(src.raw)
        data.update({
            "graphs": graphs,
            "files": {p.name: describe_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
            "quantization": {
                "weights": weights, "method": METHODS[weights], **options, "graphs": quantized,
                "max_error_vs_float": errors,
                "weight_bytes": {"float32": float_bytes, weights: sum((tmp / n).stat().st_size for n in quantized)},
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


def _check_options(weights: str, per_channel: bool, block_size: int | None, accuracy_level: int | None,
                   symmetric: bool | None) -> dict:
    """The scheme's options as the manifest records them; the other schemes' refused."""
    if weights not in SCHEMES:
        raise ExportError(f"weights must be one of {', '.join(SCHEMES)} (got {weights!r})")
    if weights == "int8-dynamic":
        given = [n for n, v in (("block_size", block_size), ("accuracy_level", accuracy_level),
                                ("symmetric", symmetric)) if v is not None]
        if given:
            raise ExportError(f"{', '.join(given)} are int8/int4 options; int8-dynamic weights take per_channel only")
        return {"per_channel": per_channel}
    if not per_channel:
        raise ExportError(f"per-tensor scales are an int8-dynamic option; {weights} weights have one scale per block")
    options = {"bits": BITS[weights], "block_size": DEFAULT_BLOCK_SIZE if block_size is None else block_size,
               "accuracy_level": DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level,
               "symmetric": True if symmetric is None else bool(symmetric)}
    check_options(options["bits"], options["block_size"], options["accuracy_level"])
    return options


def scheme_of(quantization: dict | None) -> str | None:
    """The scheme of a manifest's ``"quantization"`` entry; an ``"int8"`` entry written before
    issue 18 (no ``bits``, ``per_channel`` recorded) is the dynamic scheme it was then."""
    if not quantization:
        return None
    weights = quantization.get("weights")
    if weights == "int8" and "bits" not in quantization and "block_size" not in quantization:
        return "int8-dynamic"
    return weights


def _constant_matrices_besides(path: Path, names: tuple[str, ...]) -> list[str]:
    """The nodes multiplying by a constant matrix other than the family's weights (RoPE's signed
    permutation): exact in float32, so left unquantized."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in inits and n.input[1] not in names]


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


__all__ = ["quantize_export", "is_quantized_from", "scheme_of", "SCHEMES", "METHODS"]
