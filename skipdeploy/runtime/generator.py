"""The decoding loop: prefill, then one schedule step per generated token.

Read it top to bottom in :meth:`Runtime.stream`. The runtime core imports numpy, onnxruntime
(through the engine) and tokenizers only: no torch, no transformers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..engines import Engine, KVCache, create_engine
from ..errors import CapacityError, InputError, SkipDeployError
from ..manifest import Manifest, read_manifest
from ..schedule import LayerSchedule
from .tokenizer import Tokenizer

MASK_VALUE = -1e9
_DEFAULT = object()


@dataclass
class Step:
    """One generated token per row (``None`` for rows that had already finished)."""

    index: int
    tokens: list[int | None]
    layers: int  # decoder layers run to produce these tokens
    finished: list[bool]


@dataclass
class GenerationResult:
    tokens: list[list[int]]           # per row: generated ids only, up to and including EOS
    layers_per_step: list[int]        # layers run by decode step s (the forward of generated token s)
    prompt_layers: int                # layers run over the prompt
    finish_reasons: list[str]         # "eos" or "length" per row
    schedule: LayerSchedule
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    logits: list[np.ndarray] | None = None  # [B,V] per generated token, with output_logits=True
    text: list[str] | None = None

    @property
    def mean_layers_per_token(self) -> float:
        """Mean layers of the forwards that produced generated tokens 1.. (token 0 comes from the prefill)."""
        return float(np.mean(self.layers_per_step)) if self.layers_per_step else float(self.prompt_layers)

    @property
    def ideal_speedup(self) -> float:
        return self.schedule.num_layers / self.mean_layers_per_token

    def to_dict(self) -> dict:
        steps = len(self.layers_per_step)
        return {"tokens": self.tokens, "text": self.text, "layers_per_step": self.layers_per_step,
                "prompt_layers": self.prompt_layers, "finish_reasons": self.finish_reasons,
                "schedule": self.schedule.to_dict(), "mean_layers_per_token": self.mean_layers_per_token,
                "ideal_speedup": self.ideal_speedup, "prefill_ms": 1e3 * self.prefill_seconds,
                "decode_ms_per_step": 1e3 * self.decode_seconds / steps if steps else None}


@dataclass
class _Plan:
    ids: np.ndarray        # [B, Tp] left-padded prompt
    lengths: np.ndarray    # real prompt length per row
    bias: np.ndarray       # [B, Tp + N] 0 for real positions, MASK_VALUE for padding
    capacities: list[int]
    eos: set[int] = field(default_factory=set)


class Runtime:
    """A loaded export: ``generate`` token ids or text with a SkipDecode schedule."""

    def __init__(self, manifest: Manifest, engine: Engine) -> None:
        self.manifest = manifest
        self.engine = engine
        self.spec = manifest.model
        self._tokenizer: Tokenizer | None = None
        self._lock = threading.Lock()  # one cache and one set of bindings per runtime

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

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int = 32, **kwargs) -> GenerationResult:
        result = self.generate([self.tokenizer.encode(p) for p in prompts], max_new_tokens, **kwargs)
        result.text = [self.tokenizer.decode(t) for t in result.tokens]
        return result

    # -- tokens ----------------------------------------------------------------------------
    def generate(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 schedule: LayerSchedule | None = None, *, eos_token_id=_DEFAULT,
                 output_logits: bool = False) -> GenerationResult:
        """Greedy decoding of a batch of prompts of any lengths (left-padded internally)."""
        steps = self.stream(input_ids, max_new_tokens, schedule, eos_token_id=eos_token_id,
                            output_logits=output_logits)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def stream(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int = 32,
               schedule: LayerSchedule | None = None, *, eos_token_id=_DEFAULT,
               output_logits: bool = False) -> Iterator[Step]:
        """Yield a :class:`Step` per generated token; the generator returns the GenerationResult."""
        schedule = schedule or self.manifest.schedule
        if schedule.num_layers != self.spec.num_layers:
            raise InputError(f"the schedule is for {schedule.num_layers} layers, the model has {self.spec.num_layers}")
        plan = self._plan(input_ids, max_new_tokens, schedule, eos_token_id)
        with self._lock:
            return (yield from self._decode(plan, max_new_tokens, schedule, output_logits))

    def _decode(self, plan: _Plan, max_new_tokens: int, schedule: LayerSchedule,
                output_logits: bool) -> Iterator[Step]:
        engine = self.engine
        B, Tp = plan.ids.shape
        cache = self._allocate(plan.capacities, B)
        start = time.perf_counter()

        # Prefill: all prompt positions through the prompt layers. Positions follow Hugging Face:
        # cumulative sum of the attention mask minus one, so padding gets -1.
        real = plan.bias[:, :Tp] == 0
        positions = np.where(real, np.cumsum(real, axis=1) - 1, -1)
        prompt_layers = schedule.prompt_layers()
        hidden = engine.embed(plan.ids, positions)
        bias = np.ascontiguousarray(plan.bias[:, :Tp])
        for layer in prompt_layers:
            hidden = self._run_layer(layer, hidden, cache, 0, bias)
        logits = engine.head(hidden)
        prefill_seconds = time.perf_counter() - start

        tokens: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        reasons = ["length"] * B
        layers_per_step: list[int] = []
        kept_logits: list[np.ndarray] = []
        pad = self._pad_id()
        next_pos = plan.lengths.astype(np.int64)
        decode_start = time.perf_counter()
        for step in range(max_new_tokens):
            self._check_finite(logits, step, schedule, prompt_layers if step == 0 else schedule.layers(step - 1))
            if output_logits:
                kept_logits.append(logits.copy())
            picked = logits.argmax(axis=-1)
            emitted: list[int | None] = []
            for row in range(B):
                if finished[row]:
                    emitted.append(None)
                    continue
                token = int(picked[row])
                tokens[row].append(token)
                emitted.append(token)
                if token in plan.eos:
                    finished[row], reasons[row] = True, "eos"
            yield Step(step, emitted, len(prompt_layers) if step == 0 else layers_per_step[-1], list(finished))
            if step == max_new_tokens - 1 or all(finished):
                break
            # Decode step `step`: the forward of generated token `step`, with the schedule's layers.
            # Finished rows keep decoding as padding so that the batch stays static.
            feed = np.array([[pad if finished[r] else tokens[r][-1]] for r in range(B)], np.int64)
            layers = schedule.layers(step)
            past = Tp + step
            hidden = engine.embed(feed, next_pos[:, None])
            bias = np.ascontiguousarray(plan.bias[:, :past + 1])
            for layer in layers:
                hidden = self._run_layer(layer, hidden, cache, past, bias)
            logits = engine.head(hidden)
            layers_per_step.append(len(layers))
            next_pos += 1
        return GenerationResult(
            tokens=tokens, layers_per_step=layers_per_step, prompt_layers=len(prompt_layers),
            finish_reasons=reasons, schedule=schedule, prefill_seconds=prefill_seconds,
            decode_seconds=time.perf_counter() - decode_start,
            logits=kept_logits if output_logits else None)

    def _run_layer(self, layer: int, hidden, cache: KVCache, past: int, bias: np.ndarray):
        # Every layer a token runs was run by every earlier token (the top block only shrinks),
        # so its valid length must equal the number of positions before this one.
        if cache.valid[layer] != past:
            raise SkipDeployError(f"internal error: layer {layer} holds {cache.valid[layer]} cached positions, "
                                  f"expected {past}; the schedule is not monotone")
        hidden = self.engine.layer(layer, hidden, cache, past, bias)
        cache.valid[layer] = bias.shape[1]  # past + new positions
        return hidden

    # -- planning and checks ---------------------------------------------------------------
    def _plan(self, input_ids, max_new_tokens: int, schedule: LayerSchedule, eos_token_id) -> _Plan:
        spec = self.spec
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1 (got {max_new_tokens!r})")
        rows = _rows(input_ids, spec.vocab_size)
        max_batch = self.manifest.limits.get("max_batch")
        if max_batch and len(rows) > max_batch:
            raise CapacityError(f"batch of {len(rows)} exceeds the {max_batch} rows this export was sized for; "
                                "re-export with a larger --max-batch")
        Tp = max(len(r) for r in rows)
        max_length = min(self.manifest.limits.get("max_length", spec.max_positions), spec.max_positions)
        needed = Tp + max_new_tokens - 1  # the last generated token is never fed back
        if needed > max_length:
            raise CapacityError(f"a prompt of {Tp} tokens plus {max_new_tokens} new tokens needs {needed} positions; "
                                f"this export allows {max_length}")
        B, N = len(rows), max_new_tokens
        pad = self._pad_id()
        ids = np.full((B, Tp), pad, np.int64)
        bias = np.zeros((B, Tp + N), np.float32)
        for r, row in enumerate(rows):
            ids[r, Tp - len(row):] = row
            bias[r, :Tp - len(row)] = MASK_VALUE
        return _Plan(ids=ids, lengths=np.array([len(r) for r in rows]), bias=bias,
                     capacities=plan_capacities(schedule, Tp, N), eos=self._eos_ids(eos_token_id))

    def _allocate(self, capacities: list[int], batch: int) -> KVCache:
        itemsize = 2 if self.manifest.dtype == "float16" else 4
        need = cache_bytes(capacities, batch, self.spec.num_heads, self.spec.head_dim, itemsize)
        available = self.engine.available_memory()
        if available is not None and need > available:
            raise CapacityError(f"the KV cache needs {_gib(need)} for this request and only {_gib(available)} "
                                "is available; use a smaller batch, fewer new tokens or a shorter prompt")
        return self.engine.allocate(capacities, batch)

    def _check_finite(self, logits: np.ndarray, step: int, schedule: LayerSchedule, layers) -> None:
        if not np.isfinite(logits).all():
            raise SkipDeployError(f"non-finite logits at generated token {step} "
                                  f"(after layers {layers[0]}..{layers[-1]}); the export or its weights are broken")

    def _pad_id(self) -> int:
        for value in (self.spec.pad_token_id, self.spec.eos_token_id, 0):
            if value is not None and 0 <= value < self.spec.vocab_size:
                return value
        return 0

    def _eos_ids(self, eos_token_id) -> set[int]:
        if eos_token_id is _DEFAULT:
            eos_token_id = self.spec.eos_token_id
        if eos_token_id is None:
            return set()
        return {int(t) for t in (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])}

    def close(self) -> None:
        self.engine.close()


def plan_capacities(schedule: LayerSchedule, prompt_len: int, max_new_tokens: int) -> list[int]:
    """Positions each layer's cache must hold: the prompt (if the layer runs on it) plus one per
    decode step that runs the layer. The last generated token is never fed back."""
    caps = [0] * schedule.num_layers
    for layer in schedule.prompt_layers():
        caps[layer] = prompt_len
    for step in range(max_new_tokens - 1):
        for layer in schedule.layers(step):
            caps[layer] += 1
    return caps


def cache_bytes(capacities: list[int], batch: int, heads: int, head_dim: int, itemsize: int) -> int:
    return 2 * sum(capacities) * batch * heads * head_dim * itemsize


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _rows(input_ids, vocab_size: int) -> list[list[int]]:
    if isinstance(input_ids, np.ndarray):
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise InputError("input_ids must be a non-empty list of prompts (lists of token ids)")
    rows = []
    for r, row in enumerate(input_ids):
        if isinstance(row, (int, np.integer)):
            raise InputError("input_ids must be a list of prompts, each a list of token ids (got a flat list)")
        row = list(row)
        if not row:
            raise InputError(f"prompt {r} is empty; every prompt needs at least one token")
        for t in row:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise InputError(f"prompt {r} holds {t!r}, which is not a token id")
            if not 0 <= t < vocab_size:
                raise InputError(f"prompt {r} holds token id {t}, outside the vocabulary [0, {vocab_size})")
        rows.append([int(t) for t in row])
    return rows


def load(directory: str | Path, backend: str = "onnxruntime", verify: bool = True, **options) -> Runtime:
    """Load an export directory: checks the manifest (and every file's sha256 when ``verify``)."""
    manifest = read_manifest(directory, verify=verify)
    return Runtime(manifest, create_engine(backend, manifest, **options))
