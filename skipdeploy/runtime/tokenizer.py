"""Text in, text out through the ``tokenizers`` library alone."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, ManifestError


class Tokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ManifestError(f"cannot read the tokenizer {path}: {exc}") from None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"a prompt must be a string (got {type(text).__name__})")
        if not text:
            raise InputError("the prompt is empty")
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
