"""In-flight batching on the torch backend: the reference for the onnxruntime in-flight engine.

The same split as ``exporter/slot_graphs``: ``layer_in`` and ``layer_out`` run the layer's
projections on all of its rows, ``attend`` runs plain causal attention for each row over its own
slot of a [rows, H, C, D] cache (a loop over rows: this backend is the reference, not the fast
path). The weights and the layer math are ``torch_base``'s, shared with the static engine.
"""

from __future__ import annotations

import numpy as np

from ..numerics import MASK_VALUE
from .base import InflightEngine, SlotCache
from .torch_base import TorchGraphs, torch


class TorchInflightEngine(TorchGraphs, InflightEngine):
    """In-flight batching in torch (CPU)."""

    def allocate_slots(self, rows: int, capacity: int) -> SlotCache:
        shape = (rows, self.spec.kv_heads, capacity, self.spec.head_dim)
        L = self.spec.num_layers
        return SlotCache([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(L)],
                         [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(L)], rows, capacity)

    @torch.no_grad()
    def layer_in(self, index: int, hidden, positions: np.ndarray):
        return self._layer_input(index, hidden, torch.as_tensor(positions, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def attend(self, index: int, query, key, value, context, cache: SlotCache, first: int, cached: np.ndarray,
               new: int) -> None:
        H, Hkv, D = self.spec.num_heads, self.spec.kv_heads, self.spec.head_dim
        self.check_slots(index, cache, first, cached, new)
        for b, past in enumerate(int(c) for c in cached):
            rows = slice(b * new, (b + 1) * new)
            keys, values = cache.keys[index][first + b], cache.values[index][first + b]   # [H, C, D]
            keys[:, past:past + new] = key[rows].reshape(new, Hkv, D).transpose(0, 1)
            values[:, past:past + new] = value[rows].reshape(new, Hkv, D).transpose(0, 1)
            q = query[rows].reshape(new, H, D).transpose(0, 1)                          # [H, S, D]
            K = keys[:, :past + new].repeat_interleave(H // Hkv, 0)                     # [H, past+S, D]
            scores = (q @ K.transpose(1, 2)).float()                                    # [H, S, past+S]
            key_pos = torch.arange(past + new, device=self.device)
            query_pos = torch.arange(past, past + new, device=self.device)
            scores = scores + torch.where(key_pos[None, :] <= query_pos[:, None], 0.0, MASK_VALUE)
            probs = torch.softmax(scores, dim=-1).to(self.dtype)
            V = values[:, :past + new].repeat_interleave(H // Hkv, 0)
            context[rows] = (probs @ V).transpose(0, 1).reshape(new, H * D)

    @torch.no_grad()
    def layer_out(self, index: int, hidden, context):
        return self._layer_output(index, hidden, context)

    def take_rows(self, hidden, rows: np.ndarray):
        return hidden[torch.as_tensor(rows, device=self.device)]

    def put_rows(self, hidden, rows: np.ndarray, values) -> None:
        hidden[torch.as_tensor(rows, device=self.device)] = values

    def empty_like(self, rows):
        return torch.empty_like(rows)
