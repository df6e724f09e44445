"""Build the ONNX graphs (embed, one per decoder layer, head) directly from OPT weights.

The graphs are written with ``onnx.helper`` instead of tracing the Hugging Face modules: the op
set of an OPT layer is small, the result is deterministic and fast to produce, every dimension
is symbolic by construction, and no transformers release can change what gets traced.
Weights are numpy arrays in the layouts documented on each builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..manifest import EMBED_IO, HEAD_IO, LAYER_IO, ModelSpec
from ..numerics import MASK_VALUE, NUMPY_DTYPES  # MASK_VALUE: finite (DESIGN.md section 3)

LN_EPS = 1e-5
_ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


@dataclass
class _Builder:
    dtype: str
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    counter: int = 0

    def _name(self, op: str) -> str:
        self.counter += 1
        return f"{op}_{self.counter}"

    def weight(self, name: str, array: np.ndarray, keep_fp32: bool = False) -> str:
        dtype = np.float32 if keep_fp32 or array.dtype.kind != "f" else NUMPY_DTYPES[self.dtype]
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        names = outputs if isinstance(outputs, list) else [self._name(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self._name(f"/{op_type}"), **attrs))
        return names[0] if len(names) == 1 else names

    def cast(self, x: str, source: str, to: str) -> str:
        return x if source == to else self.op("Cast", [x], to=_ONNX_DTYPE[to])

    def gemm(self, x: str, weight: str, bias: str | None) -> str:
        """x [N, in] @ weight [in, out] (+ bias) as one Gemm node."""
        return self.op("Gemm", [x, weight, bias] if bias else [x, weight])

    def layer_norm(self, x: str, scale: str, bias: str) -> str:
        # Normalization statistics in fp32 even in fp16 graphs.
        y = self.op("LayerNormalization", [self.cast(x, self.dtype, "float32"), scale, bias], axis=-1,
                    epsilon=LN_EPS)
        return self.cast(y, "float32", self.dtype)

    def model(self, name: str, inputs: list, outputs: list, opset: int,
              domains: dict[str, int] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
        model = helper.make_model(graph, opset_imports=imports, producer_name="skipdeploy")
        model.ir_version = min(model.ir_version, 10)
        return model


def _value(name: str, dtype: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


def layer_norm_params(weight: np.ndarray | None, bias: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """LayerNorm without elementwise affine is LayerNorm with scale 1 and bias 0."""
    return (np.ones(size, np.float32) if weight is None else weight,
            np.zeros(size, np.float32) if bias is None else bias)


def build_layer(spec: ModelSpec, w: dict[str, np.ndarray | None], dtype: str, opset: int,
                name: str = "layer") -> onnx.ModelProto:
    """One OPT decoder layer with an external, sequence-major KV cache.

    Weights (``w``): ``ln_attn.{weight,bias}``, ``ln_ffn.{weight,bias}`` [E];
    ``qkv.weight`` [E, 3E] with the 1/sqrt(D) query scaling folded in, ``qkv.bias`` [3E];
    ``out_proj.weight`` [E, E]; ``fc1.weight`` [E, F]; ``fc2.weight`` [F, E] (all [in, out]),
    and their biases (absent when the model has none).

    Written for decode speed with standard ONNX ops only (so that every backend can run it):
    attention scores the cached prefix and the new positions separately, so the cache is never
    concatenated (that was an O(P) copy of keys and values per layer and step) and only the
    small [T, T] block of the new positions needs a causal mask; the projections work on
    [B*T, E] rows as one ``Gemm`` each, bias included (onnxruntime also fuses Gemm + Relu):
    1-3% faster per decode step than MatMul + Add on [B, T, E] (BENCHMARKS.md).
    """
    E, H, D = spec.hidden_size, spec.num_heads, spec.head_dim
    b = _Builder(dtype)
    dt = _ONNX_DTYPE[dtype]
    W = _weights_of(b, w)

    x = b.op("Reshape", ["hidden", b.const([-1, E])])                                 # [B*T, E]
    q, k, v = layer_input(b, spec, W, x)
    heads = b.op("Concat", [b.op("Shape", ["hidden"], start=0, end=2), b.const([H, D])], axis=0)  # B,T,H,D
    q = b.op("Transpose", [b.op("Reshape", [q, heads])], perm=[0, 2, 1, 3])          # [B,H,T,D]
    k, v = b.op("Reshape", [k, heads]), b.op("Reshape", [v, heads])                   # [B,T,H,D]
    b.op("Transpose", [k], ["key"], perm=[1, 0, 2, 3])                                # [T,B,H,D]
    b.op("Transpose", [v], ["value"], perm=[1, 0, 2, 3])

    # Scores against the cached prefix [B,H,T,P] and the new positions [B,H,T,T]. Every cached
    # position precedes every query, so the causal mask applies to the new block only.
    past_scores = b.op("MatMul", [q, b.op("Transpose", ["past_key"], perm=[1, 2, 3, 0])])
    new_scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 3, 1])])
    new = b.op("Shape", ["hidden"], start=1, end=2)
    steps = b.op("Range", [b.const(0), b.op("Squeeze", [new]), b.const(1)])
    future = b.op("Greater", [b.op("Unsqueeze", [steps, b.const([0])]),               # key after query
                              b.op("Unsqueeze", [steps, b.const([1])])])
    causal = b.op("Where", [future, b.const(MASK_VALUE, np.float32), b.const(0.0, np.float32)])  # [T,T]
    scores = b.op("Concat", [b.cast(past_scores, dtype, "float32"),
                             b.op("Add", [b.cast(new_scores, dtype, "float32"), causal])], axis=-1)
    padding = b.op("Unsqueeze", ["attention_bias", b.const([1, 2])])                 # [B,1,1,P+T]
    probs = b.cast(b.op("Softmax", [b.op("Add", [scores, padding])], axis=-1), "float32", dtype)
    past = b.op("Shape", ["past_key"], start=0, end=1)
    past_probs = b.op("Slice", [probs, b.const([0]), past, b.const([3])])
    new_probs = b.op("Slice", [probs, past, b.const([np.iinfo(np.int64).max]), b.const([3])])
    context = b.op("Add", [b.op("MatMul", [past_probs, b.op("Transpose", ["past_value"], perm=[1, 2, 0, 3])]),
                           b.op("MatMul", [new_probs, b.op("Transpose", [v], perm=[0, 2, 1, 3])])])  # [B,H,T,D]
    context = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]), b.const([-1, E])])
    x = layer_output(b, spec, W, x, context)
    b.op("Reshape", [x, b.op("Shape", ["hidden"])], ["hidden_out"])

    inputs = [_value("hidden", dt, ["batch", "new_tokens", E]),
              _value("past_key", dt, ["past_tokens", "batch", H, D]),
              _value("past_value", dt, ["past_tokens", "batch", H, D]),
              _value("attention_bias", TensorProto.FLOAT, ["batch", "total_tokens"])]
    outputs = [_value("hidden_out", dt, ["batch", "new_tokens", E]),
               _value("key", dt, ["new_tokens", "batch", H, D]),
               _value("value", dt, ["new_tokens", "batch", H, D])]
    assert [i.name for i in inputs] == LAYER_IO["inputs"] and [o.name for o in outputs] == LAYER_IO["outputs"]
    return b.model(name, inputs, outputs, opset)


def _weights_of(b: _Builder, w: dict[str, np.ndarray | None]):
    """``W(key)``: the initializer name of weight ``key`` (None when the model has none);
    LayerNorm parameters stay float32."""
    def W(key: str) -> str | None:
        return None if w.get(key) is None else b.weight(key, w[key], keep_fp32=key.startswith("ln_"))
    return W


def layer_input(b: _Builder, spec: ModelSpec, W, x: str) -> list[str]:
    """The part of a layer before attention, on rows x [N, E]: query, key, value [N, E] each
    (LayerNorm first in pre-LN models; the query scaling is folded into ``qkv.weight``)."""
    E = spec.hidden_size
    h = b.layer_norm(x, W("ln_attn.weight"), W("ln_attn.bias")) if spec.layer_norm == "pre" else x
    qkv = b.gemm(h, W("qkv.weight"), W("qkv.bias"))
    return b.op("Split", [qkv, b.const([E, E, E])], 3, axis=1)


def layer_output(b: _Builder, spec: ModelSpec, W, x: str, context: str) -> str:
    """The part of a layer after attention, on rows: the residual x [N, E] and the attention
    context [N, E] through out_proj, the feed-forward block and the LayerNorms -> [N, E]."""
    pre = spec.layer_norm == "pre"
    x = b.op("Add", [x, b.gemm(context, W("out_proj.weight"), W("out_proj.bias"))])
    if not pre:
        x = b.layer_norm(x, W("ln_attn.weight"), W("ln_attn.bias"))
    h = b.layer_norm(x, W("ln_ffn.weight"), W("ln_ffn.bias")) if pre else x
    h = _activation(b, b.gemm(h, W("fc1.weight"), W("fc1.bias")), spec.activation)
    x = b.op("Add", [x, b.gemm(h, W("fc2.weight"), W("fc2.bias"))])
    if not pre:
        x = b.layer_norm(x, W("ln_ffn.weight"), W("ln_ffn.bias"))
    return x


def _activation(b: _Builder, x: str, kind: str) -> str:
    if kind == "relu":
        return b.op("Relu", [x])
    if kind == "gelu":  # exact (erf) GELU, as torch.nn.functional.gelu
        erf = b.op("Erf", [b.op("Mul", [x, b.const(1 / np.sqrt(2), NUMPY_DTYPES[b.dtype])])])
        half = b.op("Mul", [x, b.const(0.5, NUMPY_DTYPES[b.dtype])])
        return b.op("Mul", [half, b.op("Add", [erf, b.const(1.0, NUMPY_DTYPES[b.dtype])])])
    raise ValueError(f"unsupported activation {kind!r}")


SUPPORTED_ACTIVATIONS = ("relu", "gelu")


def build_embed(spec: ModelSpec, w: dict[str, np.ndarray | None], dtype: str, opset: int) -> onnx.ModelProto:
    """Token + learned position embeddings (OPT's offset of 2), with ``project_in`` when present.

    Weights: ``embed_tokens.weight`` [V, Ew], ``embed_positions.weight`` [max_positions + 2, E],
    ``project_in.weight`` [Ew, E] or None.
    """
    b = _Builder(dtype)
    tokens = b.op("Gather", [b.weight("embed_tokens.weight", w["embed_tokens.weight"]), "input_ids"])
    if w.get("project_in.weight") is not None:
        tokens = b.op("MatMul", [tokens, b.weight("project_in.weight", w["project_in.weight"])])
    positions = b.op("Add", ["position_ids", b.const(2)])
    positions = b.op("Gather", [b.weight("embed_positions.weight", w["embed_positions.weight"]), positions])
    b.op("Add", [tokens, positions], ["hidden"])
    dt = _ONNX_DTYPE[dtype]
    inputs = [_value("input_ids", TensorProto.INT64, ["batch", "new_tokens"]),
              _value("position_ids", TensorProto.INT64, ["batch", "new_tokens"])]
    outputs = [_value("hidden", dt, ["batch", "new_tokens", spec.hidden_size])]
    assert [i.name for i in inputs] == EMBED_IO["inputs"]
    return b.model("embed", inputs, outputs, opset)


def build_head(spec: ModelSpec, w: dict[str, np.ndarray | None], dtype: str, opset: int) -> onnx.ModelProto:
    """Final LayerNorm (pre-LN models), ``project_out`` when present, and the LM head.

    Runs on the last position only. Weights: ``final_layer_norm.{weight,bias}`` [E] or None,
    ``project_out.weight`` [E, Ew] or None, ``lm_head.weight`` [V, Ew] (the embedding layout, so
    a tied head can share it). Logits are float32 whatever the graph dtype.
    """
    b = _Builder(dtype)
    x = "hidden"
    if w.get("final_layer_norm.weight") is not None or w.get("final_layer_norm.bias") is not None:
        scale, bias = layer_norm_params(w.get("final_layer_norm.weight"), w.get("final_layer_norm.bias"),
                                        spec.hidden_size)
        x = b.layer_norm(x, b.weight("final_layer_norm.weight", scale, True),
                         b.weight("final_layer_norm.bias", bias, True))
    if w.get("project_out.weight") is not None:
        x = b.op("MatMul", [x, b.weight("project_out.weight", w["project_out.weight"])])
    logits = b.op("Gemm", [x, b.weight("lm_head.weight", w["lm_head.weight"])], transB=1)
    b.op("Identity", [b.cast(logits, dtype, "float32")], ["logits"])
    inputs = [_value("hidden", _ONNX_DTYPE[dtype], ["batch", spec.hidden_size])]
    outputs = [_value("logits", TensorProto.FLOAT, ["batch", spec.vocab_size])]
    assert [i.name for i in inputs] == HEAD_IO["inputs"]
    return b.model("head", inputs, outputs, opset)


SYMBOLIC_DIMS = {
    "embed": {"input_ids": ["batch", "new_tokens"], "position_ids": ["batch", "new_tokens"],
              "hidden": ["batch", "new_tokens", None]},
    "layer": {"hidden": ["batch", "new_tokens", None], "past_key": ["past_tokens", "batch", None, None],
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
