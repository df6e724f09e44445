"""Raw CUDA device memory for backends that bind pointers (TensorRT): torch or CuPy, whichever is
installed (imported lazily). Buffers are flat byte ranges with an address; copies run on one
stream that the backend also gives to TensorRT.

``cuda:N`` means CUDA device N (as CUDA numbers them, after ``CUDA_VISIBLE_DEVICES``):
``parse_cuda_device`` reads it, and an index beyond the devices there is one line. CUDA's
current device belongs to each host thread, and TensorRT builds, deserializes and runs on the
current one: ``CudaMemory.activate()`` / ``use_device(N)`` make device N current for a block,
and every allocation and copy here runs with it current (a Runtime may be used from several
threads).

Host-to-device copies read pageable numpy memory, which CUDA stages before the call returns,
so the host array may be dropped right after; device-to-host copies wait for the stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess

import numpy as np

from ..errors import BackendError

_MEMCPY_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice
LIBRARIES = ("torch", "cupy")


def parse_cuda_device(device) -> int:
    """The index of a CUDA device given as None or "cuda" (0), "cuda:N" or N; anything else is one
    line. Whether device N exists is checked where a library can count the devices."""
    if device is None:
        return 0
    if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
        index = int(device)
    else:
        kind, colon, digits = str(device).strip().partition(":")
        if kind != "cuda" or (colon and not (digits.isascii() and digits.isdigit())):
            raise BackendError(f"unknown CUDA device {device!r}; use cuda or cuda:N (N = 0 for the first GPU)")
        index = int(digits) if colon else 0
    if index < 0:
        raise BackendError(f"unknown CUDA device {device!r}; device indices start at 0 (cuda:0)")
    return index


def no_such_device(index: int, count: int, seen_by: str) -> BackendError:
    """The one line for ``cuda:index`` on a machine where ``seen_by`` counts ``count`` devices."""
    have = "no CUDA device" if count == 0 else "cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}"
    renumbered = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = f" (CUDA_VISIBLE_DEVICES={renumbered} numbers the visible ones from 0)" if renumbered is not None else ""
    return BackendError(f"there is no CUDA device cuda:{index}: {seen_by} sees {have}{note}; choose one of those")


class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr`` (kept alive by ``owner``)."""

    def __init__(self, owner, ptr: int, nbytes: int) -> None:
        self.owner, self.ptr, self.nbytes = owner, int(ptr), int(nbytes)


class CudaMemory:
    """Allocation, copies and one stream on CUDA device ``device_id`` (N or "cuda:N")."""

    def __init__(self, device_id: int | str = 0, prefer: str | None = None) -> None:
        self.device_id = parse_cuda_device(device_id)
        if prefer is not None and prefer not in LIBRARIES:
            raise BackendError(f"unknown GPU memory library {prefer!r}; choose one of {', '.join(LIBRARIES)}")
        errors = []
        for lib in ([prefer] if prefer else LIBRARIES):
            try:  # an index beyond the devices is a BackendError from either library: not caught here
                self._impl = _TorchImpl(self.device_id) if lib == "torch" else _CupyImpl(self.device_id)
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

    def activate(self) -> contextlib.AbstractContextManager:
        """A context in which this device is the calling thread's current CUDA device (restored after)."""
        return self._impl.activate()

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


def _torch_with_cuda():
    """torch when it is installed and sees a CUDA device, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _cupy_device_count():
    """(cupy, how many devices it sees), or None without CuPy or a reachable GPU."""
    try:
        import cupy

        return cupy, int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # ImportError, CUDARuntimeError (no driver/device), or CuPy built for another CUDA
        return None


class _TorchImpl:
    # torch's kernels and copies switch to their tensors' device themselves (and torch.cuda.stream
    # to its stream's); activate() is for the calls that do not: TensorRT's.
    def __init__(self, device_id: int) -> None:
        import torch

        if not torch.cuda.is_available():
            raise _NoDevice(f"torch {torch.__version__} sees no CUDA device")
        count = torch.cuda.device_count()
        if device_id >= count:
            raise no_such_device(device_id, count, f"torch {torch.__version__}")
        self.torch = torch
        self.device = torch.device("cuda", device_id)
        self._stream = torch.cuda.Stream(self.device)
        self.stream_handle = int(self._stream.cuda_stream)

    def activate(self):
        return self.torch.cuda.device(self.device)

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
    # CuPy allocates, copies and creates streams on the current device: every call runs inside
    # activate() (a fresh Device per use: a Device object's enter/exit stack is not thread-safe).
    def __init__(self, device_id: int) -> None:
        import cupy

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise _NoDevice(f"CuPy cannot reach a GPU ({exc})") from None
        if device_id >= count:
            raise no_such_device(device_id, count, f"CuPy {cupy.__version__}")
        self.cupy, self.device_id = cupy, device_id
        with self.activate():
            self._stream = cupy.cuda.Stream(non_blocking=True)
        self.stream_handle = int(self._stream.ptr)

    def activate(self):
        return self.cupy.cuda.Device(self.device_id)

    def alloc(self, nbytes: int, zero: bool) -> DeviceBuffer:
        with self.activate(), self._stream:  # CuPy's pool hands out blocks per stream: ours, where the work runs
            memory = self.cupy.cuda.alloc(nbytes)
            if zero:
                memory.memset_async(0, nbytes, self._stream)
        return DeviceBuffer(memory, memory.ptr, nbytes)

    def upload(self, dst: DeviceBuffer, data: np.ndarray, offset: int) -> None:
        with self.activate():
            (dst.owner + offset).copy_from_host_async(ctypes.c_void_p(data.ctypes.data), data.nbytes, self._stream)

    def download(self, host: np.ndarray, src: DeviceBuffer, offset: int) -> None:
        with self.activate():
            (src.owner + offset).copy_to_host_async(ctypes.c_void_p(host.ctypes.data), host.nbytes, self._stream)
            self._stream.synchronize()

    def copy(self, dst, dst_offset, src, src_offset, nbytes) -> None:
        with self.activate():
            (dst.owner + dst_offset).copy_from_device_async(src.owner + src_offset, nbytes, self._stream)

    def copy_rows(self, dst, src, src_offset, row_bytes, src_pitch, rows) -> None:
        with self.activate():
            self.cupy.cuda.runtime.memcpy2DAsync(dst.ptr, row_bytes, src.ptr + src_offset, src_pitch, row_bytes,
                                                 rows, _MEMCPY_DEVICE_TO_DEVICE, self._stream.ptr)

    def synchronize(self) -> None:
        with self.activate():
            self._stream.synchronize()

    def free_bytes(self) -> int:
        with self.activate():  # memGetInfo reports the current device
            return int(self.cupy.cuda.runtime.memGetInfo()[0])


@contextlib.contextmanager
def use_device(device_id: int | str = 0):
    """Make CUDA device ``device_id`` current in this thread for the block (TensorRT's builder
    works on the current device), with torch or CuPy; without either only device 0 is possible."""
    index = parse_cuda_device(device_id)
    torch = _torch_with_cuda()
    if torch is not None:
        if index >= torch.cuda.device_count():
            raise no_such_device(index, torch.cuda.device_count(), f"torch {torch.__version__}")
        with torch.cuda.device(index):
            yield index
        return
    found = _cupy_device_count()
    if found is not None:
        cupy, count = found
        if index >= count:
            raise no_such_device(index, count, f"CuPy {cupy.__version__}")
        with cupy.cuda.Device(index):
            yield index
        return
    if index != 0:
        raise BackendError(f"selecting cuda:{index} needs torch with CUDA or CuPy (neither sees a GPU here); "
                           f"install one, or run with CUDA_VISIBLE_DEVICES={index} and cuda:0")
    yield index  # device 0 is current in every thread that never chose another


def visible_devices(rows: list[dict], env: str | None) -> list[dict] | None:
    """The devices CUDA numbers 0, 1, ... given nvidia-smi's ``rows`` (``index``, ``uuid``) and
    ``CUDA_VISIBLE_DEVICES`` (None: all of them); None when that cannot be told (MIG entries).
    CUDA stops at the first entry that names no device. CUDA orders unlisted devices fastest
    first and nvidia-smi by PCI bus: identical GPUs, the common case, make that moot."""
    if env is None:
        return list(rows)
    visible = []
    for token in (t.strip() for t in env.split(",")):
        if token.startswith("MIG-"):
            return None
        uuid = token if token.startswith("GPU-") else None
        match = [r for r in rows if (r["uuid"].startswith(uuid) if uuid else r["index"] == token)]
        if not token or len(match) != 1 or match[0] in visible:
            break
        visible.append(match[0])
    return visible


def _nvidia_smi_rows() -> list[dict] | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    rows = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            rows.append({"index": parts[0], "uuid": parts[1], "gpu": ", ".join(parts[2:-1]),
                         "compute_capability": parts[-1]})
    return rows or None


def gpu_identity(device_id: int | str = 0) -> dict[str, str]:
    """Name and compute capability of CUDA device ``device_id`` (torch, CuPy or nvidia-smi); an
    index beyond the devices there is one line."""
    index = parse_cuda_device(device_id)
    torch = _torch_with_cuda()
    if torch is not None:
        count = torch.cuda.device_count()
        if index >= count:
            raise no_such_device(index, count, f"torch {torch.__version__}")
        major, minor = torch.cuda.get_device_capability(index)
        return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}
    found = _cupy_device_count()
    if found is not None and found[1] > 0:
        cupy, count = found
        if index >= count:
            raise no_such_device(index, count, f"CuPy {cupy.__version__}")
        props = cupy.cuda.runtime.getDeviceProperties(index)
        name = props["name"]
        return {"gpu": name.decode() if isinstance(name, bytes) else str(name),
                "compute_capability": f"{props['major']}.{props['minor']}"}
    rows = _nvidia_smi_rows()
    visible = visible_devices(rows, os.environ.get("CUDA_VISIBLE_DEVICES")) if rows else None
    if visible is not None:
        if index >= len(visible):
            raise no_such_device(index, len(visible), "nvidia-smi")
        return {"gpu": visible[index]["gpu"], "compute_capability": visible[index]["compute_capability"]}
    raise BackendError(f"cannot identify CUDA device cuda:{index}: no torch with CUDA, no CuPy and no nvidia-smi "
                       "sees it")
