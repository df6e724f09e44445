"""Read a Hugging Face checkpoint of a supported family: its config, its ModelSpec, the model."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

from .. import families
from ..errors import CheckpointError
from ..manifest import ModelSpec


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_local(source: str) -> bool:
    """A path that cannot be a hub id ("name" or "org/name") is reported as a missing directory."""
    return not _HUB_ID.match(source)


BUNDLED = "bundled"  # the source name of the model that ships inside the package (skipdeploy.bundled)


def local_source(source: str | os.PathLike, log: Callable[[str], None] | None = None) -> str:
    """``source`` as transformers reads it: ``gguf:FILE`` (or ``gguf:smollm2``) becomes the
    checkpoint directory converted from that file (once, then cached; ``skipdeploy.gguf``), and
    ``"bundled"`` the bundled model's directory (a local directory of that name wins)."""
    from ..gguf import resolve_source

    if str(source) == BUNDLED and not Path(BUNDLED).exists():
        from ..bundled import bundled_model

        path = bundled_model()
        if path is None:
            raise CheckpointError("this installation has no bundled model (skipdeploy/assets/stdlib-opt)")
        return str(path)
    return resolve_source(str(source), log=log)


def load_config(source: str | os.PathLike) -> Any:
    """The transformers config of ``source`` (a local directory, a hub id or ``gguf:FILE``), or a
    clear error."""
    import logging

    from transformers import AutoConfig

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # offline retries are not the user's news
    source = local_source(source)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source} is a file; pass the checkpoint directory (the one holding config.json)")
        if (path / "manifest.json").is_file() and not (path / "config.json").is_file():
            raise CheckpointError(f"{source} is already a skipdeploy export, not a checkpoint: run it as it is "
                                  f"(skipdeploy generate {source} --prompt TEXT, or skipdeploy serve {source})")
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


def load_model(source: str | os.PathLike) -> tuple[ModelSpec, Any]:
    """Spec and the float32 transformers model (eager attention: the check reference)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is the one that counts
    source = local_source(source)
    config = load_config(source)
    family = families.for_config(config, str(source))
    spec = family.spec(config, str(source))
    path = Path(str(source)).expanduser()
    try:
        model = family.hf_class().from_pretrained(str(path) if path.exists() else str(source),
                                                  dtype=torch.float32, attn_implementation="eager")
    except Exception as exc:
        raise CheckpointError(f"cannot load the weights of {source}: {_first_line(exc)}") from None
    return spec, model.eval()
