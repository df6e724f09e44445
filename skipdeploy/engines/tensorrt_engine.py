"""TensorRT backend: one engine per graph, device buffers bound by address, one CUDA stream.

Engines come from ``skipdeploy build-engines DIR`` (see ``tensorrt_build``) and are picked for
this GPU and TensorRT version; a mismatch is a one-line error that says how to rebuild. Per
call the runtime sets input shapes (``set_input_shape``), binds every tensor by address
(``set_tensor_address``): ``past_key`` at the start of the layer's cache buffer, the ``key``
output straight into the positions after the valid prefix, and enqueues with ``execute_async_v3`` on
the backend's single stream. Nothing is copied per step but the token ids, positions and bias
(host to device) and the logits (device to host). All execution contexts share one block of
activation memory (they never run at the same time).

Every layer's cache has one masked position in front of position 0 (``PAST_PAD``), so that no
engine ever sees an empty past; the bias gets a masked column in front to match.

Device memory comes from torch or CuPy (``cuda_memory``), whichever is installed.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest
from ..numerics import numpy_dtype, round_up
from .base import FlatPool, KVCache, StaticEngine, masked_position_bias
from .cuda_memory import CudaMemory, DeviceBuffer, gpu_identity
from .tensorrt_build import (DECODE_PROFILE, PAST_PAD, PREFILL_PROFILE, REBUILD, build_engines, find_engines,
                             import_tensorrt)

ALIGNMENT = 256  # bytes; IExecutionContext::setTensorAddress requires it


class DeviceTensor:
    """A typed view of device memory; ``np.asarray(x)`` copies it to the host."""

    def __init__(self, memory: CudaMemory, buffer: DeviceBuffer, shape, dtype, offset: int = 0) -> None:
        self.memory, self.buffer, self.shape, self.dtype, self.offset = memory, buffer, tuple(shape), np.dtype(dtype), offset

    @property
    def ptr(self) -> int:
        return self.buffer.ptr + self.offset

    def __array__(self, dtype=None, copy=None):
        host = np.empty(self.shape, self.dtype)
        self.memory.download(host, self.buffer, self.offset)
        return host if dtype is None else host.astype(dtype)


def _np_dtype(trt, dtype) -> np.dtype:
    mapping = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int8: np.int8,
               trt.bool: np.bool_}
    if hasattr(trt, "int64"):
        mapping[trt.int64] = np.int64
    return np.dtype(mapping[dtype] if dtype in mapping else trt.nptype(dtype))


class _Graph:
    """One deserialized engine and an execution context per optimization profile."""

    def __init__(self, trt, runtime, path) -> None:
        self.trt, self.name = trt, path.name
        try:
            self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        except Exception as exc:  # pybind raises RuntimeError/TypeError on bad plans
            self.engine = None
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            why = "see TensorRT's messages above"
        if self.engine is None:
            raise BackendError(f"TensorRT cannot load {path} ({why}); rebuild the engines with "
                               f"`{REBUILD.format(dir=path.parent.parent.parent)} --force`")
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtypes = {n: _np_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        profiles = range(engine.num_optimization_profiles)
        # The _v2 sizes exist from TensorRT 10.1; 10.0 has the engine-wide device_memory_size.
        if hasattr(engine, "get_device_memory_size_for_profile_v2"):
            self.memory_sizes = [int(engine.get_device_memory_size_for_profile_v2(p)) for p in profiles]
        else:
            size = getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size
            self.memory_sizes = [int(size) for _ in profiles]
        self.profile_shapes = [{n: engine.get_tensor_profile_shape(n, p) for n in self.inputs} for p in profiles]
        self.contexts = []

    def attach(self, scratch: DeviceBuffer, stream: int) -> None:
        """One context per profile, all on the shared activation memory ``scratch``."""
        trt = self.trt
        for profile in range(len(self.memory_sizes)):
            context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise BackendError(f"TensorRT could not create an execution context for {self.name}")
            setter = getattr(context, "set_device_memory", None)
            if setter is not None:
                setter(scratch.ptr, scratch.nbytes)
            else:  # TensorRT 10.0
                context.device_memory = scratch.ptr
            if not context.set_optimization_profile_async(profile, stream):
                raise BackendError(f"TensorRT refused optimization profile {profile} for {self.name}")
            self.contexts.append(context)

    def fits(self, profile: int, shapes: dict[str, tuple]) -> str | None:
        """None when ``shapes`` are inside ``profile``, else which input is out of range."""
        for name, shape in shapes.items():
            lo, _, hi = self.profile_shapes[profile][name]
            if any(not lo[i] <= shape[i] <= hi[i] for i in range(len(shape))):
                return f"{name} {list(shape)} outside [{list(lo)} .. {list(hi)}]"
        return None

    def run(self, profile: int, shapes: dict[str, tuple], addresses: dict[str, int], stream: int) -> None:
        context = self.contexts[profile]
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise BackendError(f"{self.name}: TensorRT refused input shape {name} {list(shape)}")
        for name, address in addresses.items():
            if not context.set_tensor_address(name, address):
                raise BackendError(f"{self.name}: TensorRT refused the address of {name}")
        if not context.execute_async_v3(stream):
            raise BackendError(f"{self.name}: TensorRT execution failed (see TensorRT's messages above)")


class TensorRTEngine(StaticEngine):
    name = "tensorrt"

    def __init__(self, manifest: Manifest, device_id: int = 0, build: bool = False, memory: str | None = None,
                 **build_options) -> None:
        super().__init__(manifest)
        trt = import_tensorrt()
        self.memory = CudaMemory(device_id, prefer=memory)
        identity = gpu_identity(device_id)
        try:
            entry = find_engines(manifest, identity, trt.__version__)
        except BackendError:
            if not build:
                raise
            entry = build_engines(manifest.directory, device_id=device_id, **build_options)
        self.entry = entry
        self.profile = entry.profile
        self.dtype = numpy_dtype(manifest.dtype)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.embed_graph = _Graph(trt, self.runtime, entry.plan("embed"))
        self.layer_graphs = [_Graph(trt, self.runtime, entry.plan(f"layer_{i:02d}"))
                             for i in range(self.spec.num_layers)]
        self.head_graph = _Graph(trt, self.runtime, entry.plan("head"))
        graphs = [self.embed_graph, *self.layer_graphs, self.head_graph]
        # The graphs run one after another on one stream: one activation block serves them all.
        self._scratch = self.memory.alloc(max(max(g.memory_sizes) for g in graphs))
        for graph in graphs:
            graph.attach(self._scratch, self.memory.stream)
        self._free = FlatPool()
        self._buffers: dict[tuple, DeviceBuffer] = {}
        self._bias_host: np.ndarray | None = None
        self._bias: DeviceTensor | None = None

    # -- buffers ---------------------------------------------------------------------------------
    def _buffer(self, key: tuple, nbytes: int) -> DeviceBuffer:
        buf = self._buffers.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = self._buffers[key] = self.memory.alloc(nbytes)
        return buf

    def allocate(self, capacities: list[int], batch: int) -> KVCache:
        H, D = self.spec.kv_heads, self.spec.head_dim
        item = np.dtype(self.dtype).itemsize
        # Zeroed at allocation: the masked position in front is read (with zero weight) and must be finite.
        flat_keys, flat_values = self._free.lease([(cap + PAST_PAD) * batch * H * D * item for cap in capacities],
                                                  lambda b: b.nbytes, lambda n: self.memory.alloc(n, zero=True))
        offset = PAST_PAD * batch * H * D * item
        shapes = [(cap, batch, H, D) for cap in capacities]
        return KVCache([DeviceTensor(self.memory, flat, shape, self.dtype, offset)
                        for flat, shape in zip(flat_keys, shapes)],
                       [DeviceTensor(self.memory, flat, shape, self.dtype, offset)
                        for flat, shape in zip(flat_values, shapes)], capacities, batch, storage=(flat_keys, flat_values))

    def release(self, cache: KVCache) -> None:
        self._free.give(cache)

    def from_numpy(self, array: np.ndarray) -> DeviceTensor:
        return self._device(array)

    def _device(self, hidden) -> DeviceTensor:
        if isinstance(hidden, DeviceTensor):
            return hidden
        array = np.ascontiguousarray(hidden, self.dtype)  # host hidden states (e.g. from verify)
        buf = self._buffer(("upload", array.shape), array.nbytes)
        self.memory.upload(buf, array)
        return DeviceTensor(self.memory, buf, array.shape, self.dtype)

    def _upload_bias(self, attention_bias: np.ndarray) -> DeviceTensor:
        if self._bias_host is not None and self._bias_host.shape == attention_bias.shape \
                and np.array_equal(self._bias_host, attention_bias):
            return self._bias
        self._bias_host = np.array(attention_bias, np.float32, copy=True)
        padded = masked_position_bias(self._bias_host, PAST_PAD)
        buf = self._buffer(("bias",), padded.nbytes)
        self.memory.upload(buf, padded)
        self._bias = DeviceTensor(self.memory, buf, padded.shape, np.float32)
        return self._bias

    def _hidden_out(self, which: int, B: int, T: int) -> DeviceTensor:
        shape = (B, T, self.spec.hidden_size)
        buf = self._buffer(("hidden", which), int(np.prod(shape)) * np.dtype(self.dtype).itemsize)
        return DeviceTensor(self.memory, buf, shape, self.dtype)

    # -- graphs ----------------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray) -> DeviceTensor:
        B, T = input_ids.shape
        graph = self.embed_graph
        shapes = {"input_ids": (B, T)}
        ids = np.ascontiguousarray(input_ids, graph.dtypes["input_ids"])
        ids_buf = self._buffer(("ids",), ids.nbytes)
        self.memory.upload(ids_buf, ids)
        out = self._hidden_out(0, B, T)
        addresses = {"input_ids": ids_buf.ptr, "hidden": out.ptr}
        if self.manifest.embed_takes_positions:
            shapes["position_ids"] = (B, T)
            addresses["position_ids"] = self._upload_positions(position_ids, graph).ptr
        self._check(graph, 0, shapes, "prompt chunk", "--max-prompt/--max-batch")
        graph.run(0, shapes, addresses, self.memory.stream)
        return out

    def _upload_positions(self, positions: np.ndarray, graph):
        pos = np.ascontiguousarray(positions, graph.dtypes["position_ids"])
        buf = self._buffer(("positions",), pos.nbytes)
        self.memory.upload(buf, pos)
        return buf

    def _layer(self, index: int, hidden, cache: KVCache, past: int, attention_bias: np.ndarray,
               positions: np.ndarray | None) -> DeviceTensor:
        hidden = self._device(hidden)
        B, T, E = hidden.shape
        H, D = self.spec.kv_heads, self.spec.head_dim
        P = past + PAST_PAD
        profile = DECODE_PROFILE if T == 1 else PREFILL_PROFILE
        shapes = {"hidden": (B, T, E), "past_key": (P, B, H, D), "past_value": (P, B, H, D),
                  "attention_bias": (B, P + T)}
        graph = self.layer_graphs[index]
        self._check(graph, profile, shapes, "decode step" if T == 1 else "prompt chunk",
                    "--max-length/--max-batch" if T == 1 else "--max-prompt/--max-batch")
        position = B * H * D * np.dtype(self.dtype).itemsize  # bytes of one cache position
        keys, values = cache.keys[index].buffer.ptr, cache.values[index].buffer.ptr
        bias = self._upload_bias(attention_bias)
        which = 1 if hidden.buffer is not self._buffers.get(("hidden", 1)) else 0
        out = self._hidden_out(which, B, T)
        addresses = {"hidden": hidden.ptr, "past_key": keys, "past_value": values, "attention_bias": bias.ptr,
                     "hidden_out": out.ptr, "key": keys + P * position, "value": values + P * position}
        if self.manifest.layers_take_positions:
            shapes["position_ids"] = (B, T)
            addresses["position_ids"] = self._upload_positions(positions, graph).ptr
        staged = (P * position) % ALIGNMENT != 0  # TensorRT wants 256-byte aligned tensor addresses
        if staged:  # rare (hidden size x dtype not a multiple of 256 bytes): write aside, then copy in
            new = T * position
            stage = self._buffer(("stage",), 2 * round_up(new, ALIGNMENT))
            addresses["key"], addresses["value"] = stage.ptr, stage.ptr + round_up(new, ALIGNMENT)
        graph.run(profile, shapes, addresses, self.memory.stream)
        if staged:
            self.memory.copy(cache.keys[index].buffer, P * position, stage, 0, new)
            self.memory.copy(cache.values[index].buffer, P * position, stage, round_up(new, ALIGNMENT), new)
        return out

    def head(self, hidden) -> np.ndarray:
        hidden = self._device(hidden)
        B, T, E = hidden.shape
        item = np.dtype(self.dtype).itemsize
        if T == 1:
            address = hidden.ptr
        else:  # the last position of each row, packed [B, E]
            last = self._buffer(("last",), B * E * item)
            self.memory.copy_rows(last, hidden.buffer, hidden.offset + (T - 1) * E * item, E * item, T * E * item, B)
            address = last.ptr
        graph = self.head_graph
        shapes = {"hidden": (B, E)}
        self._check(graph, 0, shapes, "batch", "--max-batch")
        V = self.spec.vocab_size
        out = self._buffer(("logits",), B * V * 4)
        graph.run(0, shapes, {"hidden": address, "logits": out.ptr}, self.memory.stream)
        logits = self._host_logits(B)
        return self.memory.download(logits, out)  # waits for the stream

    def _host_logits(self, B: int) -> np.ndarray:
        buf = self._buffers.get(("host_logits", B))
        if buf is None:
            buf = self._buffers[("host_logits", B)] = np.empty((B, self.spec.vocab_size), np.float32)
        return buf

    def _check(self, graph: _Graph, profile: int, shapes: dict, what: str, flags: str) -> None:
        problem = graph.fits(profile, shapes)
        if problem:
            raise BackendError(f"this {what} does not fit the TensorRT engines' profile ({graph.name}: {problem}); "
                               f"rebuild them with `{REBUILD.format(dir=self.manifest.directory)} --force` and "
                               f"larger {flags}")

    def available_memory(self) -> int | None:
        return self.memory.free_bytes() + self._free.held_bytes(lambda b: b.nbytes)

    def close(self) -> None:
        self.memory.synchronize()
        self._buffers.clear()
        self._free.clear()


__all__ = ["TensorRTEngine"]
