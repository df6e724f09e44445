"""Graphs for in-flight batching: each decoder layer split around its attention.

A decode iteration of the in-flight engine runs every layer on the rows that need it, and those
rows sit at different lengths in their own cache slots. The weight-heavy parts of a layer run on
all of its rows at once; the attention runs over each row's own keys:

- ``layer_in`` (per layer): ``hidden`` [N, E] -> ``query``, ``key``, ``value`` [N, E];
- ``slot_attention`` (one graph, no weights): onnxruntime's ``GroupQueryAttention`` over a slot
  cache ``past_key``/``past_value`` [B, H, C, D] (BNSH: each row's slot is contiguous, so any run
  of consecutive slots binds in place) with ``seqlens_k`` [B] (cached + new positions - 1 per
  row) and ``total_sequence_length``; it writes the new keys and values into the same buffer
  (``present_*`` bound to the past's memory) and returns ``context`` [B, S, E];
- ``layer_out`` (per layer): ``hidden`` [N, E] (the residual) and ``context`` [N, E] ->
  ``hidden_out`` [N, E].

They are built in memory from the weights of an export's layer graphs (the same math as
``graphs.build_layer``, which composes the same ``layer_input`` and ``layer_output``), so every
float export serves in-flight without re-exporting.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import BackendError
from ..manifest import ModelSpec
from .graphs import _ONNX_DTYPE, _Builder, _value, _weights_of, layer_input, layer_output

LAYER_WEIGHTS = ("ln_attn.weight", "ln_attn.bias", "qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias",
                 "ln_ffn.weight", "ln_ffn.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def read_layer_weights(path: str | Path) -> dict[str, np.ndarray | None]:
    """The named weights of an exported layer graph (``graphs.build_layer``'s initializers)."""
    model = onnx.load(str(path))
    found = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer if init.name in LAYER_WEIGHTS}
    if "qkv.weight" not in found or "fc1.weight" not in found:
        raise BackendError(f"{path} holds no float layer weights (an int8 export?): in-flight batching runs "
                           "float32 exports; serve the float32 export it was quantized from")
    return {name: found.get(name) for name in LAYER_WEIGHTS}


def build_layer_in(spec: ModelSpec, w: dict, dtype: str, opset: int) -> onnx.ModelProto:
    b = _Builder(dtype)
    q, k, v = layer_input(b, spec, _weights_of(b, w), "hidden")
    for name, out in (("query", q), ("key", k), ("value", v)):
        b.op("Identity", [out], [name])
    dt, E = _ONNX_DTYPE[dtype], spec.hidden_size
    return b.model("layer_in", [_value("hidden", dt, ["rows", E])],
                   [_value(n, dt, ["rows", E]) for n in ("query", "key", "value")], opset)


def build_layer_out(spec: ModelSpec, w: dict, dtype: str, opset: int) -> onnx.ModelProto:
    b = _Builder(dtype)
    b.op("Identity", [layer_output(b, spec, _weights_of(b, w), "hidden", "context")], ["hidden_out"])
    dt, E = _ONNX_DTYPE[dtype], spec.hidden_size
    return b.model("layer_out", [_value("hidden", dt, ["rows", E]), _value("context", dt, ["rows", E])],
                   [_value("hidden_out", dt, ["rows", E])], opset)


def build_slot_attention(spec: ModelSpec, dtype: str, opset: int) -> onnx.ModelProto:
    """Causal attention of S new positions per row over its slot (scale 1: the query scaling is
    folded into the layer's ``qkv.weight``)."""
    b = _Builder(dtype)
    H, D, E = spec.num_heads, spec.head_dim, spec.hidden_size
    b.nodes.append(onnx.helper.make_node(
        "GroupQueryAttention", ["query", "key", "value", "past_key", "past_value", "seqlens_k",
                                "total_sequence_length"], ["context", "present_key", "present_value"],
        domain="com.microsoft", num_heads=H, kv_num_heads=H, scale=1.0, name="attention"))
    dt = _ONNX_DTYPE[dtype]
    rows = [_value(n, dt, ["batch", "new_tokens", E]) for n in ("query", "key", "value")]
    cache = [_value(n, dt, ["batch", H, "capacity", D]) for n in ("past_key", "past_value")]
    lengths = [_value("seqlens_k", TensorProto.INT32, ["batch"]), _value("total_sequence_length", TensorProto.INT32, [])]
    outputs = [_value("context", dt, ["batch", "new_tokens", E]),
               *[_value(n, dt, ["batch", H, "capacity", D]) for n in ("present_key", "present_value")]]
    return b.model("slot_attention", rows + cache + lengths, outputs, opset, domains={"com.microsoft": 1})
