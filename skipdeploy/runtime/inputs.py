"""Checking prompts and laying them out as one left-padded batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..numerics import MASK_VALUE


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
