"""Read a Hugging Face OPT checkpoint: its config as a ModelSpec, and its weights as numpy arrays."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..manifest import ModelSpec
from .graphs import SUPPORTED_ACTIVATIONS, layer_norm_params


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_local(source: str) -> bool:
    """A path that cannot be a hub id ("name" or "org/name") is reported as a missing directory."""
    return not _HUB_ID.match(source)


def load_config(source: str | os.PathLike) -> Any:
    """The transformers config of ``source`` (a local directory or a hub id), or a clear error."""
    import logging

    from transformers import AutoConfig

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # offline retries are not the user's news
    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source} is a file; pass the checkpoint directory (the one holding config.json)")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{source} has no config.json: not a Hugging Face checkpoint directory")
    elif _looks_local(source):
        raise CheckpointError(f"checkpoint directory {source} does not exist")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else source)
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors here
        if path.exists():
            raise CheckpointError(f"cannot read the config of {source}: {_first_line(exc)}") from None
        raise CheckpointError(
            f"{source} is neither a local checkpoint directory nor a model the hub could provide "
            f"({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


TOKENIZER_SOURCES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def fast_tokenizer(source: str | os.PathLike):
    """The checkpoint's tokenizer as a ``tokenizers.Tokenizer``, the form the runtime reads
    (transformers builds it from ``vocab.json`` + ``merges.txt`` when there is no
    ``tokenizer.json``, as in the original OPT checkpoints), or None when a local checkpoint has
    no tokenizer files. Raises CheckpointError when they cannot be read."""
    local = Path(str(source)).expanduser()
    if local.exists() and not any((local / name).is_file() for name in TOKENIZER_SOURCES):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else str(source))
    except Exception as exc:  # transformers raises many types for a broken or absent tokenizer
        raise CheckpointError(f"cannot read the checkpoint's tokenizer ({_first_line(exc)})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError("the checkpoint's tokenizer has no fast (tokenizers) version")
    return backend


def model_spec(config: Any, source: str) -> ModelSpec:
    model_type = getattr(config, "model_type", None)
    if model_type != "opt":
        raise CheckpointError(
            f"{source} is a {model_type!r} checkpoint; skipdeploy exports OPT models (model_type 'opt') only")
    if config.activation_function not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(f"{source} uses activation {config.activation_function!r}; "
                              f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
    if config.hidden_size % config.num_attention_heads:
        raise CheckpointError(f"{source}: hidden_size {config.hidden_size} is not divisible by "
                              f"num_attention_heads {config.num_attention_heads}")

    def token(name: str) -> int | None:
        value = getattr(config, name, None)
        return int(value) if value is not None else None

    return ModelSpec(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads, head_dim=config.hidden_size // config.num_attention_heads,
        ffn_dim=config.ffn_dim, vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
        word_embed_proj_dim=config.word_embed_proj_dim,
        layer_norm="pre" if config.do_layer_norm_before else "post",
        activation=config.activation_function, bos_token_id=token("bos_token_id"),
        eos_token_id=token("eos_token_id"), pad_token_id=token("pad_token_id"))


def load_model(source: str | os.PathLike) -> tuple[ModelSpec, Any]:
    """Spec and the float32 ``OPTForCausalLM`` (eager attention: the check reference)."""
    import torch
    from transformers import OPTForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is the one that counts
    config = load_config(source)
    spec = model_spec(config, str(source))
    path = Path(str(source)).expanduser()
    try:
        model = OPTForCausalLM.from_pretrained(str(path) if path.exists() else str(source),
                                               dtype=torch.float32, attn_implementation="eager")
    except Exception as exc:
        raise CheckpointError(f"cannot load the weights of {source}: {_first_line(exc)}") from None
    return spec, model.eval()


def _np(tensor) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().to("cpu").float().numpy()


def layer_weights(layer, spec: ModelSpec) -> dict[str, np.ndarray | None]:
    """Weights of one ``OPTDecoderLayer`` in the layout ``graphs.build_layer`` documents."""
    attn = layer.self_attn
    scaling = np.float32(spec.head_dim ** -0.5)
    q_w, k_w, v_w = (_np(p.weight).T for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    w: dict[str, np.ndarray | None] = {"qkv.weight": np.concatenate([q_w * scaling, k_w, v_w], axis=1)}
    biases = [_np(p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    w["qkv.bias"] = None if biases[0] is None else np.concatenate([biases[0] * scaling, biases[1], biases[2]])
    for key, module in (("out_proj", attn.out_proj), ("fc1", layer.fc1), ("fc2", layer.fc2)):
        w[f"{key}.weight"] = _np(module.weight).T
        w[f"{key}.bias"] = _np(module.bias)
    for key, module in (("ln_attn", layer.self_attn_layer_norm), ("ln_ffn", layer.final_layer_norm)):
        w[f"{key}.weight"], w[f"{key}.bias"] = layer_norm_params(_np(module.weight), _np(module.bias),
                                                                 spec.hidden_size)
    return w


def embed_weights(model) -> dict[str, np.ndarray | None]:
    decoder = model.model.decoder
    return {"embed_tokens.weight": _np(decoder.embed_tokens.weight),
            "embed_positions.weight": _np(decoder.embed_positions.weight),
            "project_in.weight": None if decoder.project_in is None else _np(decoder.project_in.weight).T}


def head_weights(model) -> dict[str, np.ndarray | None]:
    decoder = model.model.decoder
    ln = decoder.final_layer_norm
    w: dict[str, np.ndarray | None] = {"lm_head.weight": _np(model.lm_head.weight),
                                       "project_out.weight": None if decoder.project_out is None
                                       else _np(decoder.project_out.weight).T}
    if ln is not None:
        w["final_layer_norm.weight"], w["final_layer_norm.bias"] = layer_norm_params(
            _np(ln.weight), _np(ln.bias), ln.normalized_shape[0])
    return w
