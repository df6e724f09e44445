"""Backends behind one interface (see ``base.Engine``); imported lazily so that the
onnxruntime path never pulls in torch."""

from __future__ import annotations

from ..errors import BackendError
from ..manifest import Manifest
from .base import Engine, KVCache

BACKENDS = ("onnxruntime", "torch", "tensorrt")
DEVICES = ("cpu", "cuda")


def create_engine(name: str, manifest: Manifest, device: str | None = None, inflight: bool = False,
                  **options) -> Engine:
    """``device`` (None = the backend's default): onnxruntime and torch run on "cpu" (default)
    or "cuda"; tensorrt runs on "cuda" only. ``inflight``: an engine for in-flight batching
    (``skipdeploy.serving``). Other options go to the backend's constructor."""
    kind, index = _parse_device(device)
    if index is not None:
        options["device_id"] = index
    if inflight and (name not in ("onnxruntime", "torch") or kind == "cuda"):
        raise BackendError(f"in-flight batching runs on the onnxruntime and torch backends on the CPU (asked for "
                           f"{name} on {device}); the GPU backends serve static batches (skipdeploy.load)")
    if name == "onnxruntime" and inflight:
        try:
            from .onnxruntime_inflight import InflightOnnxRuntimeEngine
        except ImportError as exc:
            raise BackendError(f"in-flight batching builds its graphs with onnx ({exc}); "
                               "pip install 'skipdeploy[serve]'") from None
        return InflightOnnxRuntimeEngine(manifest, **options)
    if name == "onnxruntime":
        if kind == "cuda":
            from .ortvalue_engine import OrtValueEngine

            return OrtValueEngine(manifest, device="cuda", **options)
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(manifest, **options)
    if name == "torch":
        from .torch_engine import TorchEngine

        index = options.pop("device_id", None)
        kind = kind or "cpu"
        return TorchEngine(manifest, device=kind if index is None else f"{kind}:{index}", **options)
    if name == "tensorrt":
        if kind == "cpu":
            raise BackendError("the tensorrt backend runs on an NVIDIA GPU only (device 'cuda')")
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine(manifest, **options)
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _parse_device(device: str | None) -> tuple[str | None, int | None]:
    """"cpu", "cuda" or "cuda:N" as (kind, index); None keeps the backend's default."""
    if device is None:
        return None, None
    kind, _, index = str(device).partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise BackendError(f"unknown device {device!r}; choose one of cpu, cuda, cuda:N")
    return kind, int(index) if index else None


__all__ = ["BACKENDS", "DEVICES", "Engine", "KVCache", "create_engine"]
