"""Model families: each states its differences from the others in one module (``opt``, ``llama``);
the exporter, the in-flight layer graphs, the torch backend, ``verify`` and fine-tuning ask the
family instead of testing model types."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError, ManifestError
from .base import Family
from .llama import Llama
from .opt import OPT

FAMILIES: tuple[Family, ...] = (OPT(), Llama())
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
ARCHITECTURES = ("OPTForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def for_model_type(model_type: str) -> Family:
    """The family of an export's ``model.model_type``."""
    family = _BY_TYPE.get(model_type)
    if family is None:
        raise ManifestError(f"model type {model_type!r} is not one this skipdeploy runs "
                            f"({', '.join(sorted(_BY_TYPE))}); upgrade skipdeploy")
    return family


def for_config(config: Any, source: str) -> Family:
    """The family of a transformers config, or one line naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    family = _BY_TYPE.get(model_type)
    if family is None:
        found = ", ".join(getattr(config, "architectures", None) or []) or repr(model_type)
        raise CheckpointError(f"{source} is a {found} checkpoint; skipdeploy exports "
                              f"{', '.join(ARCHITECTURES)}")
    return family


__all__ = ["ARCHITECTURES", "FAMILIES", "Family", "for_config", "for_model_type"]
