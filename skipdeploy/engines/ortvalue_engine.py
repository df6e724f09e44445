"""onnxruntime with the cache as OrtValues on the session's device (CUDA, or CPU for testing).

The CUDA execution provider (onnxruntime-gpu) is the target: every layer's key and value
buffers are OrtValues allocated once on the GPU, and each call binds ``past_key`` to the valid
prefix of the buffer and the ``key``/``value`` outputs straight into the positions after it, by device
pointer, through IOBinding (DESIGN.md section 4). Hidden states stay on the device between
graphs; token ids, positions and the attention bias are bound from the host (onnxruntime copies
them to the device), logits come back into a host buffer.

The same code runs with ``device="cpu"`` (OrtValues in host memory), which is how its logic is
tested on machines without a GPU. A CUDA session is accepted only when onnxruntime really runs
it with the CUDA provider: onnxruntime silently falls back to the CPU when the CUDA libraries
are missing, so the session's own providers are checked, not the available list.

``pad_past`` (the default on CUDA) keeps one masked position in front of every layer's cache, so
that no graph ever sees an empty past (P = 0 is fine on the CPU provider, a known hazard on GPU
providers); the attention bias gets a masked column in front to match (``masked_position_bias``).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import BackendError
from ..manifest import Manifest
from ..numerics import numpy_dtype
from .base import FlatPool, KVCache, StaticEngine, masked_position_bias
from .onnxruntime_engine import session_options


class DeviceArray:
    """An OrtValue (or a window of one) that numpy can read: ``np.asarray(x)`` copies to the host."""

    def __init__(self, value: "ort.OrtValue", shape: tuple[int, ...], dtype, offset_bytes: int = 0) -> None:
        self.value, self.shape, self.dtype, self.offset = value, tuple(shape), np.dtype(dtype), offset_bytes

    @property
    def ptr(self) -> int:
        return self.value.data_ptr() + self.offset

    def __array__(self, dtype=None, copy=None):
        flat = self.value.numpy().reshape(-1).view(np.uint8)
        size = int(np.prod(self.shape)) * self.dtype.itemsize
        array = flat[self.offset:self.offset + size].view(self.dtype).reshape(self.shape).copy()
        return array if dtype is None else array.astype(dtype)


def cuda_provider_usable(path, device_id: int = 0) -> tuple[bool, str]:
    """Whether onnxruntime really runs ``path`` on the CUDA provider here, and why not."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, (f"onnxruntime {ort.__version__} has no CUDA execution provider "
                       "(install onnxruntime-gpu instead of onnxruntime)")
    try:
        session = ort.InferenceSession(str(path), session_options(),
                                       providers=[("CUDAExecutionProvider", {"device_id": device_id}),
                                                  "CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types
        return False, f"onnxruntime cannot create a CUDA session: {str(exc).splitlines()[0]}"
    if "CUDAExecutionProvider" not in session.get_providers():
        return False, ("onnxruntime fell back to the CPU: its CUDA provider could not load the CUDA/cuDNN "
                       "libraries it needs (see onnxruntime's install matrix for your onnxruntime-gpu)")
    return True, ""


class OrtValueEngine(StaticEngine):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, device: str = "cuda", device_id: int = 0, threads: int | None = None,
                 pad_past: bool | None = None) -> None:
        super().__init__(manifest)
        if device not in ("cpu", "cuda"):
            raise BackendError(f"the onnxruntime backend runs on 'cpu' or 'cuda' (got {device!r})")
        self.device, self.device_id = device, device_id
        self.dtype = numpy_dtype(manifest.dtype)
        self.pad = int(device == "cuda" if pad_past is None else pad_past)
        if device == "cuda":
            ok, why = cuda_provider_usable(manifest.path("embed"), device_id)
            if not ok:
                raise BackendError(f"the onnxruntime backend on cuda is not usable here: {why}")
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = session_options(threads)
        try:
            self.embed_session = ort.InferenceSession(str(manifest.path("embed")), options, providers=providers)
            self.layer_sessions = [ort.InferenceSession(str(manifest.layer_path(i)), options, providers=providers)
                                   for i in range(self.spec.num_layers)]
            self.head_session = ort.InferenceSession(str(manifest.path("head")), options, providers=providers)
        except Exception as exc:
            raise BackendError(f"onnxruntime cannot load the export {manifest.directory}: {exc}") from None
        if device == "cuda":
            for session in [self.embed_session, *self.layer_sessions, self.head_session]:
                if "CUDAExecutionProvider" not in session.get_providers():
                    raise BackendError("onnxruntime fell back to the CPU for a graph of this export; "
                                       "the CUDA execution provider is not usable here")
        self._embed_io = self.embed_session.io_binding()
        self._layer_io = [s.io_binding() for s in self.layer_sessions]
        self._head_io = self.head_session.io_binding()
        self._free = FlatPool()
        self._values: dict[tuple, DeviceArray] = {}
        self._bias_host: np.ndarray | None = None
        self._bias_value: DeviceArray | None = None

    # -- device memory ---------------------------------------------------------------------------
    def _new(self, shape, dtype) -> "ort.OrtValue":
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, self.device_id)

    def _array(self, key: tuple, shape: tuple, dtype) -> DeviceArray:
        array = self._values.get(key)
        if array is None or array.shape != tuple(shape):
            array = self._values[key] = DeviceArray(self._new(shape, dtype), shape, dtype)
        return array

    def _buffer(self, n: int) -> "ort.OrtValue":
        value = self._new([n], self.dtype)
        if self.pad:
            self._zero(value)
        return value

    def _zero(self, value: "ort.OrtValue") -> None:
        """The masked position is read (with zero weight): it must hold finite numbers. The whole
        buffer, since onnxruntime writes an OrtValue only whole (a reset happens only when a
        buffer changes batch size)."""
        value.update_inplace(np.zeros(value.shape()[0], self.dtype))

    def allocate(self, capacities: list[int], batch: int) -> KVCache:
        H, D = self.spec.kv_heads, self.spec.head_dim
        storage = self._free.lease([max(1, (cap + self.pad) * batch * H * D) for cap in capacities],
                                   lambda v: v.shape()[0], self._buffer, layout=batch if self.pad else None,
                                   reset=self._zero)
        flat_keys, flat_values, _ = storage
        offset = self.pad * batch * H * D * np.dtype(self.dtype).itemsize  # the real positions, after the masked one
        shapes = [(cap, batch, H, D) for cap in capacities]
        return KVCache([DeviceArray(flat, shape, self.dtype, offset) for flat, shape in zip(flat_keys, shapes)],
                       [DeviceArray(flat, shape, self.dtype, offset) for flat, shape in zip(flat_values, shapes)],
                       capacities, batch, storage=storage)

    def release(self, cache: KVCache) -> None:
        self._free.give(cache)

    def from_numpy(self, array: np.ndarray) -> DeviceArray:
        return self._hidden(array)

    def _hidden(self, hidden) -> DeviceArray:
        """Hidden states as a device array (host arrays, e.g. from ``verify``, are uploaded)."""
        if isinstance(hidden, DeviceArray):
            return hidden
        array = np.ascontiguousarray(hidden, self.dtype)
        return DeviceArray(ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id),
                           array.shape, self.dtype)

    def _bias(self, attention_bias: np.ndarray) -> DeviceArray:
        """The step's bias on the device, uploaded once per step (every layer of a step binds the
        same one), with a masked column in front when the cache has a masked position."""
        if self._bias_host is not None and self._bias_host.shape == attention_bias.shape \
                and np.array_equal(self._bias_host, attention_bias):
            return self._bias_value
        self._bias_host = np.array(attention_bias, np.float32, copy=True)
        padded = masked_position_bias(self._bias_host, self.pad)
        self._bias_value = DeviceArray(ort.OrtValue.ortvalue_from_numpy(padded, self.device, self.device_id),
                                       padded.shape, np.float32)
        return self._bias_value

    # -- graphs ----------------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray) -> DeviceArray:
        B, T = input_ids.shape
        out = self._array(("hidden", 0, B, T), (B, T, self.spec.hidden_size), self.dtype)
        ids = np.ascontiguousarray(input_ids, np.int64)
        pos = np.ascontiguousarray(position_ids, np.int64)
        io = self._embed_io
        io.bind_input("input_ids", "cpu", 0, np.int64, [B, T], ids.ctypes.data)
        if self.manifest.embed_takes_positions:
            io.bind_input("position_ids", "cpu", 0, np.int64, [B, T], pos.ctypes.data)
        io.bind_ortvalue_output("hidden", out.value)
        self.embed_session.run_with_iobinding(io)
        return out

    def _layer(self, index: int, hidden, cache: KVCache, past: int, attention_bias: np.ndarray,
               positions: np.ndarray | None) -> DeviceArray:
        hidden = self._hidden(hidden)
        B, T, E = hidden.shape
        H, D = self.spec.kv_heads, self.spec.head_dim
        position = B * H * D * np.dtype(self.dtype).itemsize  # bytes of one cache position
        keys, values = cache.keys[index].value.data_ptr(), cache.values[index].value.data_ptr()
        P = past + self.pad  # positions bound as the past, the masked one included
        bias = self._bias(attention_bias)
        which = 1 if self._values.get(("hidden", 1, B, T)) is not hidden else 0
        out = self._array(("hidden", which, B, T), (B, T, E), self.dtype)
        dev, i = self.device, self.device_id
        io = self._layer_io[index]
        io.bind_input("hidden", dev, i, self.dtype, [B, T, E], hidden.ptr)
        if self.manifest.layers_take_positions:  # from the host, as the embedding's
            io.bind_input("position_ids", "cpu", 0, np.int64, [B, T], positions.ctypes.data)
        io.bind_input("past_key", dev, i, self.dtype, [P, B, H, D], keys)
        io.bind_input("past_value", dev, i, self.dtype, [P, B, H, D], values)
        io.bind_input("attention_bias", dev, i, np.float32, [B, P + T], bias.ptr)
        io.bind_ortvalue_output("hidden_out", out.value)
        io.bind_output("key", dev, i, self.dtype, [T, B, H, D], keys + P * position)
        io.bind_output("value", dev, i, self.dtype, [T, B, H, D], values + P * position)
        self.layer_sessions[index].run_with_iobinding(io)
        return out

    def head(self, hidden) -> np.ndarray:
        hidden = self._hidden(hidden)
        B, T, E = hidden.shape
        logits = self._host_logits(B)
        io = self._head_io
        if T == 1:  # [B,1,E] is [B,E]: bind the device buffer itself
            io.bind_input("hidden", self.device, self.device_id, self.dtype, [B, E], hidden.ptr)
            last = None
        else:  # after a prefill only: the last position, through the host
            last = np.ascontiguousarray(np.asarray(hidden)[:, -1, :])
            io.bind_input("hidden", "cpu", 0, self.dtype, [B, E], last.ctypes.data)
        io.bind_output("logits", "cpu", 0, np.float32, [B, self.spec.vocab_size], logits.ctypes.data)
        self.head_session.run_with_iobinding(io)
        del last
        return logits

    def _host_logits(self, B: int) -> np.ndarray:
        key = ("logits", B)
        buf = self._values.get(key)
        if buf is None:
            buf = self._values[key] = np.empty((B, self.spec.vocab_size), np.float32)
        return buf

    def available_memory(self) -> int | None:
        if self.device == "cpu":
            return super().available_memory()
        return None  # onnxruntime does not report free device memory

    def close(self) -> None:
        self._values.clear()
        self._free.clear()
        self._bias_host = self._bias_value = None
