"""Reading an export's named weights back from its ONNX graphs: the one reader that the torch
backend and the in-flight layer graphs share.

A graph's weights are its float initializers named by the family (``LAYER_WEIGHTS``,
``EMBED_WEIGHTS``, ``HEAD_WEIGHTS``); a weight the model does not have (a bias, OPT's
``project_in``) is simply absent. Quantized graphs hold integer initializers under other names, so
a missing required weight means an export these readers cannot run. numpy and onnx only: no
torch, so the onnxruntime path can use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendError
from . import for_model_type

def read_weights(path: str | Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The float initializers of the graph at ``path`` whose names are in ``names`` (external data,
    such as a shared ``embeddings.bin``, included)."""
    import onnx  # here, not at module level: the families package is read without onnx
    from onnx import numpy_helper

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    wanted = set(names)
    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
            if init.name in wanted and init.data_type in floats}


def read_layer_weights(path: str | Path, spec, purpose: str = "this backend") -> dict[str, np.ndarray]:
    """The named weights of an exported layer graph; refused in one line when its float weights
    are missing (an int8 export), naming ``purpose``, what needs them."""
    family = for_model_type(spec.model_type)
    found = read_weights(path, family.LAYER_WEIGHTS)
    if any(name not in found for name in family.REQUIRED_WEIGHTS):
        raise BackendError(f"{path} holds no float layer weights (a quantized export?): {purpose} runs float "
                           "exports; use the float export it was quantized from")
    return found


def read_graph_weights(path: str | Path, spec, graph: str) -> dict[str, np.ndarray]:
    """The named weights of the export's ``embed`` or ``head`` graph."""
    family = for_model_type(spec.model_type)
    names = {"embed": family.EMBED_WEIGHTS, "head": family.HEAD_WEIGHTS}[graph]
    return read_weights(path, names)


__all__ = ["read_graph_weights", "read_layer_weights", "read_weights"]
