"""Decoding knobs (after Hugging Face's GenerationConfig) and the token picker, in numpy.

Sampling is reproducible across runs and backends: one seeded generator draws one uniform
number per row and step, and the token is found by inverting the cumulative distribution over
tokens sorted by probability (ties by id). Backends whose logits differ by 1e-6 therefore pick
the same token unless a draw lands within 1e-6 of a boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..request_params import PYTHON, check


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0          # 0: greedy; > 0: sample
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    repetition_penalty: float = 1.0   # 1: off; HF semantics (divide positive logits, multiply negative)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def validate(self, vocab_size: int) -> "GenerationConfig":
        """Every knob checked as every door checks it (``request_params.check``: one range per
        field), normalized (a negative seed modulo 2**64, top_k -1 as 0), and stop token ids
        inside the vocabulary; an InputError names the keyword."""
        values = {name: check(name, getattr(self, attr), PYTHON.spelled(name))
                  for name, attr in _FIELDS.items() if getattr(self, attr) is not None}
        for t in values.get("stop_token_ids", ()):
            if not 0 <= t < vocab_size:
                raise InputError(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")
        return replace(self, **{_FIELDS[name]: value for name, value in values.items()})

    def finish_reason(self, token: int, generated: list[int], eos: set[int], decode) -> str | None:
        """Why a row ends at ``token`` (the last of ``generated``): "eos", "stop" (a stop token id,
        or a stop string in ``decode(generated)``), or None."""
        if token in eos:
            return "eos"
        if token in self.stop_token_ids:
            return "stop"
        if self.stop_strings and any(stop in decode(generated) for stop in self.stop_strings):
            return "stop"
        return None

    def updated(self, **changes) -> "GenerationConfig":
        changes = {k: v for k, v in changes.items() if v is not None}
        for key in ("stop_token_ids", "stop_strings"):
            if key in changes:
                value = changes[key]
                changes[key] = (value,) if isinstance(value, (str, int)) else tuple(value)
        return replace(self, **changes)


# request_params' field -> this class's attribute
_FIELDS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
           "repetition_penalty": "repetition_penalty", "seed": "seed", "stop_token_ids": "stop_token_ids",
           "stop": "stop_strings"}


class TokenPicker:
    """Turns a step's logits [B, V] into one token per row."""

    def __init__(self, config: GenerationConfig, prompts: Sequence[Sequence[int]]) -> None:
        self.config = config
        self.rng = np.random.Generator(np.random.PCG64(config.seed)) if config.do_sample else None
        self.seen = [set(p) for p in prompts] if config.repetition_penalty != 1.0 else None

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        """Repetition penalty over each row's prompt and output so far."""
        if self.seen is None:
            return logits
        logits = logits.copy()
        penalty = self.config.repetition_penalty
        for row, seen in enumerate(self.seen):
            idx = np.fromiter(seen, np.int64, len(seen))
            vals = logits[row, idx]
            logits[row, idx] = np.where(vals > 0, vals / penalty, vals * penalty)
        return logits

    def pick(self, logits: np.ndarray) -> np.ndarray:
        cfg = self.config
        logits = self.penalize(logits)
        if not cfg.do_sample:
            picked = logits.argmax(axis=-1)
        else:
            draws = self.rng.random(logits.shape[0])  # one draw per row, even for finished rows
            picked = np.array([self._sample(row, u) for row, u in zip(logits, draws)])
        if self.seen is not None:
            for row, token in enumerate(picked):
                self.seen[row].add(int(token))
        return picked

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate token ids (most likely first, ties by id) and their probabilities for one row,
        after temperature, top-k and top-p, in that order (as Hugging Face applies them)."""
        cfg = self.config
        scaled = logits.astype(np.float64) / cfg.temperature
        order = np.lexsort((np.arange(scaled.size), -scaled))
        if cfg.top_k:
            order = order[:cfg.top_k]
        kept = scaled[order]
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), cfg.top_p) + 1)  # smallest prefix reaching top_p
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return order, probs

    def _sample(self, logits: np.ndarray, u: float) -> int:
        order, probs = self.distribution(logits)
        index = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        return int(order[min(index, order.size - 1)])
