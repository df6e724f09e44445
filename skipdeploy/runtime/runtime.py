"""A loaded export: ``generate`` token ids or text, ``stream`` them, ``score`` given text.

Every call drives a :class:`Generator` (``runtime/generator.py``), which owns its cache; the
runtime holds the engine, the tokenizer and the one lock that a forward pass takes. The runtime
core imports numpy, onnxruntime (through the engine) and tokenizers only: no torch, no
transformers.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..engines import Engine, KVCache, create_engine
from ..errors import CapacityError, InputError
from ..manifest import Manifest, read_manifest
from ..numerics import itemsize
from ..schedule import LayerSchedule
from .generator import GenerationResult, Generator, Step
from .inputs import prompt_rows
from .kv import cache_bytes, format_bytes
from .tokenizer import Tokenizer


class Runtime:
    """A loaded export. It may be shared between threads: each forward pass holds the engine,
    and every generation owns its own KV cache, so concurrent generations interleave by step."""

    def __init__(self, manifest: Manifest, engine: Engine, memory_limit: int | None = None) -> None:
        self.manifest = manifest
        self.engine = engine
        self.spec = manifest.model
        self.memory_limit = memory_limit
        self.engine_lock = threading.Lock()
        self._tokenizer: Tokenizer | None = None

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    # -- text ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            path = self.manifest.tokenizer_path
            if path is None:
                raise InputError(f"the export {self.manifest.directory} has no tokenizer "
                                 "(its checkpoint had none): pass token ids instead of text")
            self._tokenizer = Tokenizer(path)
        return self._tokenizer

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int | None = None, **kwargs) -> GenerationResult:
        result = self.generate([self.tokenizer.encode(p) for p in prompts], max_new_tokens, **kwargs)
        result.text = [self.tokenizer.decode(t) for t in result.tokens]
        return result

    # -- tokens ----------------------------------------------------------------------------
    def generator(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int | None = None,
                  schedule: LayerSchedule | None = None, **kwargs) -> Generator:
        """A :class:`Generator` for a batch of prompts; step it yourself, then ``close()`` it."""
        return Generator(self, input_ids, max_new_tokens, schedule, **kwargs)

    def stream(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int | None = None,
               schedule: LayerSchedule | None = None, **kwargs) -> Iterator[Step]:
        """Yield a :class:`Step` per generated token; the generator returns the GenerationResult.
        Arguments as :class:`Generator` takes them."""
        with self.generator(input_ids, max_new_tokens, schedule, **kwargs) as gen:
            while not gen.is_done():
                yield gen.generate_next_token()
            return gen.result()

    def generate(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int | None = None,
                 schedule: LayerSchedule | None = None, **kwargs) -> GenerationResult:
        """Decode a batch of prompts of any lengths (left-padded internally); see :class:`Generator`."""
        with self.generator(input_ids, max_new_tokens, schedule, **kwargs) as gen:
            while not gen.is_done():
                gen.generate_next_token()
            return gen.result()

    def score(self, input_ids: Sequence[Sequence[int]], context_length: int,
              schedule: LayerSchedule | None = None) -> np.ndarray:
        """Teacher-forced log-probabilities ``[B, S - c]`` of tokens ``c .. S-1`` under ``schedule``.

        Rows are unpadded and of one length ``S``; the first ``c = context_length`` tokens are the
        prompt (prefill with the prompt layers, whose logits score token ``c``); then the TRUE token
        ``c + j`` is fed at decode step ``j`` with ``schedule.layers(j)``, whose logits score token
        ``c + j + 1``: exactly the forwards ``generate`` would run had it produced these tokens.
        """
        rows = prompt_rows(input_ids, self.spec.vocab_size)
        S = len(rows[0])
        if any(len(r) != S for r in rows):
            raise InputError("score needs rows of one length (no padding)")
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) \
                or not 1 <= context_length < S:
            raise InputError(f"context_length must be in [1, {S - 1}] for rows of {S} tokens (got {context_length})")
        c, N = context_length, S - context_length
        ids = np.array(rows, np.int64)
        out = np.empty((len(rows), N), np.float64)
        with self.generator([r[:c] for r in rows], N, schedule, eos_token_id=None) as gen:
            for j in range(N):
                out[:, j] = _log_softmax(gen.compute_logits())[np.arange(len(rows)), ids[:, c + j]]
                gen.append_tokens(ids[:, c + j])
        return out

    # -- memory ----------------------------------------------------------------------------
    def allocate_cache(self, capacities: list[int], batch: int) -> KVCache:
        """A new cache from the engine, refused up front when it does not fit."""
        need = cache_bytes(capacities, batch, self.spec.kv_heads, self.spec.head_dim, itemsize(self.manifest.dtype))
        available = self.engine.available_memory()
        if self.memory_limit is not None:
            available = min(self.memory_limit, available) if available is not None else self.memory_limit
        if available is not None and need > available:
            raise CapacityError(f"the KV cache needs {format_bytes(need)} for this request and only "
                                f"{format_bytes(available)} is available; use a smaller batch, fewer new tokens "
                                "or a shorter prompt")
        return self.engine.allocate(capacities, batch)

    def close(self) -> None:
        self.engine.close()


def load(directory: str | Path, backend: str = "onnxruntime", check_files: bool = True,
         memory_limit: int | None = None, **options) -> Runtime:
    """Load an export directory: checks the manifest and, with ``check_files``, every file's sha256.

    ``memory_limit`` caps the bytes a request's KV cache may take (default: what the device has
    free); ``options`` go to the backend (e.g. ``threads`` for onnxruntime, ``device`` for torch).
    """
    if "verify" in options:  # the keyword's old name; `skipdeploy verify` checks numerics, this checksums
        warnings.warn("load(verify=...) is now load(check_files=...)", DeprecationWarning, stacklevel=2)
        check_files = options.pop("verify")
    if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, np.integer))
                                     or memory_limit < 1):
        raise InputError(f"memory_limit must be a number of bytes >= 1 (got {memory_limit!r})")
    threads = options.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1):
        raise InputError(f"threads must be an integer >= 1 (got {threads!r}); leave it out to use every core")
    manifest = read_manifest(directory, verify=check_files)
    return Runtime(manifest, create_engine(backend, manifest, **options), memory_limit=memory_limit)


def _log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
