"""Weight-only int4 and int8: one graph's weight matrices rewritten as onnxruntime ``MatMulNBits`` nodes.

The graph format this writes is specified in ``quantize``'s module docstring (one place, for
every reader of these graphs). Packing uses onnxruntime's own block quantizer kernels
(``quantize_matmul_4bits``/``quantize_matmul_8bits``, what
``matmul_nbits_quantizer.MatMulNBitsQuantizer`` calls): that quantizer itself rewrites only
``MatMul`` nodes (the exported projections are ``Gemm`` with a fused bias, the head a ``Gemm``
with ``transB=1``) and imports ``onnx_ir``, which the export extra does not install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ExportError

# Chosen by tools/int4_choice.py (DESIGN.md section 9, its "int4" and "int8" entries) for both widths.
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
MS_DOMAIN = "com.microsoft"
# MatMulNBits has its bias input (input 5) since onnxruntime 1.19 (microsoft/onnxruntime#20587);
# 8-bit weights (the packing kernel and the CPU kernels) since 1.22 (#24384, #24491).
MIN_ONNXRUNTIME = {4: (1, 19), 8: (1, 22)}


def check_options(bits: int, block_size: int, accuracy_level: int) -> None:
    if bits not in BITS:
        raise ExportError(f"MatMulNBits weights are 4 or 8 bits here (got {bits!r})")
    if block_size not in BLOCK_SIZES:
        raise ExportError(f"int{bits} block size must be one of {', '.join(map(str, BLOCK_SIZES))} "
                          f"(got {block_size!r})")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"accuracy_level must be 0..4 (got {accuracy_level!r})")
    import onnxruntime

    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_ONNXRUNTIME[bits]:
        raise ExportError(f"int{bits} exports need onnxruntime >= {'.'.join(map(str, MIN_ONNXRUNTIME[bits]))} "
                          f"(MatMulNBits with {bits}-bit weights and a bias; this is {onnxruntime.__version__})")


def pack(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``weight`` [K, N] float32 -> (packed uint8 [N, K/bs, bs*bits/8], scales float32 [N, K/bs],
    zero points uint8 [N, ceil(K/bs*bits/8)]; unused when ``symmetric``); K is padded with zeros
    up to a whole block."""
    from onnxruntime.capi import _pybind_state

    kernel = getattr(_pybind_state, f"quantize_matmul_{bits}bits")
    rows, cols = weight.shape
    blocks = -(-rows // block_size)
    padded = np.zeros((blocks * block_size, cols), np.float32)
    padded[:rows] = weight
    packed = np.zeros((cols, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((cols, blocks), np.float32)
    zero_points = np.zeros((cols, -(-blocks * bits // 8)), np.uint8)
    kernel(packed, padded, scales, zero_points, block_size, cols, rows, symmetric)
    return packed, scales, zero_points


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int,
               bits: int) -> np.ndarray:
    """The [K, N] float matrix a ``MatMulNBits`` node multiplies by (for checks and tests)."""
    N, blocks, _ = packed.shape
    if bits == 4:
        q = np.empty((N, blocks, 2 * packed.shape[2]), np.float32)
        q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4
    else:
        q = packed.astype(np.float32)
    if zero_points is None:
        zp = np.full((N, blocks), 2.0 ** (bits - 1), np.float32)
    elif bits == 4:
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(N, -1)[:, :blocks].astype(np.float32)
    else:
        zp = zero_points[:, :blocks].astype(np.float32)
    w = (q - zp[..., None]) * scales[..., None]
    return w.reshape(N, -1)[:, :K].T.copy()


def quantize_graph(source: Path, target: Path, bits: int, block_size: int, accuracy_level: int,
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
    tag = f"_Q{bits}"
    nodes, replaced, added, seen = [], [], [], {}
    for node in graph.node:
        rewrite = weight_of(node, inits, names)
        if rewrite is None:
            nodes.append(node)
            continue
        weight_name, trans_b = rewrite
        K, N = inits[weight_name].dims[::-1] if trans_b else inits[weight_name].dims
        q_name, s_name, z_name = f"{weight_name}{tag}", f"{weight_name}_scales", f"{weight_name}_zero_points"
        if seen.setdefault(weight_name, trans_b) != trans_b:  # one packed copy serves one orientation
            raise ExportError(f"{source.name}: {weight_name} is multiplied both as is and transposed")
        if weight_name not in replaced:
            w = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
            w = np.ascontiguousarray(w.T if trans_b else w)  # the head's Gemm multiplies by lm_head.weight^T
            packed, scales, zero_points = pack(w, bits, block_size, symmetric)
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
        attrs = {"K": K, "N": N, "bits": bits, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        while inputs[-1] == "":  # trailing optional inputs left out, not named empty
            inputs.pop()
        out = node.output[0] + "_nobias" if extra else node.output[0]
        nodes.append(helper.make_node("MatMulNBits", inputs, [out], name=f"{node.name}{tag}", domain=MS_DOMAIN,
                                      **attrs))
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


__all__ = ["BITS", "DEFAULT_ACCURACY_LEVEL", "DEFAULT_BLOCK_SIZE", "check_options", "dequantize", "pack",
           "quantize_graph", "weight_of"]
