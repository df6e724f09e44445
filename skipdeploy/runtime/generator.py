"""The decoding step every caller drives: a :class:`Generator` is one batch of prompts being decoded.

    gen = runtime.generator([[2, 100, 200]], 16, schedule)
    while not gen.is_done():
        step = gen.generate_next_token()     # compute the logits, pick, append
    result = gen.result(); gen.close()

``generate``, ``stream``, ``score`` (teacher forcing: ``compute_logits`` then ``append_tokens``
of the true tokens), ``verify``, ``bench`` and ``eval`` all drive it. A generator owns its KV
cache and the valid length of every layer, so one loaded runtime holds any number of them at
once; their steps may interleave in any order, from one thread or several (each forward pass
holds the runtime's engine for its duration).

Step ``s`` of the schedule is the forward pass of generated token ``s`` (it produces token
``s + 1``); token 0 comes from the prefill, so N new tokens take N - 1 decode steps.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError, NumericalError
from ..schedule import LayerSchedule
from .inputs import DEFAULT, PaddedBatch
from .kv import check_cached, plan_capacities
from .sampling import GenerationConfig, TokenPicker


@dataclass
class Step:
    """One generated token per row (``None`` for rows that had already finished)."""

    token_index: int  # which generated token: 0 comes from the prefill, token i > 0 from decode step i - 1
    tokens: list[int | None]
    layers: int  # decoder layers run to produce these tokens
    finished: list[bool]

    @property
    def index(self) -> int:
        """Alias of ``token_index`` (its older name; it counts tokens, not decode steps)."""
        return self.token_index


@dataclass
class GenerationResult:
    tokens: list[list[int]]           # per row: generated ids only, up to and including EOS
    layers_per_step: list[int]        # layers run by decode step s (the forward of generated token s)
    prompt_layers: int                # layers run over the prompt
    finish_reasons: list[str]         # "eos", "stop" (stop token or string) or "length" per row
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
    def layer_speedup(self) -> float:
        """All layers over the mean layers run, over the decode steps this generation ran."""
        return self.schedule.num_layers / self.mean_layers_per_token

    @property
    def ideal_speedup(self) -> float:
        warnings.warn("GenerationResult.ideal_speedup is now layer_speedup", DeprecationWarning, stacklevel=2)
        return self.layer_speedup

    def to_dict(self) -> dict:
        steps = len(self.layers_per_step)
        return {"tokens": self.tokens, "text": self.text, "layers_per_step": self.layers_per_step,
                "prompt_layers": self.prompt_layers, "finish_reasons": self.finish_reasons,
                "schedule": self.schedule.to_dict(), "mean_layers_per_token": self.mean_layers_per_token,
                "layer_speedup": self.layer_speedup, "prefill_ms": 1e3 * self.prefill_seconds,
                "decode_ms_per_step": 1e3 * self.decode_seconds / steps if steps else None}


class Generator:
    """A batch of prompts (any lengths, left-padded) decoded together with one schedule.

    Decoding knobs come from ``config`` (a :class:`GenerationConfig`) and/or keyword arguments
    of the same names: ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``repetition_penalty``,
    ``seed``, ``stop_token_ids``, ``stop_strings``. ``eos_token_id`` defaults to the model's;
    None disables it. Finished rows keep decoding as padding until the batch is done. ``runtime``
    is the loaded :class:`~skipdeploy.runtime.Runtime` whose engine, lock and tokenizer it uses.
    """

    def __init__(self, runtime, input_ids, max_new_tokens: int | None = None,
                 schedule: LayerSchedule | None = None, *, config: GenerationConfig | None = None,
                 eos_token_id=DEFAULT, output_logits: bool = False, **knobs) -> None:
        spec, manifest = runtime.spec, runtime.manifest
        checked = runtime.core.check_request(input_ids, max_new_tokens, schedule, config, knobs, eos_token_id,
                                             default_schedule=manifest.schedule, max_length=runtime.max_length,
                                             holder="this export", max_batch=manifest.limits.get("max_batch"))
        self.config = config = checked.config
        self.runtime, self.engine = runtime, runtime.engine
        if config.stop_strings:
            if runtime.manifest.tokenizer_path is None:  # stop strings need text: fail now, not mid-generation
                raise InputError(f"stop strings need the model's tokenizer and the export "
                                 f"{runtime.manifest.directory} has none: stop on token ids instead "
                                 "(stop_token_ids, --stop-token-id)")
        self.schedule = schedule = checked.schedule
        self.rows = rows = checked.rows
        B, N, Tp = len(rows), config.max_new_tokens, max(len(r) for r in rows)
        self.eos = checked.eos
        self.batch = PaddedBatch.left_pad(rows, spec.pad_id, N)
        self.cache = runtime.allocate_cache(plan_capacities(schedule, Tp, N), B)
        self.valid = [0] * spec.num_layers  # cached positions per layer, checked against the schedule
        self.picker = TokenPicker(config, rows)
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.finished = [False] * B
        self.reasons = ["length"] * B
        self.layers_per_step: list[int] = []
        self.kept_logits: list[np.ndarray] | None = [] if output_logits else None
        self.prefill_seconds = self.decode_seconds = 0.0
        self.generated = 0        # tokens appended so far (per row; finished rows get None)
        self._forwards = 0        # forward passes run: the prefill, then one per decode step
        self._logits: np.ndarray | None = None
        self._layers_of_logits = 0

    # -- the step ----------------------------------------------------------------------------------
    def is_done(self) -> bool:
        return self.generated >= self.config.max_new_tokens or all(self.finished)

    def compute_logits(self) -> np.ndarray:
        """Logits [B, V] for the next token: runs the prefill the first time, then the decode step
        that feeds the tokens appended last. Calling it again before ``append_tokens`` returns
        the same logits."""
        if self._logits is None:
            if self.is_done():
                raise InputError("this generation is done: no more tokens to compute")
            start = time.perf_counter()
            self._logits = self._forward_next()
            elapsed = time.perf_counter() - start
            if self._forwards == 1:
                self.prefill_seconds += elapsed
            else:
                self.decode_seconds += elapsed
            if self.kept_logits is not None:
                self.kept_logits.append(self._logits)
        return self._logits

    def append_tokens(self, tokens: Sequence[int | None]) -> Step:
        """Record the next token of every row (ignored for rows that have finished); the next
        ``compute_logits`` feeds them. Teacher forcing appends the true tokens."""
        if self._logits is None:
            raise InputError("compute_logits() first: tokens are appended after the logits that predict them")
        if len(tokens) != len(self.rows):
            raise InputError(f"append_tokens takes one token per row ({len(self.rows)}), got {len(tokens)}")
        emitted: list[int | None] = []
        for row, token in enumerate(tokens):
            if self.finished[row]:
                emitted.append(None)
                continue
            token = int(token)
            if not 0 <= token < self.runtime.spec.vocab_size:
                raise InputError(f"token id {token} is outside the vocabulary [0, {self.runtime.spec.vocab_size})")
            self.tokens[row].append(token)
            emitted.append(token)
            reason = self.config.finish_reason(token, self.tokens[row], self.eos, self._decode)
            if reason:
                self.finished[row], self.reasons[row] = True, reason
        self._logits = None
        self.generated += 1
        return Step(self.generated - 1, emitted, self._layers_of_logits, list(self.finished))

    def generate_next_token(self) -> Step:
        """Compute the logits, pick one token per row (greedy or sampled), append it."""
        logits = self.compute_logits()
        start = time.perf_counter()
        picked = self.picker.pick(logits)
        if self._forwards > 1:
            self.decode_seconds += time.perf_counter() - start
        return self.append_tokens(picked)

    def result(self) -> GenerationResult:
        return GenerationResult(
            tokens=self.tokens, layers_per_step=self.layers_per_step, prompt_layers=len(self.schedule.prompt_layers()),
            finish_reasons=self.reasons, schedule=self.schedule, prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds, logits=self.kept_logits)

    def close(self) -> None:
        """Give the cache back to the engine (idempotent); the generator cannot step afterwards."""
        if self.cache is not None:
            self.runtime.release_cache(self.cache)
            self.cache = None

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- forward passes ----------------------------------------------------------------------------
    def _forward_next(self) -> np.ndarray:
        if self.cache is None:
            raise InputError("this generator was closed")
        batch = self.batch
        Tp = batch.ids.shape[1]
        if self._forwards == 0:  # the prefill: every prompt position through the prompt layers
            ids, positions, layers, past = batch.ids, batch.positions, self.schedule.prompt_layers(), 0
        else:  # decode step s feeds generated token s; finished rows feed padding
            s = self._forwards - 1
            pad = self.runtime.spec.pad_id
            ids = np.array([[pad if self.finished[r] else self.tokens[r][-1]] for r in range(len(self.rows))],
                           np.int64)
            positions = (batch.lengths + s)[:, None]
            layers, past = self.schedule.layers(s), Tp + s
            self.layers_per_step.append(len(layers))
        new = ids.shape[1]
        bias = np.ascontiguousarray(batch.bias[:, :past + new])
        with self.runtime.engine_lock:
            logits = self._forward(ids, positions, layers, past, bias).copy()
        self._forwards += 1
        self._layers_of_logits = len(layers)
        return logits

    def _forward(self, ids, positions, layers, past: int, bias: np.ndarray) -> np.ndarray:
        """embed -> layers -> head for new positions starting at ``past``; checks the logits."""
        engine = self.engine
        hidden = self._run_layers(layers, engine.embed(ids, positions), past, bias, positions)
        logits = engine.head(hidden)
        if not np.isfinite(logits).all():
            self._locate_non_finite(ids, positions, layers, past, bias)
        return logits

    def _run_layers(self, layers, hidden, past: int, bias: np.ndarray, positions: np.ndarray):
        for layer in layers:
            check_cached(layer, self.valid[layer], past)
        hidden = self.engine.layers(layers, hidden, self.cache, past, bias, positions)
        for layer in layers:
            self.valid[layer] = bias.shape[1]  # past + new positions
        return hidden

    def _locate_non_finite(self, ids, positions, layers, past: int, bias) -> None:
        """Replay the forward pass checking every layer's output; raise naming the first bad one.

        The replay writes the same keys and values into the same cache positions, so the cache is
        unchanged.
        """
        engine = self.engine
        where = "the embedding"
        hidden = engine.embed(ids, positions)
        if np.isfinite(engine.to_numpy(hidden)).all():
            where = "the LM head"
            for layer in layers:
                self.valid[layer] = past
                hidden = self._run_layers([layer], hidden, past, bias, positions)
                if not np.isfinite(engine.to_numpy(hidden)).all():
                    where = f"decoder layer {layer}"
                    break
        raise NumericalError(f"non-finite logits for generated token {self.generated}: first produced by {where} "
                             f"({self.runtime.manifest.directory}); the export's weights or inputs are broken")

    def _decode(self, tokens: list[int]) -> str:
        return self.runtime.tokenizer.decode(tokens)
