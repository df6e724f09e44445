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

Device memory comes from torch or CuPy (``cuda_memory``), whichever is installed. ``device_id``
(N or "cuda:N"; ``skipdeploy.load(..., device="cuda:N")`` passes N) picks the GPU: its identity
picks the engines, and it is made CUDA's current device (in the calling thread) around every
TensorRT call, so deserialization, contexts, the stream and execution all live on device N.

Every TensorRT call goes through ``trt_call``: a ``RuntimeError`` from the bindings is one
``BackendError`` line naming the graph, the profile and what to do; returned failures (False,
None) are checked too.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest
from ..numerics import numpy_dtype, round_up
from .base import FlatPool, KVCache, StaticEngine, masked_position_bias
from .cuda_memory import CudaMemory, DeviceBuffer, gpu_identity, parse_cuda_device
from .tensorrt_build import (DECODE_PROFILE, PAST_PAD, PREFILL_PROFILE, REBUILD, SEE_MESSAGES, build_engines,
                             find_engines, import_tensorrt, trt_call)

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
    """One deserialized engine and an execution context per optimization profile, on one device."""

    PROFILES = {DECODE_PROFILE: "decode", PREFILL_PROFILE: "prefill"}

    def __init__(self, trt, runtime, path, memory: CudaMemory) -> None:
        self.trt, self.name, self.memory = trt, path.name, memory
        self.device = f"cuda:{memory.device_id}"
        self.rebuild = f"rebuild the engines with `{REBUILD.format(dir=path.parent.parent.parent)} --force`"
        self.run_fix = f"{SEE_MESSAGES}; if they blame the engine, {self.rebuild}"
        data = path.read_bytes()
        with memory.activate():  # an engine lives on the device current while it is deserialized
            self.engine = trt_call(f"to load {path} on {self.device}", self.rebuild, runtime.deserialize_cuda_engine,
                                   data)
        if self.engine is None:
            raise BackendError(f"TensorRT cannot load {path} on {self.device} ({SEE_MESSAGES}); {self.rebuild}")
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
        self.contexts, self.wheres = [], []  # per profile: its context, and how messages name it

    def _profile(self, profile: int) -> str:
        kind = self.PROFILES.get(profile) if len(self.memory_sizes) > 1 else None
        return f"profile {profile}{f' ({kind})' if kind else ''} of {self.name} on {self.device}"

    def attach(self, scratch: DeviceBuffer) -> None:
        """One context per profile, all on the shared activation memory ``scratch``."""
        trt, stream = self.trt, self.memory.stream
        with self.memory.activate():
            for profile in range(len(self.memory_sizes)):
                where = self._profile(profile)
                context = trt_call(f"to create an execution context for {where}",
                                   f"free GPU memory, or {self.rebuild} and a smaller --max-batch/--max-length",
                                   self.engine.create_execution_context,
                                   trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if context is None:
                    raise BackendError(f"TensorRT could not create an execution context for {where} ({SEE_MESSAGES})")
                setter = getattr(context, "set_device_memory", None)
                if setter is not None:
                    trt_call(f"to give activation memory to {where}", SEE_MESSAGES, setter, scratch.ptr, scratch.nbytes)
                else:  # TensorRT 10.0
                    context.device_memory = scratch.ptr
                # Raises in TensorRT 10.16 and 11.1 instead of returning False: both are handled.
                if not trt_call(f"to select {where}", self.rebuild, context.set_optimization_profile_async,
                                profile, stream):
                    raise BackendError(f"TensorRT refused {where}; {self.rebuild}")
                self.contexts.append(context)
                self.wheres.append(where)

    def fits(self, profile: int, shapes: dict[str, tuple]) -> str | None:
        """None when ``shapes`` are inside ``profile``, else which input is out of range."""
        for name, shape in shapes.items():
            lo, _, hi = self.profile_shapes[profile][name]
            if any(not lo[i] <= shape[i] <= hi[i] for i in range(len(shape))):
                return f"{name} {list(shape)} outside [{list(lo)} .. {list(hi)}]"
        return None

    def run(self, profile: int, shapes: dict[str, tuple], addresses: dict[str, int]) -> None:
        context, where = self.contexts[profile], self.wheres[profile]
        with self.memory.activate():
            for name, shape in shapes.items():
                if not trt_call(lambda: f"to set input {name} to {list(shape)} in {where}", self.rebuild,
                                context.set_input_shape, name, shape):
                    raise BackendError(f"TensorRT refused input {name} {list(shape)} in {where}; {self.rebuild}")
            for name, address in addresses.items():
                if not trt_call(lambda: f"to bind {name} in {where}", SEE_MESSAGES, context.set_tensor_address,
                                name, address):
                    raise BackendError(f"TensorRT refused the address of {name} in {where} ({SEE_MESSAGES})")
            if not trt_call(lambda: f"to run {where}", self.run_fix, context.execute_async_v3, self.memory.stream):
                raise BackendError(f"TensorRT could not run {where} ({SEE_MESSAGES})")


class TensorRTEngine(StaticEngine):
    name = "tensorrt"

    def __init__(self, manifest: Manifest, device_id: int | str = 0, build: bool = False, memory: str | None = None,
                 max_batch: int | None = None, max_length: int | None = None, max_prompt: int | None = None,
                 opt_batch: int | None = None) -> None:
        """``build``: build the engines when none fit this GPU (``max_batch`` ... ``opt_batch`` as
        ``build-engines`` takes them); ``memory``: "torch" or "cupy" for the device buffers."""
        super().__init__(manifest)
        device_id = parse_cuda_device(device_id)  # a bad device string is refused before any import
        trt = import_tensorrt()
        self.memory = CudaMemory(device_id, prefer=memory)
        identity = gpu_identity(device_id)  # device N's name and compute capability pick the engines
        try:
            entry = find_engines(manifest, identity, trt.__version__)
        except BackendError:
            if not build:
                raise
            entry = build_engines(manifest.directory, device_id=device_id, max_batch=max_batch, max_length=max_length,
                                  max_prompt=max_prompt, opt_batch=opt_batch)
        self.entry = entry
        self.profile = entry.profile
        self.dtype = numpy_dtype(manifest.dtype)
        self.logger = trt.Logger(trt.Logger.WARNING)
        with self.memory.activate():  # Runtime is a pybind factory: a null runtime is a TypeError there
            self.runtime = trt_call(f"to create a runtime on cuda:{device_id}", "check the NVIDIA driver and that "
                                    "TensorRT supports this GPU", trt.Runtime, self.logger,
                                    errors=(RuntimeError, TypeError))
        self.embed_graph = _Graph(trt, self.runtime, entry.plan("embed"), self.memory)
        self.layer_graphs = [_Graph(trt, self.runtime, entry.plan(f"layer_{i:02d}"), self.memory)
                             for i in range(self.spec.num_layers)]
        self.head_graph = _Graph(trt, self.runtime, entry.plan("head"), self.memory)
        graphs = [self.embed_graph, *self.layer_graphs, self.head_graph]
        # The graphs run one after another on one stream: one activation block serves them all.
        self._scratch = self.memory.alloc(max(max(g.memory_sizes) for g in graphs))
        for graph in graphs:
            graph.attach(self._scratch)
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
        # The masked position in front is read (with zero weight) and must be finite: zeroed at
        # allocation, and again when a buffer comes back for another batch size (FlatPool).
        offset = PAST_PAD * batch * H * D * item
        zeros = np.zeros(offset, np.uint8)
        storage = self._free.lease([(cap + PAST_PAD) * batch * H * D * item for cap in capacities],
                                   lambda b: b.nbytes, lambda n: self.memory.alloc(n, zero=True), layout=batch,
                                   reset=lambda b: self.memory.upload(b, zeros))
        flat_keys, flat_values, _ = storage
        shapes = [(cap, batch, H, D) for cap in capacities]
        return KVCache([DeviceTensor(self.memory, flat, shape, self.dtype, offset)
                        for flat, shape in zip(flat_keys, shapes)],
                       [DeviceTensor(self.memory, flat, shape, self.dtype, offset)
                        for flat, shape in zip(flat_values, shapes)], capacities, batch, storage=storage)

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
        graph.run(0, shapes, addresses)
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
        graph.run(profile, shapes, addresses)
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
        graph.run(0, shapes, {"hidden": address, "logits": out.ptr})
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
