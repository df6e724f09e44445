"""Backends behind one interface (see ``base``); imported lazily so that the onnxruntime path
never pulls in torch.

``create_engine(name, manifest, device, inflight)`` holds the backend and device rules: which
backend runs where, which class serves static decoding (a ``StaticEngine``, ``inflight=False``)
and which serves in-flight batching (an ``InflightEngine``, ``inflight=True``), and which
options each takes. Unknown options are refused in one line, never passed on as a TypeError.
"""

from __future__ import annotations

import inspect

from ..errors import BackendError, InputError
from ..manifest import Manifest
from .base import Engine, InflightEngine, KVCache, SlotCache, StaticEngine

BACKENDS = ("onnxruntime", "torch", "tensorrt")
DEVICES = ("cpu", "cuda")
# Backends whose kernels run on a CPU thread pool that ``threads`` sizes (others ignore it).
THREADED = ("onnxruntime",)


def create_engine(name: str, manifest: Manifest, device: str | None = None, inflight: bool = False,
                  threads: int | None = None, **options) -> Engine:
    """``device`` (None = the backend's default): onnxruntime and torch run on "cpu" (default)
    or "cuda"; tensorrt runs on "cuda" only. ``inflight``: an :class:`InflightEngine` for
    in-flight batching (``skipdeploy.serving``; onnxruntime and torch on the CPU), else a
    :class:`StaticEngine` (``skipdeploy.load``), for every backend. ``threads``: onnxruntime's
    intra-op threads (other backends do not use a thread count). Other options go to the
    backend's class, which must take them."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    kind, index = parse_device(device)
    if threads is not None and name in THREADED:
        options["threads"] = threads
    if inflight:
        if kind == "cuda" or name == "tensorrt":
            raise BackendError(f"in-flight batching runs on the onnxruntime and torch backends on the CPU (asked "
                               f"for {name} on {device or 'cuda'}); the GPU backends serve static batches "
                               "(skipdeploy.load)")
        cls = _inflight_class(name)
    else:
        cls = _static_class(name, kind)
    if name == "torch":
        options["device"] = (kind or "cpu") if index is None else f"{kind}:{index}"
    elif name == "onnxruntime" and kind == "cuda":
        options.update(device="cuda", device_id=index or 0)
    elif name == "tensorrt" and index is not None:
        options["device_id"] = index
    _check_options(name, cls, options, inflight)
    return cls(manifest, **options)


def _static_class(name: str, kind: str | None) -> type[StaticEngine]:
    if name == "onnxruntime" and kind == "cuda":
        from .ortvalue_engine import OrtValueEngine

        return OrtValueEngine
    if name == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine
    if name == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine
    if kind == "cpu":
        raise BackendError("the tensorrt backend runs on an NVIDIA GPU only (device 'cuda')")
    from .tensorrt_engine import TensorRTEngine

    return TensorRTEngine


def _inflight_class(name: str) -> type[InflightEngine]:
    if name == "torch":
        from .torch_inflight import TorchInflightEngine

        return TorchInflightEngine
    try:
        from .onnxruntime_inflight import InflightOnnxRuntimeEngine
    except ImportError as exc:
        raise BackendError(f"in-flight batching builds its graphs with onnx ({exc}); "
                           "pip install 'skipdeploy[serve]'") from None
    return InflightOnnxRuntimeEngine


def _check_options(name: str, cls: type, options: dict, inflight: bool) -> None:
    """Options the backend's class does not take: one line naming the ones it does."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = {p for p in params if p not in ("self", "manifest")}
    unknown = sorted(set(options) - known)
    if unknown:
        accepted = sorted(({"device", "threads"} if name in THREADED else {"device"}) | known - {"device_id"})
        what = f"the {name} backend{' for in-flight batching' if inflight else ''}"
        raise InputError(f"{what} takes no option {', '.join(map(repr, unknown))}; its options: {', '.join(accepted)}")


def parse_device(device: str | None) -> tuple[str | None, int | None]:
    """"cpu", "cuda" or "cuda:N" as (kind, index; None where no index is given); None keeps the
    backend's default. The CUDA part is ``cuda_memory.parse_cuda_device``'s, the one reading of a
    CUDA device name."""
    from .cuda_memory import parse_cuda_device  # numpy only: no GPU library is imported

    if device is None:
        return None, None
    kind, colon, _ = str(device).partition(":")
    if kind == "cpu" and not colon:
        return "cpu", None
    if kind == "cuda" and isinstance(device, str):
        try:
            index = parse_cuda_device(device)
        except BackendError:
            pass
        else:
            return "cuda", index if colon else None
    raise BackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}, cuda:N")


__all__ = ["BACKENDS", "DEVICES", "Engine", "InflightEngine", "KVCache", "SlotCache", "StaticEngine",
           "create_engine"]
