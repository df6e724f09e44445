"""Check each exported graph, run by onnxruntime, against the Hugging Face modules it came from.

The reference is transformers' own code (the decoder layer's forward over the whole sequence
with eager attention, the embedding and head modules, called through the model's family), so the
check is independent of how the graphs were built. Inputs are random, with a non-empty past, a
padded position and positions that start at a random offset (RoPE scaling changes past a model's
original length).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..families import for_model_type
from ..manifest import ModelSpec
from ..numerics import MASK_VALUE, NUMPY_DTYPES, relative_error

BATCH, PAST, NEW = 2, 3, 2  # all different and >= 2, so no dimension can hide another


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _error(got: np.ndarray, want: torch.Tensor) -> float:
    """Max abs error, relative to the reference's scale when that exceeds 1."""
    return relative_error(got, want.detach().float().numpy())


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    """Run the graph on the feeds it declares (a RoPE family's embedding takes no positions)."""
    session = _session(path)
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


@torch.no_grad()
def check_layer(path: Path, model, index: int, spec: ModelSpec, dtype: str, seed: int) -> float:
    family = for_model_type(spec.model_type)
    gen = torch.Generator().manual_seed(seed)
    total = PAST + NEW
    x = torch.randn(BATCH, total, spec.hidden_size, generator=gen)
    keep = torch.ones(BATCH, total)
    keep[1, 0] = 0  # row 1 is left-padded by one position
    causal = torch.tril(torch.ones(total, total))
    allowed = causal[None, None] * keep[:, None, None, :]
    mask = (1 - allowed) * torch.finfo(torch.float32).min
    offset = int(torch.randint(0, max(1, spec.max_positions - total), (1,), generator=gen))
    positions = (offset + torch.cumsum(keep, 1) - 1).clamp(min=0).long()
    want = family.hf_layer(model, index, x, mask, positions)
    keys, values = (t.transpose(0, 1) for t in family.hf_keys_values(model, index, x, positions))  # [S,B,Hkv,D]
    np_dt = NUMPY_DTYPES[dtype]
    hidden, key, value = _run(path, {
        "hidden": x[:, PAST:].numpy().astype(np_dt), "position_ids": positions[:, PAST:].numpy(),
        "past_key": keys[:PAST].numpy().astype(np_dt), "past_value": values[:PAST].numpy().astype(np_dt),
        "attention_bias": np.where(keep.numpy() > 0, 0.0, MASK_VALUE).astype(np.float32)})
    return max(_error(hidden, want[:, PAST:]), _error(key, keys[PAST:]), _error(value, values[PAST:]))


@torch.no_grad()
def check_embed(path: Path, model, spec: ModelSpec, seed: int) -> float:
    family = for_model_type(spec.model_type)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (BATCH, NEW + 1), generator=gen)
    pos = torch.randint(-1, spec.max_positions, (BATCH, NEW + 1), generator=gen)
    want = family.hf_embed(model, ids, pos)
    (got,) = _run(path, {"input_ids": ids.numpy(), "position_ids": pos.numpy()})
    return _error(got, want)


@torch.no_grad()
def check_head(path: Path, model, spec: ModelSpec, dtype: str, seed: int) -> float:
    family = for_model_type(spec.model_type)
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(BATCH, spec.hidden_size, generator=gen)
    want = family.hf_head(model, h)
    (got,) = _run(path, {"hidden": h.numpy().astype(NUMPY_DTYPES[dtype])})
    return _error(got, want)
