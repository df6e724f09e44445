"""onnxruntime backend (CPU execution provider): zero-copy IOBinding into a preallocated cache.

Keys and values are bound as raw pointers: ``past_key`` to the valid prefix ``buf[:P]`` of a
sequence-major buffer, the ``key`` output straight into the slot ``buf[P:P+T]``. Nothing is
concatenated or copied per step.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import BackendError
from ..manifest import Manifest
from .base import Engine, KVCache

_NP = {"float32": np.float32, "float16": np.float16}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One session per graph: spinning thread pools would fight each other (measured 6x slower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        super().__init__(manifest)
        self.dtype = _NP[manifest.dtype]
        providers = providers or ["CPUExecutionProvider"]
        options = session_options(threads)
        try:
            self.embed_session = ort.InferenceSession(str(manifest.path("embed")), options, providers=providers)
            self.layer_sessions = [ort.InferenceSession(str(manifest.layer_path(i)), options, providers=providers)
                                   for i in range(self.spec.num_layers)]
            self.head_session = ort.InferenceSession(str(manifest.path("head")), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BackendError(f"onnxruntime cannot load the export {manifest.directory}: {exc}") from None
        self._embed_io = self.embed_session.io_binding()
        self._layer_io = [s.io_binding() for s in self.layer_sessions]
        self._head_io = self.head_session.io_binding()
        self._key_pool: list[np.ndarray] = [np.empty(0, self.dtype) for _ in range(self.spec.num_layers)]
        self._value_pool: list[np.ndarray] = [np.empty(0, self.dtype) for _ in range(self.spec.num_layers)]
        self._buffers: dict[tuple, np.ndarray] = {}

    # -- buffers ---------------------------------------------------------------------------
    def _buffer(self, key: tuple, shape: tuple, dtype) -> np.ndarray:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape:
            buf = self._buffers[key] = np.empty(shape, dtype)
        return buf

    def pooled_bytes(self) -> int:
        return sum(p.nbytes for p in self._key_pool + self._value_pool)

    def allocate(self, capacities: list[int], batch: int) -> KVCache:
        H, D = self.spec.num_heads, self.spec.head_dim
        keys, values = [], []
        for layer, cap in enumerate(capacities):
            need = cap * batch * H * D
            for pool in (self._key_pool, self._value_pool):
                if pool[layer].size < need:
                    pool[layer] = np.empty(need, self.dtype)
            keys.append(self._key_pool[layer][:need].reshape(cap, batch, H, D))
            values.append(self._value_pool[layer][:need].reshape(cap, batch, H, D))
        return KVCache(keys, values, capacities, batch)

    # -- graphs ----------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        B, T = input_ids.shape
        out = self._buffer(("hidden", 0, B, T), (B, T, self.spec.hidden_size), self.dtype)
        ids = np.ascontiguousarray(input_ids, np.int64)
        pos = np.ascontiguousarray(position_ids, np.int64)
        io = self._embed_io
        io.bind_input("input_ids", "cpu", 0, np.int64, [B, T], ids.ctypes.data)
        io.bind_input("position_ids", "cpu", 0, np.int64, [B, T], pos.ctypes.data)
        io.bind_output("hidden", "cpu", 0, self.dtype, out.shape, out.ctypes.data)
        self.embed_session.run_with_iobinding(io)
        return out

    def layer(self, index: int, hidden: np.ndarray, cache: KVCache, past: int,
              attention_bias: np.ndarray) -> np.ndarray:
        B, T, E = hidden.shape
        H, D = self.spec.num_heads, self.spec.head_dim
        keys, values = cache.keys[index], cache.values[index]
        if past + T > cache.capacities[index]:
            raise BackendError(f"layer {index}: writing positions {past}..{past + T - 1} would overflow "
                               f"its cache of {cache.capacities[index]} positions")
        if attention_bias.shape != (B, past + T) or not attention_bias.flags.c_contiguous:
            raise BackendError(f"layer {index}: attention bias must be a contiguous [{B}, {past + T}] array")
        slot = B * H * D * keys.itemsize
        which = 1 if self._buffers.get(("hidden", 1, B, T)) is not hidden else 0
        out = self._buffer(("hidden", which, B, T), (B, T, E), self.dtype)
        io = self._layer_io[index]
        io.bind_input("hidden", "cpu", 0, self.dtype, [B, T, E], hidden.ctypes.data)
        io.bind_input("past_key", "cpu", 0, self.dtype, [past, B, H, D], keys.ctypes.data)
        io.bind_input("past_value", "cpu", 0, self.dtype, [past, B, H, D], values.ctypes.data)
        io.bind_input("attention_bias", "cpu", 0, np.float32, [B, past + T], attention_bias.ctypes.data)
        io.bind_output("hidden_out", "cpu", 0, self.dtype, [B, T, E], out.ctypes.data)
        io.bind_output("key", "cpu", 0, self.dtype, [T, B, H, D], keys.ctypes.data + past * slot)
        io.bind_output("value", "cpu", 0, self.dtype, [T, B, H, D], values.ctypes.data + past * slot)
        self.layer_sessions[index].run_with_iobinding(io)
        return out

    def head(self, hidden: np.ndarray) -> np.ndarray:
        B = hidden.shape[0]
        last = np.ascontiguousarray(hidden[:, -1, :])
        logits = self._buffer(("logits", B), (B, self.spec.vocab_size), np.float32)
        io = self._head_io
        io.bind_input("hidden", "cpu", 0, self.dtype, list(last.shape), last.ctypes.data)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.head_session.run_with_iobinding(io)
        return logits

    def close(self) -> None:
        self._buffers.clear()
        self._key_pool = self._value_pool = []
