"""A loaded export: ``generate`` token ids or text, ``stream`` them, ``score`` given text.

Every call drives a :class:`Generator` (``runtime/generator.py``), which owns its cache; the
runtime holds an :class:`~skipdeploy.runtime.core.EngineCore` (the manifest, the static engine,
the tokenizer, the memory budget: what ``ServingEngine`` holds too) and the one lock that a forward
pass takes. The runtime core imports numpy, onnxruntime (through the engine) and tokenizers only:
no torch, no transformers.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..engines import KVCache, StaticEngine
from ..errors import InputError
from ..manifest import Manifest
from ..schedule import LayerSchedule
from .generator import GenerationResult, Generator, Step
from .core import EngineCore, check_memory_limit, open_engine
from .inputs import prompt_rows
from .kv import cache_bytes
from .sampling import GenerationConfig
from .text import CompletionText
from .tokenizer import Tokenizer


class Runtime:
    """A loaded export. It may be shared between threads: each forward pass holds the engine,
    and every generation owns its own KV cache, so concurrent generations interleave by step."""

    def __init__(self, manifest: Manifest, engine: StaticEngine, memory_limit: int | None = None) -> None:
        self.core = EngineCore(manifest, engine, memory_limit)
        self.manifest, self.engine, self.spec = manifest, engine, manifest.model
        # Reentrant: a stream() iterator dropped in a reference cycle is closed by the garbage
        # collector in whatever thread runs it, possibly one inside a forward, and closing
        # releases its cache under this lock.
        self.engine_lock = threading.RLock()

    @property
    def memory_limit(self) -> int | None:
        return self.core.memory_limit

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    # -- text ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self.core.tokenizer

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int | None = None, **kwargs) -> GenerationResult:
        """``generate`` from text; each row's text ends before its first stop string (every door's rule)."""
        result = self.generate([self.tokenizer.encode(p) for p in prompts], max_new_tokens, **kwargs)
        config = kwargs.get("config") or GenerationConfig()
        stop = config.updated(stop_strings=kwargs.get("stop_strings")).stop_strings
        result.text = [CompletionText(self.tokenizer.decode, stop, t).text() for t in result.tokens]
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
        """A new cache from the engine, refused up front when it does not fit. Under the engine
        lock, as every forward pass: a CUDA graph being captured in another thread's forward is
        invalidated by any allocation on the device meanwhile."""
        need = cache_bytes(capacities, batch, self.spec.kv_heads, self.spec.head_dim, self.engine.cache_itemsize)
        with self.engine_lock:
            self.core.check_fits(need, "the KV cache needs {need} for this request",
                                 "use a smaller batch, fewer new tokens or a shorter prompt")
            return self.engine.allocate(capacities, batch)

    def release_cache(self, cache: KVCache) -> None:
        """Give a cache back to the engine (its pool is shared by every thread's generations)."""
        with self.engine_lock:
            self.engine.release(cache)

    def close(self) -> None:
        self.engine.close()


def load(directory: str | Path, backend: str = "onnxruntime", check_files: bool = True,
         memory_limit: int | None = None, **options) -> Runtime:
    """Load an export directory: checks the manifest and, with ``check_files``, every file's sha256.

    ``memory_limit`` caps the bytes a request's KV cache may take (default: what the device has
    free); ``options`` go to the backend (``device``, ``threads``: at most the machine's cores, and
    the backend's own, e.g. ``dtype`` for torch). The same core opens ``ServingEngine``'s export.
    """
    if "verify" in options:  # the keyword's old name; `skipdeploy verify` checks numerics, this checksums
        warnings.warn("load(verify=...) is now load(check_files=...)", DeprecationWarning, stacklevel=2)
        check_files = options.pop("verify")
    memory_limit = check_memory_limit(memory_limit)
    manifest, engine = open_engine(directory, backend=backend, check_files=check_files, **options)
    return Runtime(manifest, engine, memory_limit=memory_limit)


def _log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
