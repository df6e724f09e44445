"""A small ONNX graph builder over ``onnx.helper``: nodes, initializers and the few compound
operations (norms, casts, Gemm) that every model family's graphs are written with."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..numerics import NUMPY_DTYPES

ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


@dataclass
class Builder:
    dtype: str
    opset: int = 17
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
        return x if source == to else self.op("Cast", [x], to=ONNX_DTYPE[to])

    def gemm(self, x: str, weight: str, bias: str | None) -> str:
        """x [N, in] @ weight [in, out] (+ bias) as one Gemm node."""
        return self.op("Gemm", [x, weight, bias] if bias else [x, weight])

    def layer_norm(self, x: str, scale: str, bias: str, eps: float) -> str:
        # Normalization statistics in fp32 even in fp16 graphs.
        y = self.op("LayerNormalization", [self.cast(x, self.dtype, "float32"), scale, bias], axis=-1, epsilon=eps)
        return self.cast(y, "float32", self.dtype)

    def rms_norm(self, x: str, scale: str, eps: float) -> str:
        """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, in fp32, written as the
        Pow/ReduceMean/Add/Sqrt/Div/Mul pattern that onnxruntime fuses into one
        SimplifiedLayerNormalization (and any backend can run unfused)."""
        x32 = self.cast(x, self.dtype, "float32")
        square = self.op("Pow", [x32, self.const(2.0, np.float32)])
        mean = self.reduce_mean(square, axis=-1)
        root = self.op("Sqrt", [self.op("Add", [mean, self.const(eps, np.float32)])])
        y = self.op("Mul", [self.op("Div", [x32, root]), scale])
        return self.cast(y, "float32", self.dtype)

    def reduce_mean(self, x: str, axis: int) -> str:
        if self.opset >= 18:  # axes became an input in opset 18
            return self.op("ReduceMean", [x, self.const([axis])], keepdims=1)
        return self.op("ReduceMean", [x], axes=[axis], keepdims=1)

    def model(self, name: str, inputs: list, outputs: list, opset: int,
              domains: dict[str, int] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
        model = helper.make_model(graph, opset_imports=imports, producer_name="skipdeploy")
        model.ir_version = min(model.ir_version, 10)
        return model


def value_info(name: str, dtype: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


def weights_of(b: Builder, w: dict[str, np.ndarray | None], fp32_prefixes: tuple[str, ...] = ("ln_",)):
    """``W(key)``: the initializer name of weight ``key`` (None when the model has none); norm
    parameters (names starting with ``fp32_prefixes``) stay float32."""
    added: dict[str, str] = {}

    def W(key: str) -> str | None:
        if w.get(key) is None:
            return None
        if key not in added:  # a family may ask twice ("is there a final norm?"): one initializer
            added[key] = b.weight(key, w[key], keep_fp32=key.startswith(fp32_prefixes))
        return added[key]
    return W
