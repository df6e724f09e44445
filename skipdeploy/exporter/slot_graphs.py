"""Graphs for in-flight batching: each decoder layer split around its attention.

A decode iteration of the in-flight engine runs every layer on the rows that need it, and those
rows sit at different lengths in their own cache slots. The weight-heavy parts of a layer run on
all of its rows at once; the attention runs over each row's own keys:

- ``layer_in`` (per layer): ``hidden`` [N, E] (and ``position_ids`` [N] for RoPE families) ->
  ``query`` [N, H*D], ``key``, ``value`` [N, Hkv*D];
- ``slot_attention`` (one graph, no weights): onnxruntime's ``GroupQueryAttention`` over a slot
  cache ``past_key``/``past_value`` [B, Hkv, C, D] (BNSH: each row's slot is contiguous, so any run
  of consecutive slots binds in place) with ``seqlens_k`` [B] (cached + new positions - 1 per
  row) and ``total_sequence_length``; it writes the new keys and values into the same buffer
  (``present_*`` bound to the past's memory) and returns ``context`` [B, S, H*D];
- ``layer_out`` (per layer): ``hidden`` [N, E] (the residual) and ``context`` [N, H*D] ->
  ``hidden_out`` [N, E].

``layer_in`` and ``layer_out`` are cut out of the export's own layer graph (``cut_layer``) at the
tensors ``graphs.LAYER_CUT`` names: the same nodes the static path runs, so whatever the layer
holds (float ``Gemm``, int8 ``MatMulInteger``, int4 ``MatMulNBits``, ...) comes along unchanged and
every weight scheme serves in-flight with no code of its own. Exports written before those names
existed hold none of them; their float layers are rebuilt from their weights instead
(``build_layer_in``/``build_layer_out`` over ``families.weights.read_layer_weights``: the family's
same ``layer_input`` and ``layer_output``, so the same math).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from ..families import for_model_type
from ..manifest import ModelSpec
from .graphs import LAYER_CUT
from .onnx_builder import ONNX_DTYPE, Builder, value_info, weights_of


def cut_layer(layer: onnx.ModelProto, spec: ModelSpec, dtype: str) -> tuple[onnx.ModelProto, onnx.ModelProto] | None:
    """``layer_in`` and ``layer_out`` cut out of an export's layer graph, or None when the graph
    does not name the cut's tensors (an export from before ``LAYER_CUT``)."""
    dt, E = ONNX_DTYPE[dtype], spec.hidden_size
    rope = for_model_type(spec.model_type).rope
    rows_in = [value_info("hidden", dt, ["rows", E])]
    if rope:
        rows_in.append(value_info("position_ids", TensorProto.INT64, ["rows"]))
    layer_in = _cut(layer, "layer_in", rows_in,
                    [value_info("query", dt, ["rows", spec.attention_dim]),
                     value_info("key", dt, ["rows", spec.kv_dim]), value_info("value", dt, ["rows", spec.kv_dim])])
    layer_out = _cut(layer, "layer_out", [value_info("hidden", dt, ["rows", E]),
                                          value_info("context", dt, ["rows", spec.attention_dim])],
                     [value_info("hidden_out", dt, ["rows", E])])
    return None if layer_in is None or layer_out is None else (layer_in, layer_out)


def _cut(layer: onnx.ModelProto, name: str, inputs: list, outputs: list) -> onnx.ModelProto | None:
    """The nodes of ``layer`` that compute the cut tensors of ``outputs`` from those of ``inputs``
    (and initializers), renamed to the I/O names; None when that is not a closed subgraph (names
    missing, or a node reaching past the cut to the graph's own inputs)."""
    rename = {LAYER_CUT[v.name]: v.name for v in inputs + outputs}
    graph = layer.graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    sources = {LAYER_CUT[v.name] for v in inputs}
    nodes, weights, todo, seen = set(), set(), [LAYER_CUT[v.name] for v in outputs], set()
    while todo:
        tensor = todo.pop()
        if tensor in seen or tensor in sources or tensor == "":  # "": an optional input left out
            continue
        seen.add(tensor)
        if tensor in initializers:
            weights.add(tensor)
        elif tensor in producer:
            node = producer[tensor]
            if id(node) not in nodes:
                nodes.add(id(node))
                todo.extend(node.input)
        else:  # a graph input (the layer's own "hidden", "past_key", ...) or a name that is absent
            return None
    if any(s not in producer for s in sources):
        return None
    kept = []
    for node in graph.node:  # the layer graph's own order, which is topological
        if id(node) in nodes:
            if set(node.output) & set(rename.values()):  # a kept tensor already has an I/O name
                return None
            node = onnx.NodeProto.FromString(node.SerializeToString())
            for values in (node.input, node.output):
                values[:] = [rename.get(n, n) for n in values]
            kept.append(node)
    cut = onnx.helper.make_graph(kept, name, inputs, outputs, [initializers[w] for w in sorted(weights)])
    model = onnx.helper.make_model(cut, opset_imports=list(layer.opset_import), producer_name="skipdeploy")
    model.ir_version = layer.ir_version
    return model


def build_layer_in(spec: ModelSpec, w: dict, dtype: str, opset: int) -> onnx.ModelProto:
    family = for_model_type(spec.model_type)
    b = Builder(dtype, opset)
    q, k, v = family.layer_input(b, spec, weights_of(b, w, family.FP32_PREFIXES), "hidden",
                                 "position_ids" if family.rope else None)
    for name, out in (("query", q), ("key", k), ("value", v)):
        b.op("Identity", [out], [name])
    dt, E = ONNX_DTYPE[dtype], spec.hidden_size
    inputs = [value_info("hidden", dt, ["rows", E])]
    if family.rope:
        inputs.append(value_info("position_ids", TensorProto.INT64, ["rows"]))
    return b.model("layer_in", inputs, [value_info("query", dt, ["rows", spec.attention_dim]),
                                        value_info("key", dt, ["rows", spec.kv_dim]),
                                        value_info("value", dt, ["rows", spec.kv_dim])], opset)


def build_layer_out(spec: ModelSpec, w: dict, dtype: str, opset: int) -> onnx.ModelProto:
    family = for_model_type(spec.model_type)
    b = Builder(dtype, opset)
    b.op("Identity", [family.layer_output(b, spec, weights_of(b, w, family.FP32_PREFIXES), "hidden", "context")],
         ["hidden_out"])
    dt, E = ONNX_DTYPE[dtype], spec.hidden_size
    return b.model("layer_out", [value_info("hidden", dt, ["rows", E]),
                                 value_info("context", dt, ["rows", spec.attention_dim])],
                   [value_info("hidden_out", dt, ["rows", E])], opset)


def build_slot_attention(spec: ModelSpec, dtype: str, opset: int) -> onnx.ModelProto:
    """Causal attention of S new positions per row over its slot (scale 1: the query scaling is
    folded into the layer's ``qkv.weight``; RoPE was applied by ``layer_in``)."""
    b = Builder(dtype, opset)
    H, Hkv, D = spec.num_heads, spec.kv_heads, spec.head_dim
    b.nodes.append(onnx.helper.make_node(
        "GroupQueryAttention", ["query", "key", "value", "past_key", "past_value", "seqlens_k",
                                "total_sequence_length"], ["context", "present_key", "present_value"],
        domain="com.microsoft", num_heads=H, kv_num_heads=Hkv, scale=1.0, name="attention"))
    dt = ONNX_DTYPE[dtype]
    rows = [value_info("query", dt, ["batch", "new_tokens", H * D]),
            *[value_info(n, dt, ["batch", "new_tokens", Hkv * D]) for n in ("key", "value")]]
    cache = [value_info(n, dt, ["batch", Hkv, "capacity", D]) for n in ("past_key", "past_value")]
    lengths = [value_info("seqlens_k", TensorProto.INT32, ["batch"]),
               value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [value_info("context", dt, ["batch", "new_tokens", H * D]),
               *[value_info(n, dt, ["batch", Hkv, "capacity", D]) for n in ("present_key", "present_value")]]
    return b.model("slot_attention", rows + cache + lengths, outputs, opset, domains={"com.microsoft": 1})
