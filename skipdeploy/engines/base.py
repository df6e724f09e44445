"""The one interface every backend implements: run a graph on bound buffers.

The runtime owns the decoding loop and the bookkeeping (valid lengths, masks, positions); an
engine owns device memory and kernels. Hidden states are opaque engine objects that the runtime
only passes from one call to the next; token ids, positions, masks and logits are numpy.

An engine may defer work: the torch CUDA engine returns a pending step from ``embed`` for one new
position, the ``layer`` calls only record the step's layer set, and ``head`` runs the whole step
as one captured CUDA graph. So a layer's keys and values are guaranteed in the cache once
``head`` has returned, not before. A hidden-state object is a torch tensor or something
``numpy.asarray`` reads (running deferred work if needed): the runtime's diagnosis of non-finite
logits and ``verify`` read them that way. The logits array ``head`` returns may be a buffer the
engine reuses at its next call: copy it to keep it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest


class KVCache:
    """Per-layer key and value buffers of shape [capacity_l, batch, heads, head_dim].

    ``valid[l]`` is how many positions of layer l hold keys and values; it is kept by the
    runtime and checked against the schedule, never inferred from a buffer's extent.
    """

    def __init__(self, keys: list[Any], values: list[Any], capacities: list[int], batch: int) -> None:
        self.keys, self.values = keys, values
        self.capacities = list(capacities)
        self.batch = batch
        self.valid = [0] * len(capacities)


class Engine(ABC):
    """A backend: allocates the KV cache and runs the embed, layer and head graphs."""

    name = "engine"

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.spec = manifest.model

    @abstractmethod
    def allocate(self, capacities: list[int], batch: int) -> KVCache:
        """A cache with room for ``capacities[l]`` positions in layer l, reusing earlier buffers."""

    @abstractmethod
    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray) -> Any:
        """Hidden states [B,T,E] for int64 ids and positions [B,T]."""

    @abstractmethod
    def layer(self, index: int, hidden: Any, cache: KVCache, past: int, attention_bias: np.ndarray) -> Any:
        """Run layer ``index`` on T new positions; write their keys and values into
        ``cache[index][past:past+T]`` in place; return the new hidden states."""

    @staticmethod
    def check_layer_call(index: int, cache: KVCache, past: int, new: int, batch: int,
                         attention_bias: np.ndarray) -> None:
        """Refuse a call that would write outside layer ``index``'s cache or mask the wrong keys:
        with raw pointers, an overflow would corrupt memory silently."""
        if past + new > cache.capacities[index]:
            raise BackendError(f"layer {index}: writing positions {past}..{past + new - 1} would overflow "
                               f"its cache of {cache.capacities[index]} positions")
        if attention_bias.shape != (batch, past + new) or not attention_bias.flags.c_contiguous:
            raise BackendError(f"layer {index}: attention bias must be a contiguous [{batch}, {past + new}] array")

    @abstractmethod
    def head(self, hidden: Any) -> np.ndarray:
        """float32 logits [B,V] of the last position."""

    def available_memory(self) -> int | None:
        """Bytes the cache may use on this engine's device, or None when unknown."""
        return _host_available_memory()

    def close(self) -> None:
        """Release sessions and buffers."""


def _host_available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
