"""The SkipDecode forward pass for training: one full-sequence forward with per-position layer sets.

Teacher forcing over a sequence whose first ``c`` positions are the prompt: position ``c + j``
holds generated token ``j`` and runs ``schedule.layers(j)``; the prompt positions run
``schedule.prompt_layers()``. Because the top block only shrinks, the positions that run a layer
``l`` always form a prefix ``[0, n_l)`` of the sequence, so layer ``l`` runs on ``hidden[:, :n_l]``
with plain causal attention (each of those positions sees exactly the earlier positions that
ran ``l``: the keys and values the runtime has cached for it) and later positions pass through
unchanged. The logits at position ``c - 1`` are the prefill's (they predict generated token 0),
and those at ``c + j`` are decode step ``j``'s: exactly the runtime's per-step logits.

The modules are the Hugging Face decoder layers themselves (called through the model's family),
so what is trained is the Hugging Face model, and ``save_pretrained`` writes it.
"""

from __future__ import annotations

import torch

from ..errors import ScheduleError
from ..families import for_config
from ..schedule import LayerSchedule


def layer_extents(schedule: LayerSchedule, context_length: int, seq_len: int) -> list[int]:
    """``n_l`` per layer: layer ``l`` runs on positions ``[0, n_l)`` of a ``seq_len`` sequence.

    ``n_l = c + #{j < seq_len - c : l in layers(j)}`` when ``l`` is a prompt layer, else 0.
    Raises if the positions running a layer are not a prefix (a growing schedule).
    """
    L, c = schedule.num_layers, context_length
    if not 1 <= c <= seq_len:
        raise ScheduleError(f"context length must be in [1, {seq_len}] (got {c})")
    prompt = set(schedule.prompt_layers())
    steps = [set(schedule.layers(j)) for j in range(seq_len - c)]
    extents = []
    for layer in range(L):
        runs = [c > 0 and layer in prompt] + [layer in s for s in steps]
        n = runs.index(False) if False in runs else len(runs)
        if any(runs[n:]):
            raise ScheduleError(f"layer {layer} stops and restarts under {schedule!r}: the positions running it "
                                "are not a prefix, so its cached keys and values would be missing")
        extents.append(0 if n == 0 else c + n - 1)
    return extents


def _causal(n: int, dtype, device) -> torch.Tensor:
    mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


def schedule_forward(model, input_ids: torch.Tensor, context_length: int, schedule: LayerSchedule, *,
                     first: int = 0) -> torch.Tensor:
    """Logits ``[B, S - first, V]`` (positions ``first`` and later) of a transformers causal LM of
    a supported family with the schedule applied per position.

    ``input_ids`` ``[B, S]`` are unpadded; positions ``< context_length`` are the prompt. A loss
    over the generated positions only passes ``first = context_length - 1``: the head (a vocabulary
    of 49k for SmolLM2) then runs on those positions alone.
    """
    family = for_config(model.config, type(model).__name__)
    layers = family.hf_layers(model)
    B, S = input_ids.shape
    if schedule.num_layers != len(layers):
        raise ScheduleError(f"the schedule is for {schedule.num_layers} layers, the model has {len(layers)}")
    extents = layer_extents(schedule, context_length, S)
    positions = torch.arange(S, device=input_ids.device).expand(B, S)
    hidden = family.hf_embed(model, input_ids, positions)
    # sdpa with no mask is causal (is_causal); other attention implementations get an explicit mask.
    sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
    for index, n in enumerate(extents):
        if n == 0:
            continue
        mask = None if sdpa else _causal(n, hidden.dtype, hidden.device)
        ran = family.hf_layer(model, index, hidden[:, :n], mask, positions[:, :n])
        hidden = ran if n == S else torch.cat([ran, hidden[:, n:]], dim=1)
    if not 0 <= first < S:
        raise ScheduleError(f"first must be in [0, {S}) (got {first})")
    return family.hf_head(model, hidden[:, first:])
