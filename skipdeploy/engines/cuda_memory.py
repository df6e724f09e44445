"""Raw CUDA device memory for backends that bind pointers (TensorRT): torch or CuPy, whichever is
installed (imported lazily). Buffers are flat byte ranges with an address; copies run on one
stream that the backend also gives to TensorRT.

Host-to-device copies read pageable numpy memory, which CUDA stages before the call returns,
so the host array may be dropped right after; device-to-host copies wait for the stream.
"""

from __future__ import annotations

import ctypes
import subprocess

import numpy as np

from ..errors import BackendError

_MEMCPY_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice


class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr`` (kept alive by ``owner``)."""

    def __init__(self, owner, ptr: int, nbytes: int) -> None:
        self.owner, self.ptr, self.nbytes = owner, int(ptr), int(nbytes)


class CudaMemory:
    """Allocation, copies and one stream on CUDA device ``device_id``."""

    def __init__(self, device_id: int = 0, prefer: str | None = None) -> None:
        self.device_id = device_id
        errors = []
        for lib in ([prefer] if prefer else ["torch", "cupy"]):
            try:
                self._impl = _TorchImpl(device_id) if lib == "torch" else _CupyImpl(device_id)
                self.library = lib
                return
            except ImportError as exc:
                errors.append(f"{lib}: not installed ({exc.name or exc})")
            except _NoDevice as exc:
                errors.append(f"{lib}: {exc}")
        raise BackendError("GPU buffers need torch with CUDA or CuPy and an NVIDIA GPU (" + "; ".join(errors) + ")")

    @property
    def stream(self) -> int:
        """The stream handle (cudaStream_t as an int) that every copy here runs on."""
        return self._impl.stream_handle

    def alloc(self, nbytes: int, zero: bool = False) -> DeviceBuffer:
        return self._impl.alloc(max(1, int(nbytes)), zero)

    def upload(self, dst: DeviceBuffer, host: np.ndarray, offset: int = 0) -> None:
        data = np.ascontiguousarray(host)
        if offset + data.nbytes > dst.nbytes:
            raise BackendError(f"internal error: a {data.nbytes}-byte upload overflows a {dst.nbytes}-byte buffer")
        self._impl.upload(dst, data, offset)

    def download(self, host: np.ndarray, src: DeviceBuffer, offset: int = 0) -> np.ndarray:
        if not host.flags.c_contiguous or offset + host.nbytes > src.nbytes:
            raise BackendError("internal error: bad download target")
        self._impl.download(host, src, offset)
        return host

    def copy(self, dst: DeviceBuffer, dst_offset: int, src: DeviceBuffer, src_offset: int, nbytes: int) -> None:
        """Device to device, on the stream."""
        if dst_offset + nbytes > dst.nbytes or src_offset + nbytes > src.nbytes:
            raise BackendError("internal error: a device copy overflows its buffer")
        self._impl.copy(dst, dst_offset, src, src_offset, nbytes)

    def copy_rows(self, dst: DeviceBuffer, src: DeviceBuffer, src_offset: int, row_bytes: int,
                  src_pitch: int, rows: int) -> None:
        """``rows`` rows of ``row_bytes`` from ``src`` (every ``src_pitch`` bytes) into ``dst``, packed."""
        self._impl.copy_rows(dst, src, src_offset, row_bytes, src_pitch, rows)

    def synchronize(self) -> None:
        self._impl.synchronize()

    def free_bytes(self) -> int:
        return self._impl.free_bytes()


class _NoDevice(Exception):
    pass


class _TorchImpl:
    def __init__(self, device_id: int) -> None:
        import torch

        if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
            raise _NoDevice(f"torch {torch.__version__} sees no CUDA device {device_id}")
        self.torch = torch
        self.device = torch.device("cuda", device_id)
        self._stream = torch.cuda.Stream(self.device)
        self.stream_handle = int(self._stream.cuda_stream)

    def alloc(self, nbytes: int, zero: bool) -> DeviceBuffer:
        make = self.torch.zeros if zero else self.torch.empty
        with self.torch.cuda.stream(self._stream):
            t = make(nbytes, dtype=self.torch.uint8, device=self.device)
        return DeviceBuffer(t, t.data_ptr(), nbytes)

    def upload(self, dst: DeviceBuffer, data: np.ndarray, offset: int) -> None:
        src = self.torch.from_numpy(data.reshape(-1).view(np.uint8))
        with self.torch.cuda.stream(self._stream):
            dst.owner[offset:offset + data.nbytes].copy_(src)

    def download(self, host: np.ndarray, src: DeviceBuffer, offset: int) -> None:
        out = self.torch.from_numpy(host.reshape(-1).view(np.uint8))
        with self.torch.cuda.stream(self._stream):
            out.copy_(src.owner[offset:offset + host.nbytes])  # a blocking copy: waits for the stream
        self._stream.synchronize()

    def copy(self, dst, dst_offset, src, src_offset, nbytes) -> None:
        with self.torch.cuda.stream(self._stream):
            dst.owner[dst_offset:dst_offset + nbytes].copy_(src.owner[src_offset:src_offset + nbytes])

    def copy_rows(self, dst, src, src_offset, row_bytes, src_pitch, rows) -> None:
        span = (rows - 1) * src_pitch + row_bytes
        view = src.owner[src_offset:src_offset + span].as_strided((rows, row_bytes), (src_pitch, 1))
        with self.torch.cuda.stream(self._stream):
            dst.owner[:rows * row_bytes].view(rows, row_bytes).copy_(view)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def free_bytes(self) -> int:
        return int(self.torch.cuda.mem_get_info(self.device)[0])


class _CupyImpl:
    def __init__(self, device_id: int) -> None:
        import cupy

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise _NoDevice(f"CuPy cannot reach a GPU ({exc})") from None
        if device_id >= count:
            raise _NoDevice(f"CuPy sees {count} CUDA device(s), not device {device_id}")
        self.cupy = cupy
        self.device = cupy.cuda.Device(device_id)
        self.device.use()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self.stream_handle = int(self._stream.ptr)

    def alloc(self, nbytes: int, zero: bool) -> DeviceBuffer:
        with self._stream:  # CuPy's pool hands out blocks per stream: ours, where the work runs
            memory = self.cupy.cuda.alloc(nbytes)
        if zero:
            memory.memset_async(0, nbytes, self._stream)
        return DeviceBuffer(memory, memory.ptr, nbytes)

    def upload(self, dst: DeviceBuffer, data: np.ndarray, offset: int) -> None:
        (dst.owner + offset).copy_from_host_async(ctypes.c_void_p(data.ctypes.data), data.nbytes, self._stream)

    def download(self, host: np.ndarray, src: DeviceBuffer, offset: int) -> None:
        (src.owner + offset).copy_to_host_async(ctypes.c_void_p(host.ctypes.data), host.nbytes, self._stream)
        self._stream.synchronize()

    def copy(self, dst, dst_offset, src, src_offset, nbytes) -> None:
        (dst.owner + dst_offset).copy_from_device_async(src.owner + src_offset, nbytes, self._stream)

    def copy_rows(self, dst, src, src_offset, row_bytes, src_pitch, rows) -> None:
        self.cupy.cuda.runtime.memcpy2DAsync(dst.ptr, row_bytes, src.ptr + src_offset, src_pitch, row_bytes, rows,
                                             _MEMCPY_DEVICE_TO_DEVICE, self._stream.ptr)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def free_bytes(self) -> int:
        return int(self.cupy.cuda.runtime.memGetInfo()[0])


def gpu_identity(device_id: int = 0) -> dict[str, str]:
    """Name and compute capability of CUDA device ``device_id`` (torch, CuPy or nvidia-smi)."""
    try:
        import torch

        if torch.cuda.is_available() and device_id < torch.cuda.device_count():
            major, minor = torch.cuda.get_device_capability(device_id)
            return {"gpu": torch.cuda.get_device_name(device_id), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        name = props["name"]
        return {"gpu": name.decode() if isinstance(name, bytes) else str(name),
                "compute_capability": f"{props['major']}.{props['minor']}"}
    except Exception:  # ImportError, or no device
        pass
    try:
        out = subprocess.run(["nvidia-smi", f"--id={device_id}", "--query-gpu=name,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            name, cap = (part.strip() for part in out.stdout.strip().splitlines()[0].rsplit(",", 1))
            return {"gpu": name, "compute_capability": cap}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    raise BackendError(f"cannot identify CUDA device {device_id}: no torch with CUDA, no CuPy and no nvidia-smi "
                       "sees it")
