"""onnxruntime for in-flight batching: each layer split around its attention (``slot_graphs``).

The embedding and LM head are the export's own graphs; every decoder layer becomes a
``layer_in`` and a ``layer_out`` session cut in memory out of the export's own layer graph (its
nodes as the static path runs them: float32, int8 or int4 weights alike; an export from before
the cut's tensor names has its float layers rebuilt from their weights), and one weightless
``slot_attention`` session (onnxruntime's GroupQueryAttention) serves all layers. The slot cache
is one numpy buffer per layer for keys and one for values, [rows, H, C, D]; a run of consecutive
slots is bound in place, and the attention writes the new keys and values straight into it
(``present_*`` bound to the past's memory). Nothing in a step copies the cache.

Only the layer sessions differ from ``OnnxRuntimeEngine`` (both build on ``OnnxRuntimeGraphs``),
so the weights are pre-packed once: no session of the monolithic layer graphs is made.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import BackendError
from ..exporter.slot_graphs import build_layer_in, build_layer_out, build_slot_attention, cut_layer
from ..families.weights import read_layer_weights
from ..manifest import Manifest
from .base import InflightEngine, SlotCache
from .onnxruntime_engine import OnnxRuntimeGraphs, PointerBinding


class InflightOnnxRuntimeEngine(OnnxRuntimeGraphs, InflightEngine):
    """In-flight batching on onnxruntime (CPU): split layer sessions over a numpy slot cache."""

    def __init__(self, manifest: Manifest, threads: int | None = None) -> None:
        if manifest.dtype != "float32":  # activations and cache; the weights may be quantized
            raise BackendError(f"in-flight batching on onnxruntime runs float32 exports (float32, int8 or int4 "
                               f"weights); {manifest.directory} is {manifest.dtype}")
        super().__init__(manifest, threads=threads)
        spec = self.spec
        # Row widths of layer_in's outputs and of the attention's inputs and output.
        self._widths = {"query": spec.attention_dim, "key": spec.kv_dim, "value": spec.kv_dim,
                        "context": spec.attention_dim}

    def _load_layers(self, session) -> None:
        spec, manifest, opset = self.spec, self.manifest, self.manifest.opset
        self.in_sessions, self.out_sessions = [], []
        for i in range(spec.num_layers):
            parts = cut_layer(onnx.load(str(manifest.layer_path(i))), spec, manifest.dtype)
            if parts is None:  # an export from before the cut's names: its float weights, rebuilt
                if manifest.quantization:
                    raise BackendError(f"{manifest.layer_path(i)} names no tensors to cut for in-flight batching "
                                       "(an export from an older skipdeploy): re-export and quantize again")
                weights = read_layer_weights(manifest.layer_path(i), spec, purpose="in-flight batching")
                parts = (build_layer_in(spec, weights, manifest.dtype, opset),
                         build_layer_out(spec, weights, manifest.dtype, opset))
                del weights
            self.in_sessions.append(session(parts[0].SerializeToString()))
            self.out_sessions.append(session(parts[1].SerializeToString()))
            del parts
        self.attention_session = session(build_slot_attention(spec, manifest.dtype, opset).SerializeToString())
        self._in_io = [PointerBinding(s) for s in self.in_sessions]
        self._out_io = [PointerBinding(s) for s in self.out_sessions]
        self._attention_io = PointerBinding(self.attention_session)

    def allocate_slots(self, rows: int, capacity: int) -> SlotCache:
        H, D = self.spec.kv_heads, self.spec.head_dim
        # Zeroed: GroupQueryAttention reads only each row's own positions, but finite memory keeps
        # any kernel that touches the whole capacity from meeting NaN.
        shape = (rows, H, capacity, D)
        return SlotCache([np.zeros(shape, self.dtype) for _ in range(self.spec.num_layers)],
                         [np.zeros(shape, self.dtype) for _ in range(self.spec.num_layers)], rows, capacity)

    def layer_in(self, index: int, hidden: np.ndarray, positions: np.ndarray):
        hidden = np.ascontiguousarray(hidden, self.dtype)
        N, E = hidden.shape
        outs = {name: self._buffer((name, N), (N, self._widths[name]), self.dtype)
                for name in ("query", "key", "value")}
        io = self._in_io[index]
        io.input("hidden", self.dtype, [N, E], hidden.ctypes.data)
        if self.manifest.layers_take_positions:
            positions = np.ascontiguousarray(positions, np.int64)
            if positions.shape != (N,):
                raise BackendError(f"layer {index}: {positions.shape} positions for {N} rows")
            io.input("position_ids", np.int64, [N], positions.ctypes.data)
        for name, out in outs.items():
            io.output(name, self.dtype, list(out.shape), out.ctypes.data)
        io.run()
        return outs["query"], outs["key"], outs["value"]

    def attend(self, index: int, query, key, value, context, cache: SlotCache, first: int, cached: np.ndarray,
               new: int) -> None:
        B = len(cached)
        H, D, C = self.spec.kv_heads, self.spec.head_dim, cache.capacity
        self.check_slots(index, cache, first, cached, new)
        widths = self._widths
        for (name, width), rows in zip(widths.items(), (query, key, value, context)):
            if rows.shape != (B * new, width) or not rows.flags.c_contiguous:
                raise BackendError(f"layer {index}: attention {name} rows must be a contiguous [{B * new}, {width}] "
                                   "array")
        seqlens = (np.asarray(cached, np.int32) + (new - 1)).astype(np.int32)
        total = np.array(int(np.max(cached)) + new, np.int32)
        slot = H * C * D * np.dtype(self.dtype).itemsize  # bytes of one request's row
        keys = cache.keys[index].ctypes.data + first * slot
        values = cache.values[index].ctypes.data + first * slot
        io = self._attention_io
        for name, rows in (("query", query), ("key", key), ("value", value)):
            io.input(name, self.dtype, [B, new, widths[name]], rows.ctypes.data)
        io.input("past_key", self.dtype, [B, H, C, D], keys)
        io.input("past_value", self.dtype, [B, H, C, D], values)
        io.input("seqlens_k", np.int32, [B], seqlens.ctypes.data)
        io.input("total_sequence_length", np.int32, [], total.ctypes.data)
        io.output("context", self.dtype, [B, new, widths["context"]], context.ctypes.data)
        io.output("present_key", self.dtype, [B, H, C, D], keys)
        io.output("present_value", self.dtype, [B, H, C, D], values)
        io.run()

    def layer_out(self, index: int, hidden: np.ndarray, context: np.ndarray) -> np.ndarray:
        hidden = np.ascontiguousarray(hidden, self.dtype)
        N, E = hidden.shape
        out = np.empty((N, E), self.dtype)  # the caller keeps it: a fresh array, not a reused buffer
        io = self._out_io[index]
        io.input("hidden", self.dtype, [N, E], hidden.ctypes.data)
        io.input("context", self.dtype, [N, self.spec.attention_dim], context.ctypes.data)
        io.output("hidden_out", self.dtype, [N, E], out.ctypes.data)
        io.run()
        return out
