"""Checking a request (prompts, knobs, schedule, length) and laying prompts out as one left-padded
batch. ``Generator`` and the in-flight engine check their requests with the same functions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CapacityError, InputError
from ..numerics import MASK_VALUE
from ..schedule import LayerSchedule
from .sampling import GenerationConfig

DEFAULT = object()  # "the model's own EOS" for eos_token_id


def request_config(config: GenerationConfig | None, max_new_tokens: int | None, knobs: dict,
                   vocab_size: int) -> GenerationConfig:
    """``config`` updated with ``max_new_tokens`` and the keyword knobs, every value checked."""
    unknown = set(knobs) - set(GenerationConfig.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
    if config is None and knobs.get("temperature") is None and \
            ((knobs.get("top_k") or 0) > 0 or (knobs.get("top_p") or 1.0) < 1.0):
        knobs = {**knobs, "temperature": 1.0}  # as every door: top-k/top-p alone sample (request_params)
    return (config or GenerationConfig()).updated(max_new_tokens=max_new_tokens, **knobs).validate(vocab_size)


def check_schedule(schedule: LayerSchedule, num_layers: int) -> LayerSchedule:
    if schedule.num_layers != num_layers:
        raise InputError(f"the schedule is for {schedule.num_layers} layers, the model has {num_layers}")
    return schedule


def check_positions(prompt_length: int, max_new_tokens: int, limit: int, holder: str) -> None:
    needed = prompt_length + max_new_tokens - 1  # the last generated token is never fed back
    if needed > limit:
        raise CapacityError(f"a prompt of {prompt_length} tokens plus {max_new_tokens} new tokens needs {needed} "
                            f"positions; {holder} allows {limit}")


def eos_ids(eos_token_id, model_eos: int | None) -> set[int]:
    """The token ids that end a row: the model's (``DEFAULT``), the ones given, or none (None)."""
    if eos_token_id is DEFAULT:
        eos_token_id = model_eos
    if eos_token_id is None:
        return set()
    return {int(t) for t in (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])}


def prompt_rows(input_ids, vocab_size: int) -> list[list[int]]:
    """``input_ids`` as a list of prompts of plain ints, or an InputError saying what is wrong."""
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


@dataclass
class PaddedBatch:
    """Prompts left-padded to one length, with room in the mask for ``new`` more positions."""

    ids: np.ndarray        # [B, Tp]
    lengths: np.ndarray    # real prompt length per row
    bias: np.ndarray       # [B, Tp + new]: 0 for real positions, MASK_VALUE for padding
    positions: np.ndarray  # [B, Tp]: Hugging Face's rule, cumsum of the mask minus one; padding -1

    @classmethod
    def left_pad(cls, rows: list[list[int]], pad_id: int, new: int) -> "PaddedBatch":
        B, Tp = len(rows), max(len(r) for r in rows)
        ids = np.full((B, Tp), pad_id, np.int64)
        bias = np.zeros((B, Tp + new), np.float32)
        for r, row in enumerate(rows):
            ids[r, Tp - len(row):] = row
            bias[r, :Tp - len(row)] = MASK_VALUE
        real = bias[:, :Tp] == 0
        positions = np.where(real, np.cumsum(real, axis=1) - 1, -1).astype(np.int64)
        return cls(ids, np.array([len(r) for r in rows], np.int64), bias, positions)
