"""Build the ONNX graphs (embed, one per decoder layer, head) directly from a model's weights.

The graphs are written with ``onnx.helper`` instead of tracing the Hugging Face modules: the op
set of a decoder layer is small, the result is deterministic and fast to produce, every dimension
is symbolic by construction, and no transformers release can change what gets traced.
Weights are numpy arrays in the layouts documented on each builder.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ..families import for_model_type
from ..manifest import EMBED_IO, HEAD_IO, LAYER_IO, ROPE_EMBED_IO, ROPE_LAYER_IO, ModelSpec
from ..numerics import MASK_VALUE  # finite (DESIGN.md section 3)
from .onnx_builder import ONNX_DTYPE, Builder, value_info, weights_of


# Names of the tensors where a layer graph's rows enter and leave its attention: the in-flight
# engine cuts the layer there (``slot_graphs.cut_layer``), whatever quantized nodes it holds.
# Inner tensors, not graph I/O (DESIGN.md section 3): hidden and positions as rows [B*T, E] and
# [B*T], query/key/value rows [B*T, H*D or Hkv*D] (RoPE applied), the attention's context rows
# [B*T, H*D] and the layer's output rows [B*T, E].
LAYER_CUT = {"hidden": "hidden_rows", "position_ids": "position_rows", "query": "query_rows", "key": "key_rows",
             "value": "value_rows", "context": "context_rows", "hidden_out": "hidden_out_rows"}


def layer_io(spec: ModelSpec) -> dict:
    return ROPE_LAYER_IO if for_model_type(spec.model_type).rope else LAYER_IO


def embed_io(spec: ModelSpec) -> dict:
    return ROPE_EMBED_IO if for_model_type(spec.model_type).rope else EMBED_IO


def build_layer(spec: ModelSpec, w: dict[str, np.ndarray | None], dtype: str, opset: int,
                name: str = "layer") -> onnx.ModelProto:
    """One decoder layer with an external, sequence-major KV cache of the key/value heads.

    The family writes the parts before and after attention on rows [B*T, E] (``layer_input``,
    ``layer_output``: norms, projections as one ``Gemm`` each with bias, RoPE, MLP); the
    attention between them is written here, for every family, with standard ONNX ops only (so
    that every backend can run it). It scores the cached prefix and the new positions
    separately, so the cache is never concatenated (an O(P) copy per layer and step) and only
    the [T, T] block of the new positions needs a causal mask. Grouped-query attention puts the
    G = H / Hkv query heads that share a key/value head side by side ([B, Hkv, G*T, D]), so the
    cache is read once per key/value head.
    """
    family = for_model_type(spec.model_type)
    E, H, Hkv, D = spec.hidden_size, spec.num_heads, spec.kv_heads, spec.head_dim
    G = H // Hkv
    b = Builder(dtype, opset)
    dt = ONNX_DTYPE[dtype]
    W = weights_of(b, w, family.FP32_PREFIXES)

    cut = LAYER_CUT
    x = b.op("Reshape", ["hidden", b.const([-1, E])], [cut["hidden"]])               # [B*T, E]
    positions = b.op("Reshape", ["position_ids", b.const([-1])], [cut["position_ids"]]) if family.rope else None
    q, k, v = _rename(b, family.layer_input(b, spec, W, x, positions), [cut["query"], cut["key"], cut["value"]])
    batch_new = b.op("Shape", ["hidden"], start=0, end=2)
    q = b.op("Transpose", [b.op("Reshape", [q, b.op("Concat", [batch_new, b.const([H, D])], axis=0)])],
             perm=[0, 2, 1, 3])                                                       # [B,H,T,D]
    kv_heads = b.op("Concat", [batch_new, b.const([Hkv, D])], axis=0)
    k, v = b.op("Reshape", [k, kv_heads]), b.op("Reshape", [v, kv_heads])            # [B,T,Hkv,D]
    b.op("Transpose", [k], ["key"], perm=[1, 0, 2, 3])                                # [T,B,Hkv,D]
    b.op("Transpose", [v], ["value"], perm=[1, 0, 2, 3])
    if G > 1:
        q = b.op("Reshape", [q, b.const([0, Hkv, -1, D])])                            # [B,Hkv,G*T,D]

    # Scores against the cached prefix and the new positions. Every cached position precedes
    # every query, so the causal mask applies to the new block only.
    past_scores = b.op("MatMul", [q, b.op("Transpose", ["past_key"], perm=[1, 2, 3, 0])])
    new_scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 3, 1])])
    new = b.op("Shape", ["hidden"], start=1, end=2)
    steps = b.op("Range", [b.const(0), b.op("Squeeze", [new]), b.const(1)])
    future = b.op("Greater", [b.op("Unsqueeze", [steps, b.const([0])]),               # key after query
                              b.op("Unsqueeze", [steps, b.const([1])])])
    causal = b.op("Where", [future, b.const(MASK_VALUE, np.float32), b.const(0.0, np.float32)])  # [T,T]
    new_scores = b.cast(new_scores, dtype, "float32")
    if G > 1:  # [B,Hkv,G,T,T]: the causal block is per query position, whatever its head
        new_scores = b.op("Reshape", [new_scores, b.op("Concat", [b.const([0, Hkv, G]), new, new], axis=0)])
        new_scores = b.op("Reshape", [b.op("Add", [new_scores, causal]),
                                      b.op("Concat", [b.const([0, Hkv, -1]), new], axis=0)])
    else:
        new_scores = b.op("Add", [new_scores, causal])
    scores = b.op("Concat", [b.cast(past_scores, dtype, "float32"), new_scores], axis=-1)
    padding = b.op("Unsqueeze", ["attention_bias", b.const([1, 2])])                 # [B,1,1,P+T]
    probs = b.cast(b.op("Softmax", [b.op("Add", [scores, padding])], axis=-1), "float32", dtype)
    past = b.op("Shape", ["past_key"], start=0, end=1)
    past_probs = b.op("Slice", [probs, b.const([0]), past, b.const([3])])
    new_probs = b.op("Slice", [probs, past, b.const([np.iinfo(np.int64).max]), b.const([3])])
    context = b.op("Add", [b.op("MatMul", [past_probs, b.op("Transpose", ["past_value"], perm=[1, 2, 0, 3])]),
                           b.op("MatMul", [new_probs, b.op("Transpose", [v], perm=[0, 2, 1, 3])])])
    if G > 1:
        context = b.op("Reshape", [context, b.const([0, H, -1, D])])                 # [B,H,T,D]
    context = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]), b.const([-1, H * D])],
                   [cut["context"]])
    [x] = _rename(b, [family.layer_output(b, spec, W, x, context)], [cut["hidden_out"]])
    b.op("Reshape", [x, b.op("Shape", ["hidden"])], ["hidden_out"])

    inputs = {"hidden": value_info("hidden", dt, ["batch", "new_tokens", E]),
              "position_ids": value_info("position_ids", TensorProto.INT64, ["batch", "new_tokens"]),
              "past_key": value_info("past_key", dt, ["past_tokens", "batch", Hkv, D]),
              "past_value": value_info("past_value", dt, ["past_tokens", "batch", Hkv, D]),
              "attention_bias": value_info("attention_bias", TensorProto.FLOAT, ["batch", "total_tokens"])}
    outputs = [value_info("hidden_out", dt, ["batch", "new_tokens", E]),
               value_info("key", dt, ["new_tokens", "batch", Hkv, D]),
               value_info("value", dt, ["new_tokens", "batch", Hkv, D])]
    io = layer_io(spec)
    return b.model(name, [inputs[n] for n in io["inputs"]], outputs, opset)


def _rename(b: Builder, names: list[str], new: list[str]) -> list[str]:
    """Give the tensors ``names``, outputs of the family's nodes already in ``b``, the names ``new``."""
    mapping = dict(zip(names, new))
    produced = {out for node in b.nodes for out in node.output}
    assert len(mapping) == len(names) and produced.issuperset(names), names  # distinct node outputs
    for node in b.nodes:
        for values in (node.input, node.output):
            values[:] = [mapping.get(n, n) for n in values]
    return new


def build_embed(spec: ModelSpec, w: dict[str, np.ndarray | None], dtype: str, opset: int) -> onnx.ModelProto:
    """Token embeddings, plus what the family adds before the first layer (OPT: learned
    positions with an offset of 2 and ``project_in``). Weights: ``embed_tokens.weight`` [V, Ew], ..."""
    family = for_model_type(spec.model_type)
    b = Builder(dtype, opset)
    b.op("Identity", [family.embed_graph(b, spec, weights_of(b, w, family.FP32_PREFIXES))], ["hidden"])
    inputs = {"input_ids": value_info("input_ids", TensorProto.INT64, ["batch", "new_tokens"]),
              "position_ids": value_info("position_ids", TensorProto.INT64, ["batch", "new_tokens"])}
    outputs = [value_info("hidden", ONNX_DTYPE[dtype], ["batch", "new_tokens", spec.hidden_size])]
    return b.model("embed", [inputs[n] for n in embed_io(spec)["inputs"]], outputs, opset)


def build_head(spec: ModelSpec, w: dict[str, np.ndarray | None], dtype: str, opset: int) -> onnx.ModelProto:
    """The family's final norm (and OPT's ``project_out``), then the LM head.

    Runs on the last position only. ``lm_head.weight`` is [V, Ew] (the embedding layout, so a
    tied head can share it). Logits are float32 whatever the graph dtype.
    """
    family = for_model_type(spec.model_type)
    b = Builder(dtype, opset)
    x = family.head_input(b, spec, weights_of(b, w, family.FP32_PREFIXES), "hidden")
    logits = b.op("Gemm", [x, b.weight("lm_head.weight", w["lm_head.weight"])], transB=1)
    b.op("Identity", [b.cast(logits, dtype, "float32")], ["logits"])
    inputs = [value_info("hidden", ONNX_DTYPE[dtype], ["batch", spec.hidden_size])]
    outputs = [value_info("logits", TensorProto.FLOAT, ["batch", spec.vocab_size])]
    assert [i.name for i in inputs] == HEAD_IO["inputs"]
    return b.model("head", inputs, outputs, opset)


SYMBOLIC_DIMS = {
    "embed": {"input_ids": ["batch", "new_tokens"], "position_ids": ["batch", "new_tokens"],
              "hidden": ["batch", "new_tokens", None]},
    "layer": {"hidden": ["batch", "new_tokens", None], "position_ids": ["batch", "new_tokens"],
              "past_key": ["past_tokens", "batch", None, None],
              "past_value": ["past_tokens", "batch", None, None], "attention_bias": ["batch", "total_tokens"],
              "hidden_out": ["batch", "new_tokens", None], "key": ["new_tokens", "batch", None, None],
              "value": ["new_tokens", "batch", None, None]},
    "head": {"hidden": ["batch", None], "logits": ["batch", None]},
}


def check_symbolic_dims(model: onnx.ModelProto, kind: str) -> list[str]:
    """Names of graph I/O whose batch, new-token or past dimensions were frozen to a number."""
    problems = []
    for value in list(model.graph.input) + list(model.graph.output):
        expected = SYMBOLIC_DIMS[kind].get(value.name)
        if expected is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, want in enumerate(expected):
            if want is not None and (axis >= len(dims) or dims[axis].dim_param != want):
                problems.append(f"{value.name}[{axis}]")
    return problems
