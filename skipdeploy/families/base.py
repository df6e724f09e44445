"""What every model family shares, and the interface through which a family states its differences.

A family (OPT, Llama, ...) is one object that knows, for its checkpoints:
- the config: which fields make the ``ModelSpec`` and what is refused (``spec``);
- the weights: how the Hugging Face modules map onto the export's named layer weights
  (``layer_weights``, ``embed_weights``, ``head_weights``; their names ``LAYER_WEIGHTS``,
  ``EMBED_WEIGHTS``, ``HEAD_WEIGHTS``, read back by ``families.weights``), in [in, out] layout;
- the graphs: the parts of a layer before and after attention on rows [N, E] (``layer_input``,
  ``layer_output``), the embedding and what precedes the LM head, written with
  ``exporter.onnx_builder.Builder``; the attention between them is shared (``exporter.graphs``);
- the same math in torch for the reference backend (``torch_*``);
- how to call the transformers modules themselves (``hf_*``), for the export's per-graph check,
  ``verify`` and schedule-aware fine-tuning.

Nothing here imports torch, transformers or onnx at module level: the runtime reads families
(weight names, whether layers take positions) without them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CheckpointError


def to_numpy(tensor) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().to("cpu").float().numpy()


def config_token(config: Any, name: str) -> int | None:
    """A special token id of the config (the first one where the config lists several)."""
    value = getattr(config, name, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if value is not None else None


class Family:
    name = ""
    model_types: tuple[str, ...] = ()
    # Whether layer graphs take ``position_ids`` (RoPE) and the embedding does not.
    rope = False
    # The named weights of each exported graph (initializer names; section 3 of DESIGN.md): what
    # ``layer_weights``/``embed_weights``/``head_weights`` write and ``families.weights`` reads back.
    LAYER_WEIGHTS: tuple[str, ...] = ()
    EMBED_WEIGHTS: tuple[str, ...] = ("embed_tokens.weight",)
    HEAD_WEIGHTS: tuple[str, ...] = ("lm_head.weight",)
    # Weights whose presence tells a float layer graph from a quantized one.
    REQUIRED_WEIGHTS: tuple[str, ...] = ("qkv.weight",)
    # Weight matrices of the MLP (the cost model's multiply-adds): 2 (up, down) or 3 (gated).
    MLP_MATRICES = 2
    # Initializer-name prefixes that stay float32 in float16 graphs (norm parameters).
    FP32_PREFIXES: tuple[str, ...] = ("ln_", "final_layer_norm")

    # -- checkpoint ----------------------------------------------------------------------------
    def spec(self, config: Any, source: str):
        raise NotImplementedError

    def hf_class(self):
        """The transformers ``*ForCausalLM`` class of this family."""
        raise NotImplementedError

    def hf_layers(self, model) -> list:
        raise NotImplementedError

    def layer_weights(self, model, index: int, spec) -> dict[str, np.ndarray | None]:
        raise NotImplementedError

    def embed_weights(self, model, spec) -> dict[str, np.ndarray | None]:
        raise NotImplementedError

    def head_weights(self, model, spec) -> dict[str, np.ndarray | None]:
        raise NotImplementedError

    # -- graphs (``b``: an onnx_builder.Builder, ``W(name)``: an initializer name or None) -----
    def embed_graph(self, b, spec, W) -> str:
        raise NotImplementedError

    def layer_input(self, b, spec, W, x: str, positions: str | None) -> list[str]:
        """Query [N, H*D], key and value [N, Hkv*D] for hidden rows x [N, E] at ``positions`` [N]."""
        raise NotImplementedError

    def layer_output(self, b, spec, W, x: str, context: str) -> str:
        """Hidden rows [N, E] after the layer, from its input rows and the attention context [N, H*D]."""
        raise NotImplementedError

    def head_input(self, b, spec, W, x: str) -> str:
        """What runs between the last layer and the LM head (the final norm)."""
        raise NotImplementedError

    # -- torch (the reference backend; ``w``: name -> tensor) ---------------------------------
    def torch_embed(self, w, ids, positions):
        raise NotImplementedError

    def torch_layer_input(self, w, spec, x, positions, dtype):
        raise NotImplementedError

    def torch_layer_output(self, w, spec, x, context, dtype):
        raise NotImplementedError

    def torch_head_input(self, w, spec, x, dtype):
        raise NotImplementedError

    # -- transformers (checks and training) -----------------------------------------------------
    def hf_embed(self, model, ids, positions):
        raise NotImplementedError

    def hf_layer(self, model, index: int, hidden, mask, positions):
        """The Hugging Face layer itself over whole sequences [B, S, E] with an additive 4-D mask."""
        raise NotImplementedError

    def hf_keys_values(self, model, index: int, hidden, positions):
        """Keys and values [B, S, Hkv, D] that the layer caches for ``hidden`` (RoPE applied)."""
        raise NotImplementedError

    def hf_head(self, model, hidden):
        raise NotImplementedError


def refuse(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what}")


def torch_linear(x, w, name: str):
    y = x @ w[f"{name}.weight"]
    return y + w[f"{name}.bias"] if f"{name}.bias" in w else y
