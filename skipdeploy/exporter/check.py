"""Check each exported graph, run by onnxruntime, against the Hugging Face modules it came from.

The reference is transformers' own code (``OPTDecoderLayer.forward`` over the whole sequence with
eager attention, the embedding and head modules), so the check is independent of how the graphs
were built. Inputs are random, with a non-empty past and a padded position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

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


@torch.no_grad()
def check_layer(path: Path, layer, spec: ModelSpec, dtype: str, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    total = PAST + NEW
    x = torch.randn(BATCH, total, spec.hidden_size, generator=gen)
    keep = torch.ones(BATCH, total)
    keep[1, 0] = 0  # row 1 is left-padded by one position
    causal = torch.tril(torch.ones(total, total))
    allowed = causal[None, None] * keep[:, None, None, :]
    mask = (1 - allowed) * torch.finfo(torch.float32).min
    want = layer(x, attention_mask=mask)
    want = want[0] if isinstance(want, tuple) else want

    attn = layer.self_attn
    h = layer.self_attn_layer_norm(x) if spec.layer_norm == "pre" else x

    def heads(t: torch.Tensor) -> torch.Tensor:  # [B,S,E] -> [S,B,H,D]
        return t.view(BATCH, total, spec.num_heads, spec.head_dim).permute(1, 0, 2, 3)

    keys, values = heads(attn.k_proj(h)), heads(attn.v_proj(h))
    np_dt = NUMPY_DTYPES[dtype]
    feeds = {"hidden": x[:, PAST:].numpy().astype(np_dt),
             "past_key": keys[:PAST].numpy().astype(np_dt), "past_value": values[:PAST].numpy().astype(np_dt),
             "attention_bias": np.where(keep.numpy() > 0, 0.0, MASK_VALUE).astype(np.float32)}
    hidden, key, value = _session(path).run(None, feeds)
    return max(_error(hidden, want[:, PAST:]), _error(key, keys[PAST:]), _error(value, values[PAST:]))


@torch.no_grad()
def check_embed(path: Path, model, spec: ModelSpec, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    decoder = model.model.decoder
    ids = torch.randint(0, spec.vocab_size, (BATCH, NEW + 1), generator=gen)
    pos = torch.randint(-1, spec.max_positions, (BATCH, NEW + 1), generator=gen)
    want = decoder.embed_tokens(ids)
    if decoder.project_in is not None:
        want = decoder.project_in(want)
    want = want + decoder.embed_positions(None, 0, position_ids=pos)
    (got,) = _session(path).run(None, {"input_ids": ids.numpy(), "position_ids": pos.numpy()})
    return _error(got, want)


@torch.no_grad()
def check_head(path: Path, model, spec: ModelSpec, dtype: str, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    decoder = model.model.decoder
    h = torch.randn(BATCH, spec.hidden_size, generator=gen)
    want = h
    if decoder.final_layer_norm is not None:
        want = decoder.final_layer_norm(want)
    if decoder.project_out is not None:
        want = decoder.project_out(want)
    want = model.lm_head(want)
    (got,) = _session(path).run(None, {"hidden": h.numpy().astype(NUMPY_DTYPES[dtype])})
    return _error(got, want)
