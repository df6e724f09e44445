"""skipdeploy: deploy SkipDecode models (OPT and the Llama family) as per-layer ONNX graphs with a small runtime."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (BackendError, CapacityError, CheckpointError, ExportError, InputError, ManifestError,
                     NumericalError, ScheduleError, SkipDeployError)
from .runtime import GenerationConfig, GenerationResult, Runtime, load
from .schedule import LayerSchedule, Schedule, TableSchedule
from .serving import QueueFullError, ServingEngine


def export(model, out, **kwargs):
    """Export a checkpoint to an export directory (see ``skipdeploy.exporter.export.export``)."""
    try:
        from .exporter.export import export as _export
    except ImportError as exc:
        raise SkipDeployError(f"exporting needs torch, transformers and onnx ({exc}); "
                              "pip install 'skipdeploy[export]'") from None
    return _export(model, out, **kwargs)


def quantize(source, out, **kwargs):
    """Write an int8-, int4- or int8-dynamic-weight copy of a float32 export
    (``skipdeploy.exporter.quantize.quantize_export``)."""
    try:
        from .exporter.quantize import quantize_export
    except ImportError as exc:
        raise SkipDeployError(f"quantizing needs onnx ({exc}); pip install 'skipdeploy[export]'") from None
    return quantize_export(source, out, **kwargs)


__all__ = ["BackendError", "CapacityError", "CheckpointError", "ExportError", "GenerationConfig", "GenerationResult",
           "InputError", "LayerSchedule", "ManifestError", "NumericalError", "QueueFullError", "Runtime", "Schedule",
           "ScheduleError", "ServingEngine", "SkipDeployError", "TableSchedule", "export", "load", "quantize", "__version__"]
