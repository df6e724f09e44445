"""Backends behind one interface (see ``base.Engine``); imported lazily so that the
onnxruntime path never pulls in torch."""

from __future__ import annotations

from ..errors import BackendError
from ..manifest import Manifest
from .base import Engine, KVCache

BACKENDS = ("onnxruntime", "torch")


def create_engine(name: str, manifest: Manifest, **options) -> Engine:
    if name == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(manifest, **options)
    if name == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(manifest, **options)
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Engine", "KVCache", "create_engine"]
