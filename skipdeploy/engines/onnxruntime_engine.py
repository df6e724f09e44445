"""onnxruntime backend (CPU execution provider): zero-copy IOBinding into a preallocated cache.

Keys and values are bound as raw pointers: ``past_key`` to the valid prefix ``buf[:P]`` of a
sequence-major buffer, the ``key`` output straight into the positions after it, ``buf[P:P+T]``.
Nothing is concatenated or copied per step, and hidden states and logits live in buffers reused
from step to step. ``OnnxRuntimeGraphs`` (embed, head, buffers) is shared with the in-flight
engine (``onnxruntime_inflight``), which loads other layer sessions.

Performance notes (measured on 2 cores, see BENCHMARKS.md): one session for the embedding, one
for the head and one for the layers (stitched into one graph by ``layer_blocks``, so a step's
layers take one Run()), each with its own thread pool that spins only while its Run() lasts
(pools that kept spinning between runs were 1.6-2.4x slower here, 6x in an earlier probe; no
spinning at all was 2-8% slower) and hands out
dynamic block sizes in parallel loops; graphs optimized at ORT_ENABLE_ALL at load; the LM head
is its own graph run on the last position only; one CPU arena shared by all sessions; sessions
are created largest-first (the head), returning freed heap to the OS after each, so that the
transient copy onnxruntime makes while pre-packing a graph's weights costs least and the peak
resident memory stays close to the steady one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from abc import abstractmethod

import numpy as np
import onnxruntime as ort

from ..errors import BackendError, InputError
from ..manifest import LAYER_IO, Manifest
from ..numerics import numpy_dtype
from .base import Engine, FlatPool, KVCache, StaticEngine
from .layer_blocks import plan_blocks, read_block


def session_options(threads: int | None = None, shared_arena: bool = False,
                    model_dir: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One session per graph: pools that keep spinning after their Run() fight the next graph's
    # pool (measured 1.6-2.4x slower). Spinning only inside a Run() (force_spinning_stop) wakes the
    # worker faster for each operator: 2-8% faster than no spinning, also with another process
    # busy on the cores (BENCHMARKS.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # Parallel loops hand out shrinking blocks of work instead of fixed ones: 2-8% faster here.
    options.add_session_config_entry("session.dynamic_block_base", "4")
    if shared_arena and _register_shared_arena():
        # The graphs run one after another, so one arena for all of them holds the largest
        # graph's scratch memory, not the sum over 14 graphs (measured: -200 MB at batch 8).
        options.add_session_config_entry("session.use_env_allocators", "1")
    if model_dir:  # where a graph loaded from bytes (a block of layers) finds its external weights
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", model_dir)
    return options


_ARENA_LOCK = threading.Lock()
_ARENA: bool | None = None


def _register_shared_arena() -> bool:
    """Register one CPU arena allocator in onnxruntime's process-wide environment (once)."""
    global _ARENA
    with _ARENA_LOCK:
        if _ARENA is None:
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
                _ARENA = True
            except Exception:  # an onnxruntime without the API: per-session arenas
                _ARENA = False
        return _ARENA


def _libc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_heap() -> None:
    """Return the heap pages that loading a graph freed (its protobuf, pre-packing scratch) to the
    OS. glibc keeps them otherwise: 12 opt-125m layers held 135 MB of such pages."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class PointerBinding:
    """Binds host pointers to one session's inputs and outputs and runs it.

    onnxruntime's Python ``IOBinding`` builds an ``OrtDevice`` on every bind and checks for
    WebGPU graph capture on every run: 3-5 us a call, and a decode step at batch 8 makes 84 binds
    and 14 runs (measured: ~2% of a step). This keeps one device object and calls the bound C++
    binding directly, falling back to the public API where those internals are absent.
    """

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session, self._io = session, session.io_binding()
        device = ort.OrtDevice.make("cpu", 0)
        raw_session, raw_io = getattr(session, "_sess", None), getattr(self._io, "_iobinding", None)
        self._fast = raw_session is not None and raw_io is not None and hasattr(device, "_get_c_device")
        if self._fast:
            self._raw_session, self._raw_io, self._device = raw_session, raw_io, device._get_c_device()

    def input(self, name: str, dtype, shape, pointer: int) -> None:
        if self._fast:
            self._raw_io.bind_input(name, self._device, dtype, shape, pointer)
        else:
            self._io.bind_input(name, "cpu", 0, dtype, shape, pointer)

    def output(self, name: str, dtype, shape, pointer: int) -> None:
        if self._fast:
            self._raw_io.bind_output(name, self._device, dtype, shape, pointer)
        else:
            self._io.bind_output(name, "cpu", 0, dtype, shape, pointer)

    def clear_outputs(self) -> None:
        (self._raw_io if self._fast else self._io).clear_binding_outputs()

    def run(self) -> None:
        if self._fast:
            self._raw_session.run_with_iobinding(self._raw_io, None)
        else:
            self._session.run_with_iobinding(self._io)


class OnnxRuntimeGraphs(Engine):
    """What both onnxruntime engines share: the export's embed and head sessions, the reused
    host buffers, and the loading order. A subclass loads its own layer sessions
    (``_load_layers``)."""

    name = "onnxruntime"

    def __init__(self, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        super().__init__(manifest)
        self.dtype = numpy_dtype(manifest.dtype)
        providers = providers or ["CPUExecutionProvider"]
        options = session_options(threads, shared_arena=providers == ["CPUExecutionProvider"],
                                  model_dir=str(manifest.directory))

        def session(path_or_bytes) -> ort.InferenceSession:
            source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
            loaded = ort.InferenceSession(source, options, providers=providers)
            if isinstance(source, bytes) and getattr(loaded, "_model_bytes", None) is source:
                # Kept by onnxruntime for a provider fallback the CPU never takes: for the
                # in-flight engine's layer graphs, a second copy of their weights.
                loaded._model_bytes = None
            release_free_heap()  # before the next graph, so the peak stays near the steady size
            return loaded

        try:
            # Largest first: pre-packing copies a graph's weights once while loading it, and
            # that transient copy costs least while the process is small.
            self.head_session = session(manifest.path("head"))
            self.embed_session = session(manifest.path("embed"))
            self._load_layers(session)
        except BackendError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BackendError(f"onnxruntime cannot load the export {manifest.directory}: {exc}") from None
        self._embed_io = PointerBinding(self.embed_session)
        self._head_io = PointerBinding(self.head_session)
        self._buffers: dict[tuple, np.ndarray] = {}

    @abstractmethod
    def _load_layers(self, session) -> None:
        """Load this engine's layer sessions (``session(path_or_bytes)`` loads one)."""

    def _buffer(self, key: tuple, shape: tuple, dtype) -> np.ndarray:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape:
            buf = self._buffers[key] = np.empty(shape, dtype)
        return buf

    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        B, T = input_ids.shape
        out = self._buffer(("hidden", 0, B, T), (B, T, self.spec.hidden_size), self.dtype)
        ids = np.ascontiguousarray(input_ids, np.int64)
        pos = np.ascontiguousarray(position_ids, np.int64)
        io = self._embed_io
        io.input("input_ids", np.int64, [B, T], ids.ctypes.data)
        if self.manifest.embed_takes_positions:
            io.input("position_ids", np.int64, [B, T], pos.ctypes.data)
        io.output("hidden", self.dtype, out.shape, out.ctypes.data)
        io.run()
        return out

    def head(self, hidden: np.ndarray) -> np.ndarray:
        B = hidden.shape[0]
        last = np.ascontiguousarray(hidden[:, -1, :])
        logits = self._buffer(("logits", B), (B, self.spec.vocab_size), np.float32)
        io = self._head_io
        io.input("hidden", self.dtype, list(last.shape), last.ctypes.data)
        io.output("logits", np.float32, list(logits.shape), logits.ctypes.data)
        io.run()
        return logits

    def close(self) -> None:
        self._buffers.clear()


class OnnxRuntimeEngine(OnnxRuntimeGraphs, StaticEngine):
    """Static decoding: the export's layer graphs stitched into blocks (``layer_blocks``), one
    session each, so that the layers a step runs in a block take one ``Run()``."""

    def __init__(self, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None, block_layers: int | None = None) -> None:
        if block_layers is not None and (isinstance(block_layers, bool) or not isinstance(block_layers, int)
                                         or block_layers < 1):
            raise InputError(f"block_layers must be a number of layers >= 1 (1: a session per layer) or None "
                             f"(all layers in one session), not {block_layers!r}")
        self._block_layers = block_layers
        super().__init__(manifest, threads=threads, providers=providers)
        self._free = FlatPool()

    def _load_layers(self, session) -> None:
        spec, manifest = self.spec, self.manifest
        paths = [manifest.layer_path(i) for i in range(spec.num_layers)]
        io = {"inputs": manifest.graphs["layers"][0].get("inputs", LAYER_IO["inputs"]), "outputs": LAYER_IO["outputs"]}
        self.blocks = plan_blocks(spec.num_layers, self._block_layers)
        self.block_sessions = [session(read_block(block, paths, io, (spec.kv_heads, spec.head_dim)))
                               for block in self.blocks]
        self._block_io = [PointerBinding(s) for s in self.block_sessions]
        self._run_flags = np.zeros(spec.num_layers, np.bool_)  # each layer's ``l{i}.run`` scalar
        self._names = [tuple(f"l{i}.{n}" for n in ("run", "past_key", "past_value", "key", "value"))
                       for i in range(spec.num_layers)]

    def allocate(self, capacities: list[int], batch: int) -> KVCache:
        H, D = self.spec.kv_heads, self.spec.head_dim
        # Nothing is read before it is written here (the past is bound to its valid prefix).
        storage = self._free.lease([cap * batch * H * D for cap in capacities], lambda b: b.size,
                                   lambda n: np.empty(n, self.dtype))
        flat_keys, flat_values, _ = storage
        shapes = [(cap, batch, H, D) for cap in capacities]
        return KVCache([flat[:int(np.prod(shape))].reshape(shape) for flat, shape in zip(flat_keys, shapes)],
                       [flat[:int(np.prod(shape))].reshape(shape) for flat, shape in zip(flat_values, shapes)],
                       capacities, batch, storage=storage)

    def release(self, cache: KVCache) -> None:
        self._free.give(cache)

    def _layer(self, index: int, hidden: np.ndarray, cache: KVCache, past: int,
               attention_bias: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
        return self._layers([index], hidden, cache, past, attention_bias, positions)

    def _layers(self, indices: list[int], hidden: np.ndarray, cache: KVCache, past: int,
                attention_bias: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
        B, T, E = hidden.shape
        H, D = self.spec.kv_heads, self.spec.head_dim
        position = B * H * D * np.dtype(self.dtype).itemsize  # bytes of one cache position
        flags = self._run_flags
        flags[:] = False
        flags[indices] = True
        for block, io in zip(self.blocks, self._block_io):
            if not flags[block.first:block.last + 1].any():
                continue
            which = 1 if self._buffers.get(("hidden", 1, B, T)) is not hidden else 0
            out = self._buffer(("hidden", which, B, T), (B, T, E), self.dtype)
            io.clear_outputs()  # a layer skipped now may have run in the last call
            io.input("block.hidden", self.dtype, [B, T, E], hidden.ctypes.data)
            if self.manifest.layers_take_positions:  # then StaticEngine.layers has checked them
                io.input("position_ids", np.int64, [B, T], positions.ctypes.data)
            io.input("attention_bias", np.float32, [B, past + T], attention_bias.ctypes.data)
            for i in block.layers:
                keys, values = cache.keys[i], cache.values[i]
                run, past_key, past_value, key, value = self._names[i]
                ran = bool(flags[i])
                io.input(run, np.bool_, [], flags.ctypes.data + i)
                # A skipped layer's past is never read: bound empty, whatever its cache holds.
                io.input(past_key, self.dtype, [past if ran else 0, B, H, D], keys.ctypes.data)
                io.input(past_value, self.dtype, [past if ran else 0, B, H, D], values.ctypes.data)
                if ran:
                    io.output(key, self.dtype, [T, B, H, D], keys.ctypes.data + past * position)
                    io.output(value, self.dtype, [T, B, H, D], values.ctypes.data + past * position)
            io.output(block.hidden_out, self.dtype, [B, T, E], out.ctypes.data)
            io.run()
            hidden = out
        return hidden

    def close(self) -> None:
        super().close()
        self._free.clear()
