"""Serve an export with NVIDIA Triton Inference Server (docs/triton.md).

``write_repository`` (``skipdeploy triton``) writes a model repository whose model is the Python
backend model ``model.py`` over a ``ServingEngine``, with the inputs and outputs of Triton's vLLM
backend; ``server`` finds and starts the ``tritonserver`` of the ``nvidia-pytriton`` wheel for
local runs and tests (on NVIDIA's tritonserver image, run ``tritonserver`` itself).
"""

from .repository import write_repository

__all__ = ["write_repository"]
