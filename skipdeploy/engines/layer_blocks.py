"""Consecutive decoder layers stitched into one graph (a block), each layer behind an ``If`` on its
own flag, so that a step's layers run in one onnxruntime ``Run()`` per block instead of one each.

Why: a layer session pays a fixed price per ``Run()`` (binding, its thread pool waking, an
execution frame) that no kernel time buys; SmolLM2's 30 small layers paid it 30 times a step
(BENCHMARKS.md, "One session per block of layers"). A block keeps SkipDecode's freedom: any set of
its layers runs, the others take the ``else`` branch (the hidden state passes through, the layer's
key and value outputs are empty and left unbound), and every weight is held once, by its own
layer's ``then`` branch.

The block is written here as protobuf bytes from the export's own layer graphs, whose bytes are
reused as they are: the runtime core has no ``onnx`` package, the manifest and the files on disk
stay what they are, and every weight scheme (float, int8, int4) comes along unchanged. Only the
few message fields named below are read or written (onnx.proto3 field numbers).

A block's graph (layers ``i`` of the block; the ``then`` branch of layer i is its own graph with its
inputs replaced by ``Identity`` nodes that read the block's tensors of that layer):

- inputs: ``block.hidden`` [B,T,E], the layers' shared ``attention_bias`` (and ``position_ids``),
  and per layer ``l{i}.run`` (bool scalar), ``l{i}.past_key``, ``l{i}.past_value``;
- outputs: per layer ``l{i}.key``, ``l{i}.value`` ([T,B,Hkv,D] where it ran, [0,1,Hkv,D] where it
  did not) and ``l{last}.hidden_out``, the hidden state after the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Field numbers (onnx.proto3).
MODEL_IR_VERSION, MODEL_OPSET, MODEL_GRAPH = 1, 8, 7
GRAPH_NODE, GRAPH_NAME, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 1, 2, 5, 11, 12
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP, NODE_ATTRIBUTE = 1, 2, 3, 4, 5
ATTR_NAME, ATTR_GRAPH, ATTR_TYPE, ATTR_TYPE_GRAPH = 1, 6, 20, 5
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW = 1, 2, 8, 9
VALUE_NAME, VALUE_TYPE, TYPE_TENSOR, TENSOR_TYPE_ELEM, TENSOR_TYPE_SHAPE = 1, 2, 1, 1, 2
BOOL = 9  # TensorProto.DataType

# Blocks hold at most this many bytes of layer graphs: the serialized block must stay under
# protobuf's 2 GiB, and loading one holds its bytes a few times over for a moment. Layers this
# large gain nothing from sharing a Run() anyway (their weights take milliseconds to read).
BLOCK_BYTES = 256 << 20


# -- protobuf wire format ------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, object, bytes]]:
    """(field number, wire type, value, the field's whole encoding) for each field of a message;
    the value of a length-delimited field is its payload bytes."""
    out, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {wire} in a layer graph")
        out.append((number, wire, value, data[start:pos]))
    return out


def _first(fields, number: int):
    return next((value for n, _, value, _ in fields if n == number), None)


def _message(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    return _message(number, text.encode())


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _node(op: str, inputs: list[str], outputs: list[str], name: str, attributes: bytes = b"") -> bytes:
    return _message(GRAPH_NODE, b"".join(_string(NODE_INPUT, n) for n in inputs)
                    + b"".join(_string(NODE_OUTPUT, n) for n in outputs)
                    + _string(NODE_NAME, name) + _string(NODE_OP, op) + attributes)


def _graph_attribute(name: str, graph: bytes) -> bytes:
    return _message(NODE_ATTRIBUTE, _string(ATTR_NAME, name) + _message(ATTR_GRAPH, graph)
                    + _int(ATTR_TYPE, ATTR_TYPE_GRAPH))


def _value(name: str, elem_type: int, scalar: bool = False) -> bytes:
    """A ValueInfoProto of a tensor with no shape given (or a scalar)."""
    tensor = _int(TENSOR_TYPE_ELEM, elem_type) + (_message(TENSOR_TYPE_SHAPE, b"") if scalar else b"")
    return _string(VALUE_NAME, name) + _message(VALUE_TYPE, _message(TYPE_TENSOR, tensor))


def _renamed(value_info: bytes, name: str) -> bytes:
    """The same ValueInfoProto (type and shape) under another name."""
    return _string(VALUE_NAME, name) + b"".join(raw for n, _, _, raw in _fields(value_info) if n != VALUE_NAME)


def _elem_type(value_info: bytes) -> int:
    tensor = _first(_fields(_first(_fields(value_info), VALUE_TYPE)), TYPE_TENSOR)
    return _first(_fields(tensor), TENSOR_TYPE_ELEM)


# -- blocks --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """Layers ``first`` .. ``last`` (inclusive) in one graph."""

    first: int
    last: int

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    @property
    def hidden_out(self) -> str:
        return f"l{self.last}.hidden_out"


def plan_blocks(sizes: list[int], limit: int = BLOCK_BYTES) -> list[Block]:
    """Runs of consecutive layers whose graphs (``sizes``, bytes) add up to at most ``limit``; a
    layer larger than that is a block alone."""
    blocks, first, held = [], 0, 0
    for index, size in enumerate(sizes):
        if index > first and held + size > limit:
            blocks.append(Block(first, index - 1))
            first, held = index, 0
        held += size
    return blocks + [Block(first, len(sizes) - 1)] if sizes else blocks


def stitch(block: Block, layer_models: list[bytes], io: dict, kv_shape: tuple[int, int]) -> bytes:
    """The block's ModelProto bytes from its layers' ModelProto bytes (in order).

    ``io`` is the manifest's layer I/O (input and output names); ``kv_shape`` is (Hkv, D), the
    shape of a skipped layer's empty key and value after [0, 1]."""
    inputs, outputs = io["inputs"], io["outputs"]  # outputs: hidden_out, key, value
    shared = [n for n in inputs if n not in ("hidden", "past_key", "past_value")]
    opsets, nodes, graph_inputs, graph_outputs, ir_version = [], [], [], [], None
    previous = "block.hidden"
    for index, model in zip(block.layers, layer_models):
        model_fields = _fields(model)
        ir_version = ir_version or _first(model_fields, MODEL_IR_VERSION)
        opsets += [raw for n, _, _, raw in model_fields if n == MODEL_OPSET and raw not in opsets]
        graph = _fields(_first(model_fields, MODEL_GRAPH))
        declared = {_first(_fields(v), VALUE_NAME).decode(): v for n, _, v, _ in graph if n == GRAPH_INPUT}
        produced = [v for n, _, v, _ in graph if n == GRAPH_OUTPUT]
        missing = set(inputs) - set(declared)
        if missing or len(produced) != len(outputs):
            raise ValueError(f"layer {index}'s graph does not have the manifest's I/O ({', '.join(sorted(missing))})")
        p = f"l{index}."
        if index == block.first:
            graph_inputs += [_renamed(declared["hidden"], "block.hidden")] + [declared[n] for n in shared]
        graph_inputs += [_value(p + "run", BOOL, scalar=True), _renamed(declared["past_key"], p + "past_key"),
                         _renamed(declared["past_value"], p + "past_value")]
        elem = _elem_type(produced[1])
        # then: the layer's own graph, its inputs now read from the block through Identity nodes.
        feeds = {"hidden": previous, "past_key": p + "past_key", "past_value": p + "past_value"}
        then = (b"".join(_node("Identity", [source], [local], f"{p}in.{local}") for local, source in feeds.items())
                + b"".join(raw for n, _, _, raw in graph if n not in (GRAPH_INPUT, GRAPH_NAME))
                + _string(GRAPH_NAME, p + "then"))
        # else: the hidden state passes through; key and value are empty.
        Hkv, D = kv_shape
        empty = (b"".join(_int(TENSOR_DIMS, d) for d in (0, 1, Hkv, D)) + _int(TENSOR_DATA_TYPE, elem)
                 + _string(TENSOR_NAME, p + "empty") + _message(TENSOR_RAW, b""))
        skip = (_node("Identity", [previous], [p + "skip.hidden"], p + "skip.hidden")
                + _node("Identity", [p + "empty"], [p + "skip.key"], p + "skip.key")
                + _node("Identity", [p + "empty"], [p + "skip.value"], p + "skip.value")
                + _message(GRAPH_INITIALIZER, empty) + _string(GRAPH_NAME, p + "else")
                + b"".join(_message(GRAPH_OUTPUT, _value(p + "skip." + n, _elem_type(v)))
                           for n, v in zip(("hidden", "key", "value"), produced)))
        out = [p + "hidden_out", p + "key", p + "value"]
        nodes.append(_node("If", [p + "run"], out, p + "if",
                           _graph_attribute("then_branch", then) + _graph_attribute("else_branch", skip)))
        graph_outputs += [_value(p + "key", elem), _value(p + "value", elem)]
        previous = out[0]
    graph_outputs.append(_value(block.hidden_out, _elem_type(produced[0])))
    body = (b"".join(nodes) + _string(GRAPH_NAME, f"layers_{block.first}_{block.last}")
            + b"".join(_message(GRAPH_INPUT, v) for v in graph_inputs)
            + b"".join(_message(GRAPH_OUTPUT, v) for v in graph_outputs))
    return _int(MODEL_IR_VERSION, ir_version) + b"".join(opsets) + _message(MODEL_GRAPH, body)


def read_block(block: Block, paths: list[Path], io: dict, kv_shape: tuple[int, int]) -> bytes:
    return stitch(block, [paths[i].read_bytes() for i in block.layers], io, kv_shape)
