"""Consecutive decoder layers stitched into one graph (a block; by default all of them), each layer
behind an ``If`` on its own flag, so that a step's layers run in one onnxruntime ``Run()`` per
block instead of one each.

Why: a layer session pays a fixed price per ``Run()`` (binding, its thread pool waking, an
execution frame) that no kernel time buys; SmolLM2's 30 small layers paid it 30 times a step
(BENCHMARKS.md, "Layers stitched into one session"). A block keeps SkipDecode's freedom: any set of
its layers runs, the others take the ``else`` branch (the hidden state passes through, the layer's
key and value outputs are empty and left unbound), and every weight is held once.

The block is written here as protobuf bytes from the export's own layer graphs: the runtime core
has no ``onnx`` package, the manifest and the files on disk stay what they are, and every weight
scheme (float, int8, int4) comes along unchanged. Nodes are copied (their weight inputs renamed
per layer); each weight becomes a block initializer whose data is an external reference to its
own bytes inside the layer file, which onnxruntime maps as it maps any external data. The work
the layers repeat on the same values (mask, RoPE, shapes) moves to the outer graph, once a step
(``_Shared``). Only the few message fields named below are read or written (onnx.proto3 field
numbers).

A block's graph (layers ``i`` of the block; the ``then`` branch of layer i holds the layer graph's
nodes, its inputs replaced by ``Identity`` nodes that read the block's tensors of that layer):

- inputs: ``block.hidden`` [B,T,E], the layers' shared ``attention_bias`` (and ``position_ids``),
  and per layer ``l{i}.run`` (bool scalar), ``l{i}.past_key``, ``l{i}.past_value``;
- outputs: per layer ``l{i}.key``, ``l{i}.value`` ([T,B,Hkv,D] where it ran, [0,1,Hkv,D] where it
  did not) and ``l{last}.hidden_out``, the hidden state after the block.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

# Field numbers (onnx.proto3).
MODEL_IR_VERSION, MODEL_OPSET, MODEL_GRAPH = 1, 8, 7
GRAPH_NODE, GRAPH_NAME, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 1, 2, 5, 11, 12
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP, NODE_ATTRIBUTE = 1, 2, 3, 4, 5
ATTR_NAME, ATTR_GRAPH, ATTR_GRAPHS, ATTR_TYPE, ATTR_TYPE_GRAPH = 1, 6, 11, 20, 5
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW, TENSOR_EXTERNAL, TENSOR_LOCATION = 1, 2, 8, 9, 13, 14
VALUE_NAME, VALUE_TYPE, TYPE_TENSOR, TENSOR_TYPE_ELEM, TENSOR_TYPE_SHAPE = 1, 2, 1, 1, 2
BOOL = 9  # TensorProto.DataType
# A layer graph with sparse initializers (15) is refused: their names would need renaming too.
# Its value_info (13) is dropped: onnxruntime infers the shapes again.
GRAPH_UNSUPPORTED = (15,)

# Raw data this large is referenced in the layer file instead of copied into the block; smaller
# initializers (shape constants, RoPE frequencies) are compared by content and shared by layers.
EXTERNAL_MIN = 1024


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


class Field(NamedTuple):
    number: int
    wire: int
    value: object      # int (varint) or the payload (memoryview, length-delimited and fixed)
    raw: memoryview    # the field's whole encoding
    offset: int        # where the payload starts in the file


def _fields(data: memoryview, base: int = 0) -> list[Field]:
    """The fields of a message held in ``data``, which starts ``base`` bytes into its file."""
    out, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            offset = pos
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, offset, pos = data[pos:pos + size], pos, pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, offset, pos = data[pos:pos + size], pos, pos + size
        else:
            raise ValueError(f"protobuf wire type {wire} in a layer graph")
        out.append(Field(number, wire, value, data[start:pos], base + offset))
    return out


def _text(value: memoryview) -> str:
    return bytes(value).decode()


def _first(fields, number: int):
    return next((f.value for f in fields if f.number == number), None)


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
    return _string(VALUE_NAME, name) + b"".join(f.raw for f in _fields(value_info) if f.number != VALUE_NAME)


def _holds_subgraph(node: list[Field]) -> bool:
    return any(a.number in (ATTR_GRAPH, ATTR_GRAPHS) for f in node if f.number == NODE_ATTRIBUTE
               for a in _fields(f.value))


def _renamed_inputs(node: list[Field], names: dict[str, str]) -> bytes:
    """A NodeProto (its fields; written as a GRAPH_NODE field) whose inputs named in ``names`` are
    renamed; a node holding a subgraph is refused (its references would need renaming too)."""
    if _holds_subgraph(node):
        raise ValueError("a layer graph's node holds a subgraph, which blocks do not carry")
    return _message(GRAPH_NODE, b"".join(
        _string(NODE_INPUT, names.get(_text(f.value), _text(f.value))) if f.number == NODE_INPUT else f.raw
        for f in node))


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


def plan_blocks(num_layers: int, block_layers: int | None = None) -> list[Block]:
    """The layers in runs of ``block_layers`` (None: all of them in one block)."""
    size = block_layers or num_layers or 1
    return [Block(first, min(first + size, num_layers) - 1) for first in range(0, num_layers, size)]


def _initializer(tensor: list[Field], name: str, location: str) -> bytes:
    """A layer's initializer under the block's ``name``, its data left where it is: raw data in
    the layer file becomes an external reference to those same bytes (onnxruntime maps external
    data instead of copying it, and frees it once the kernels have pre-packed it); data already
    external (a large graph's ``.data`` file) keeps its reference; small typed data stays inline."""
    raw = _first(tensor, TENSOR_RAW)
    kept = b"".join(f.raw for f in tensor if f.number not in (TENSOR_NAME, TENSOR_RAW))
    if raw is None or len(raw) < EXTERNAL_MIN:
        return _string(TENSOR_NAME, name) + kept + (b"" if raw is None else _message(TENSOR_RAW, raw))
    offset = next(f.offset for f in tensor if f.number == TENSOR_RAW)
    where = b"".join(_message(TENSOR_EXTERNAL, _string(1, key) + _string(2, value)) for key, value in
                     (("location", location), ("offset", str(offset)), ("length", str(len(raw)))))
    return _string(TENSOR_NAME, name) + kept + where + _int(TENSOR_LOCATION, 1)


class _Shared:
    """Work that every layer of a block repeats on the same values (the causal mask and the
    padding bias from ``attention_bias``, RoPE's cos and sin from ``position_ids``, shapes of the
    hidden state, their constants), moved to the block's outer graph and done once a step.

    A layer's node is shared when it reads only shared values: the block's shared inputs, small
    initializers (by content) and the outputs of shared nodes; ``Shape`` of the layer's hidden
    state counts as one of the block's (every layer's hidden state has the block's shape). Nodes
    are keyed by what they compute (operator, attributes and the keys of their inputs), so the
    same work in two layers becomes one node."""

    def __init__(self, inputs: list[str]) -> None:
        self.inputs = set(inputs)
        self.nodes: list[bytes] = []
        self.initializers: list[bytes] = []
        self._made: set[str] = set()

    def initializer(self, tensor: list[Field]) -> str:
        body = b"".join(bytes(f.raw) for f in tensor if f.number != TENSOR_NAME)
        name = "shared.init." + hashlib.sha1(body).hexdigest()[:16]
        if name not in self._made:
            self._made.add(name)
            self.initializers.append(_message(GRAPH_INITIALIZER, _string(TENSOR_NAME, name) + body))
        return name

    def layer(self, nodes: list[list[Field]], small: dict[str, list[Field]]) -> tuple[list[list[Field]], dict]:
        """The layer's nodes (their fields) left to it, and the names of the shared values its
        nodes read."""
        outer = {name: name for name in self.inputs}
        kept = []
        for fields in nodes:
            op = _text(_first(fields, NODE_OP))
            inputs = [_text(f.value) for f in fields if f.number == NODE_INPUT]
            if op == "Shape" and inputs == ["hidden"]:
                sources = ["block.hidden"]
            elif op.startswith("Random") or _holds_subgraph(fields):
                sources = None
            else:
                sources = []
                for name in inputs:
                    if name == "" or name in outer:
                        sources.append(outer.get(name, ""))
                    elif name in small:
                        outer[name] = self.initializer(small[name])
                        sources.append(outer[name])
                    else:
                        sources = None
                        break
            if sources is None:
                kept.append(fields)
                continue
            what = b"".join(bytes(f.raw) for f in fields if f.number not in (NODE_INPUT, NODE_OUTPUT, NODE_NAME))
            key = hashlib.sha1(what + "|".join(sources).encode()).hexdigest()[:16]
            results = [_text(f.value) for f in fields if f.number == NODE_OUTPUT]
            names = [f"shared.{key}.{j}" for j in range(len(results))]
            if key not in self._made:
                self._made.add(key)
                self.nodes.append(_message(GRAPH_NODE, b"".join(_string(NODE_INPUT, n) for n in sources)
                                           + b"".join(_string(NODE_OUTPUT, n) for n in names)
                                           + _string(NODE_NAME, "shared." + key) + what))
            outer.update(zip(results, names))
        return kept, outer


def stitch(block: Block, layer_files: list[tuple[str, bytes]], io: dict, kv_shape: tuple[int, int]) -> bytes:
    """The block's ModelProto bytes from its layers' files (name and contents, in order).

    ``io`` is the manifest's layer I/O (input and output names); ``kv_shape`` is (Hkv, D), the
    shape of a skipped layer's empty key and value after [0, 1]. The weights are references to
    the layer files, to be found in the export's directory."""
    inputs, outputs = io["inputs"], io["outputs"]  # outputs: hidden_out, key, value
    shared = [n for n in inputs if n not in ("hidden", "past_key", "past_value")]
    opsets, nodes, initializers, graph_inputs, graph_outputs, ir_version = [], [], [], [], [], None
    shared_work = _Shared(shared)
    previous = "block.hidden"
    for index, (location, contents) in zip(block.layers, layer_files):
        model = _fields(memoryview(contents))
        ir_version = ir_version or _first(model, MODEL_IR_VERSION)
        opsets += [bytes(f.raw) for f in model if f.number == MODEL_OPSET and bytes(f.raw) not in opsets]
        graph_field = next(f for f in model if f.number == MODEL_GRAPH)
        graph = _fields(graph_field.value, graph_field.offset)
        declared = {_text(_first(_fields(f.value), VALUE_NAME)): f.value for f in graph if f.number == GRAPH_INPUT}
        produced = [f.value for f in graph if f.number == GRAPH_OUTPUT]
        missing = set(inputs) - set(declared)
        if missing or len(produced) != len(outputs):
            raise ValueError(f"layer {index}'s graph does not have the manifest's I/O ({', '.join(sorted(missing))})")
        p = f"l{index}."
        if index == block.first:
            graph_inputs += [_renamed(declared["hidden"], "block.hidden")] + [declared[n] for n in shared]
        graph_inputs += [_value(p + "run", BOOL, scalar=True), _renamed(declared["past_key"], p + "past_key"),
                         _renamed(declared["past_value"], p + "past_value")]
        elem = _elem_type(produced[1])
        # then: the layer's own nodes, its inputs now read from the block through Identity nodes
        # and its weights from the block's initializers: onnxruntime frees an initializer once
        # the kernels have pre-packed it only when it lives in the outer graph (kept inside the
        # branch, every weight stayed resident twice: 1.3 GB instead of 0.5 for SmolLM2).
        tensors = {}
        for f in graph:
            if f.number == GRAPH_INITIALIZER:
                tensor = _fields(f.value, f.offset)
                tensors[_text(_first(tensor, TENSOR_NAME))] = tensor
            elif f.number in GRAPH_UNSUPPORTED:
                raise ValueError(f"layer {index}'s graph holds graph field {f.number}, which blocks do not carry")
        small = {name: t for name, t in tensors.items() if len(_first(t, TENSOR_RAW) or b"") < EXTERNAL_MIN}
        kept, names = shared_work.layer([_fields(f.value) for f in graph if f.number == GRAPH_NODE], small)
        read = {_text(i.value) for node in kept for i in node if i.number == NODE_INPUT}
        for name, tensor in tensors.items():
            if name in read and name not in names:
                names[name] = p + name
                initializers.append(_message(GRAPH_INITIALIZER, _initializer(tensor, p + name, location)))
        feeds = {"hidden": previous, "past_key": p + "past_key", "past_value": p + "past_value"}
        then = (b"".join(_node("Identity", [source], [local], f"{p}in.{local}") for local, source in feeds.items())
                + b"".join(_renamed_inputs(node, names) for node in kept)
                + b"".join(f.raw for f in graph if f.number == GRAPH_OUTPUT)
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
    body = (b"".join(shared_work.nodes) + b"".join(nodes) + b"".join(shared_work.initializers) + b"".join(initializers)
            + _string(GRAPH_NAME, f"layers_{block.first}_{block.last}")
            + b"".join(_message(GRAPH_INPUT, v) for v in graph_inputs)
            + b"".join(_message(GRAPH_OUTPUT, v) for v in graph_outputs))
    return _int(MODEL_IR_VERSION, ir_version) + b"".join(opsets) + _message(MODEL_GRAPH, body)


def read_block(block: Block, paths: list[Path], io: dict, kv_shape: tuple[int, int]) -> bytes:
    """The block's graph, weights by reference to the layer files (which must sit together, in
    the directory the session is told to read external data from)."""
    return stitch(block, [(paths[i].name, paths[i].read_bytes()) for i in block.layers], io, kv_shape)
