"""int4 weights: one graph's weight matrices rewritten as onnxruntime ``MatMulNBits`` nodes.

The graph format this writes is specified in ``quantize``'s module docstring (one place, for
every reader of int4 graphs). Packing uses onnxruntime's own block quantizer kernel
(``quantize_matmul_4bits``, what ``matmul_nbits_quantizer.MatMulNBitsQuantizer`` calls): that
quantizer itself rewrites only ``MatMul`` nodes (the exported projections are ``Gemm`` with a
fused bias, the head a ``Gemm`` with ``transB=1``) and imports ``onnx_ir``, which the export
extra does not install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ExportError

# Chosen by tools/int4_choice.py (DESIGN.md section 9, "int4"): see the table there.
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
MS_DOMAIN = "com.microsoft"
# MatMulNBits has its bias input (input 5) since onnxruntime 1.19 (microsoft/onnxruntime#20587).
MIN_ONNXRUNTIME = (1, 19)


def check_int4_options(block_size: int, accuracy_level: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ExportError(f"int4 block size must be one of {', '.join(map(str, BLOCK_SIZES))} (got {block_size!r})")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"accuracy_level must be 0..4 (got {accuracy_level!r})")
    import onnxruntime

    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_ONNXRUNTIME:
        raise ExportError(f"int4 exports need onnxruntime >= {'.'.join(map(str, MIN_ONNXRUNTIME))} "
                          f"(MatMulNBits with a bias; this is {onnxruntime.__version__})")


def pack_int4(weight: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``weight`` [K, N] float32 -> (packed uint8 [N, K/bs, bs/2], scales float32 [N, K/bs],
    zero points uint8 [N, ceil(K/bs/2)]; all 8 (unused) when ``symmetric``); K is padded with
    zeros up to a whole block."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rows, cols = weight.shape
    blocks = -(-rows // block_size)
    padded = np.zeros((blocks * block_size, cols), np.float32)
    padded[:rows] = weight
    packed = np.zeros((cols, blocks, block_size // 2), np.uint8)
    scales = np.zeros((cols, blocks), np.float32)
    zero_points = np.zeros((cols, -(-blocks // 2)), np.uint8)
    quantize_matmul_4bits(packed, padded, scales, zero_points, block_size, cols, rows, symmetric)
    return packed, scales, zero_points


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int) -> np.ndarray:
    """The [K, N] float matrix a ``MatMulNBits`` node multiplies by (for checks and tests)."""
    N, blocks, half = packed.shape
    q = np.empty((N, blocks, 2 * half), np.float32)
    q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4
    if zero_points is None:
        zp = np.full((N, blocks), 8.0, np.float32)
    else:
        both = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(N, -1)
        zp = both[:, :blocks].astype(np.float32)
    w = (q - zp[..., None]) * scales[..., None]
    return w.reshape(N, -1)[:, :K].T.copy()


def quantize_graph_int4(source: Path, target: Path, block_size: int, accuracy_level: int,
                        symmetric: bool, names: tuple[str, ...]) -> list[str]:
    """Write ``source`` (an exported layer or head graph; external data is read in and the
    result holds all its weights) to ``target`` with every float ``MatMul``/``Gemm`` over a 2-D
    weight named in ``names`` (the family's weights) replaced by ``MatMulNBits``; other constant
    matrices (RoPE's signed permutation) stay exact. Returns the float weights it replaced."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))  # with external data (the head's tied lm_head.weight)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    nodes, replaced, added, seen = [], [], [], {}
    for node in graph.node:
        rewrite = weight_of(node, inits, names)
        if rewrite is None:
            nodes.append(node)
            continue
        weight_name, trans_b = rewrite
        K, N = inits[weight_name].dims[::-1] if trans_b else inits[weight_name].dims
        q_name, s_name, z_name = f"{weight_name}_Q4", f"{weight_name}_scales", f"{weight_name}_zero_points"
        if seen.setdefault(weight_name, trans_b) != trans_b:  # one packed copy serves one orientation
            raise ExportError(f"{source.name}: {weight_name} is multiplied both as is and transposed")
        if weight_name not in replaced:
            w = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
            w = np.ascontiguousarray(w.T if trans_b else w)  # the head's Gemm multiplies by lm_head.weight^T
            packed, scales, zero_points = pack_int4(w, block_size, symmetric)
            added += [numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales, s_name)]
            if not symmetric:
                added.append(numpy_helper.from_array(zero_points, z_name))
            replaced.append(weight_name)
        inputs = [node.input[0], q_name, s_name, "" if symmetric else z_name, ""]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        extra = []
        if bias is not None and bias in inits and tuple(inits[bias].dims) == (N,):
            inputs.append(bias)
        elif bias is not None:  # a broadcast or computed bias: added after the product
            extra.append(helper.make_node("Add", [node.output[0] + "_nobias", bias], [node.output[0]],
                                          name=f"{node.name}_bias"))
        attrs = {"K": K, "N": N, "bits": 4, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        while inputs[-1] == "":  # trailing optional inputs left out, not named empty
            inputs.pop()
        out = node.output[0] + "_nobias" if extra else node.output[0]
        nodes.append(helper.make_node("MatMulNBits", inputs, [out], name=f"{node.name}_Q4", domain=MS_DOMAIN, **attrs))
        nodes.extend(extra)
    if not replaced:
        raise ExportError(f"{source.name} has no weight matrix to quantize (not a layer or head graph?)")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(model, str(target))  # every tensor inside: external data was read into the proto
    return replaced


def weight_of(node, inits, names) -> tuple[str, bool] | None:
    """(weight initializer, transposed) when ``node`` multiplies by a 2-D float weight named in
    ``names``."""
    import onnx

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    if node.input[1] not in names:
        return None
    init = inits[node.input[1]]
    if len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
        return None
    trans_b = False
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        trans_b = bool(attrs.get("transB", 0))
    return init.name, trans_b


__all__ = ["weight_of", "DEFAULT_ACCURACY_LEVEL", "DEFAULT_BLOCK_SIZE", "check_int4_options", "dequantize_int4", "pack_int4",
           "quantize_graph_int4"]
