"""Training and evaluation text: files, directories, and the Python standard library.

``--data`` values are files, directories (searched recursively for ``*.py`` and ``*.txt``), or
``stdlib:train`` / ``stdlib:heldout``: the ``.py`` files of the running interpreter's standard
library (``sysconfig.get_paths()["stdlib"]``, without site-packages and without the regression
test package ``test``), split by top-level module with a stable hash, so that every file of a
module lands on the same side and the split is the same on every machine with the same Python.
Documents are tokenized without special tokens, each preceded by the BOS/EOS token, joined,
and cut into fixed-length chunks.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import InputError

HELDOUT_PERCENT = 10
STDLIB_EXCLUDE = {"site-packages", "dist-packages", "test", "__pycache__"}
SUFFIXES = (".py", ".txt")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_of(path: Path, root: Path) -> str:
    """Top-level module name of a file under the stdlib root (``email/mime/text.py`` -> ``email``)."""
    first = path.relative_to(root).parts[0]
    return first[:-3] if first.endswith(".py") else first


def is_heldout(module: str) -> bool:
    digest = hashlib.sha256(module.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def stdlib_files(split: str) -> list[Path]:
    """Sorted ``.py`` files of the standard library's ``train`` or ``heldout`` split."""
    if split not in ("train", "heldout"):
        raise InputError(f"unknown stdlib split {split!r} (use stdlib:train or stdlib:heldout)")
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in STDLIB_EXCLUDE for part in rel[:-1]) or (rel[0] == "test"):
            continue
        if is_heldout(module_of(path, root)) == (split == "heldout"):
            files.append(path)
    if not files:
        raise InputError(f"no standard library files found under {root}")
    return files


def resolve(sources: Iterable[str]) -> list[Path]:
    """Files named by ``--data`` values, in a stable order."""
    files: list[Path] = []
    for source in sources:
        if source.startswith("stdlib:"):
            files += stdlib_files(source.split(":", 1)[1])
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise InputError(f"{source} holds no *.py or *.txt files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"data source {source} is neither a file, a directory, nor stdlib:train|heldout")
    return files


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a directory holding one."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"no tokenizer.json at {path}: training and evaluation on text need the model's tokenizer")
    return Tokenizer.from_file(str(path))


def token_stream(files: list[Path], tokenizer, bos_id: int) -> np.ndarray:
    """All documents' ids, each document preceded by ``bos_id``, as one int64 array."""
    texts = [read_text(p) for p in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError("the data holds no text")
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    parts = []
    for enc in encoded:
        parts.append(np.array([bos_id, *enc.ids], dtype=np.int64))
    return np.concatenate(parts)


def chunks(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping ``[N, seq_len]`` chunks of a token stream (the tail is dropped)."""
    n = len(stream) // seq_len
    if n < 1:
        raise InputError(f"the data has {len(stream)} tokens, fewer than one chunk of {seq_len}")
    return stream[:n * seq_len].reshape(n, seq_len)


def load_chunks(sources: Iterable[str], tokenizer, seq_len: int, bos_id: int = 2) -> np.ndarray:
    return chunks(token_stream(resolve(sources), tokenizer, bos_id), seq_len)
