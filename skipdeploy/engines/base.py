"""The interface every backend implements, in three parts: what both decoding paths share
(:class:`Engine`: embed, head, looking inside hidden states, memory), what static decoding adds
(:class:`StaticEngine`: per-generator caches and whole-layer calls) and what in-flight decoding adds
(:class:`InflightEngine`: a slot cache, one row per request, and each layer split around its
attention). A backend class implements the shared part and exactly one of the two others, so no
method of a parent is ever disabled; ``create_engine(inflight=...)`` picks which.

The runtime owns the decoding loop and the bookkeeping (valid lengths, masks, positions); an
engine owns sessions, kernels and device memory. A :class:`KVCache` belongs to whoever allocated
it (a :class:`~skipdeploy.runtime.Generator`), not to the engine: one loaded engine serves any
number of live caches, and a call is told which one to read and write. Released caches go back
to the engine, which may hand their buffers to a later ``allocate``.

Hidden states are opaque engine objects that the runtime only passes from one call to the next;
they expose ``.shape`` ([B, T, E]) and nothing else. ``to_numpy``/``from_numpy`` convert them
for the few callers that must look inside (the diagnosis of non-finite logits, ``verify``).
Token ids, positions, masks and logits are numpy.

An engine may defer work: the torch CUDA engine returns a pending step from ``embed`` for one new
position, the ``layer`` calls only record the step's layer set, and ``head`` runs the whole step
as one captured CUDA graph. So a layer's keys and values are guaranteed in the cache once
``head`` has returned, not before. The logits array ``head`` returns may be a buffer the engine
reuses at its next call: copy it to keep it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest
from ..numerics import MASK_VALUE, itemsize

# Bias of the masked positions some engines keep in front of every layer's cache
# (see masked_position_bias).
MASKED_POSITION_VALUE = 2 * MASK_VALUE


class KVCache:
    """Per-layer key and value buffers of shape [capacity_l, batch, kv_heads, head_dim].

    ``storage`` is the engine's own record of the memory behind them, used when the cache is
    released. How many positions of a layer are valid is kept by the cache's owner, checked
    against the schedule, and never inferred from a buffer's extent.
    """

    def __init__(self, keys: list[Any], values: list[Any], capacities: list[int], batch: int,
                 storage: Any = None) -> None:
        self.keys, self.values = keys, values
        self.capacities = list(capacities)
        self.batch = batch
        self.storage = storage


class SlotCache:
    """The in-flight engine's cache: per layer, key and value buffers [rows, kv_heads, capacity,
    head_dim] (BNSH), one slot (row) of ``capacity`` positions per running request. A slot's row
    is contiguous, so any run of consecutive slots is one dense block that binds in place."""

    def __init__(self, keys: list[Any], values: list[Any], rows: int, capacity: int) -> None:
        self.keys, self.values = keys, values
        self.rows, self.capacity = rows, capacity


class Engine(ABC):
    """What both decoding paths need of a backend: the embedding and the LM head, a way to look
    inside hidden states, and the memory a cache may take."""

    name = "engine"
    inflight = False  # True for an InflightEngine

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.spec = manifest.model

    @abstractmethod
    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray) -> Any:
        """Hidden states [B,T,E] for int64 ids and positions [B,T]."""

    @abstractmethod
    def head(self, hidden: Any) -> np.ndarray:
        """float32 logits [B,V] of the last position."""

    # -- looking inside hidden states ------------------------------------------------------------
    def to_numpy(self, hidden: Any) -> np.ndarray:
        """Hidden states as a float32 host array (running deferred work if needed)."""
        return np.asarray(hidden, np.float32)

    def from_numpy(self, array: np.ndarray) -> Any:
        """Host hidden states [B,T,E] in the form this engine's graphs take."""
        return np.ascontiguousarray(array, self.dtype)

    # -- resources -------------------------------------------------------------------------------
    @property
    def cache_itemsize(self) -> int:
        """Bytes of one cached key or value element as this engine runs, which is not always the
        export's dtype (the torch backend runs a float32 export in float16 on CUDA)."""
        return itemsize(self.manifest.dtype)

    def available_memory(self) -> int | None:
        """Bytes a new cache may use on this engine's device, or None when unknown."""
        return host_available_memory()

    def close(self) -> None:
        """Release sessions and buffers."""


class StaticEngine(Engine):
    """Static decoding (``skipdeploy.load``): a batch of rows through whole layers, each call told
    which :class:`KVCache` to read and write."""

    @abstractmethod
    def allocate(self, capacities: list[int], batch: int) -> KVCache:
        """A new cache with room for ``capacities[l]`` positions in layer l, for ``batch`` rows.
        It shares no memory with any other live cache."""

    def release(self, cache: KVCache) -> None:
        """The cache's owner is done with it: its buffers may serve a later ``allocate``."""

    def layer(self, index: int, hidden: Any, cache: KVCache, past: int, attention_bias: np.ndarray,
              positions: np.ndarray | None = None) -> Any:
        """Run layer ``index`` on T new positions; write their keys and values into
        ``cache[index][past:past+T]`` in place; return the new hidden states. ``positions`` (int64
        [B, T], the embedding's position ids) are needed by families whose layers rotate by
        position (RoPE); others ignore them."""
        return self.layers([index], hidden, cache, past, attention_bias, positions)

    def layers(self, indices: list[int], hidden: Any, cache: KVCache, past: int, attention_bias: np.ndarray,
               positions: np.ndarray | None = None) -> Any:
        """``layer`` for each of ``indices`` (ascending), one after another, in one call: a backend
        may run them together (onnxruntime runs a block of layers in one session).

        Checked here for every backend: with raw pointers, a call that writes outside a layer's
        cache or masks the wrong keys would corrupt memory silently."""
        indices = [int(i) for i in indices]
        batch, new = hidden.shape[0], hidden.shape[1]
        if self.manifest.layers_take_positions:
            if positions is None or positions.shape != (batch, new):
                raise BackendError(f"layers {indices}: this model's layers take position ids [{batch}, {new}]")
            positions = np.ascontiguousarray(positions, np.int64)
        if any(b <= a for a, b in zip(indices, indices[1:])) or not indices \
                or not 0 <= indices[0] <= indices[-1] < self.spec.num_layers:
            raise BackendError(f"layers {indices}: expected ascending layer indices of this "
                               f"{self.spec.num_layers}-layer model")
        for index in indices:
            if past + new > cache.capacities[index]:
                raise BackendError(f"layer {index}: writing positions {past}..{past + new - 1} would overflow "
                                   f"its cache of {cache.capacities[index]} positions")
        if batch != cache.batch:
            raise BackendError(f"layers {indices}: {batch} rows of hidden states for a cache of "
                               f"{cache.batch} rows")
        if attention_bias.shape != (batch, past + new) or not attention_bias.flags.c_contiguous:
            raise BackendError(f"attention bias must be a contiguous [{batch}, {past + new}] array")
        return self._layers(indices, hidden, cache, past, attention_bias, positions)

    def _layers(self, indices: list[int], hidden: Any, cache: KVCache, past: int, attention_bias: np.ndarray,
                positions: np.ndarray | None) -> Any:
        """The backend's call for several layers (the arguments are checked): by default ``_layer``
        for each."""
        for index in indices:
            hidden = self._layer(index, hidden, cache, past, attention_bias, positions)
        return hidden

    @abstractmethod
    def _layer(self, index: int, hidden: Any, cache: KVCache, past: int, attention_bias: np.ndarray,
               positions: np.ndarray | None) -> Any:
        """The backend's layer call; the arguments are checked."""


class InflightEngine(Engine):
    """In-flight batching (``skipdeploy.serving``): every running request keeps one slot of a
    :class:`SlotCache`, and a layer runs in three parts on rows of hidden states [N, E]:
    ``layer_in`` (the projections before attention, on all of the layer's rows at once),
    ``attend`` (each run of consecutive slots over its own cached positions) and ``layer_out``
    (the projections after attention)."""

    inflight = True

    @abstractmethod
    def allocate_slots(self, rows: int, capacity: int) -> SlotCache:
        """A slot cache of ``rows`` slots of ``capacity`` positions per layer."""

    @abstractmethod
    def layer_in(self, index: int, hidden: Any, positions: np.ndarray) -> tuple[Any, Any, Any]:
        """Query [N, H*D], key and value [N, Hkv*D] of layer ``index`` for hidden rows [N, E] at
        ``positions`` [N] (int64)."""

    @abstractmethod
    def attend(self, index: int, query: Any, key: Any, value: Any, context: Any, cache: SlotCache, first: int,
               cached: np.ndarray, new: int) -> None:
        """Attention of layer ``index`` for ``B = len(cached)`` consecutive slots from ``first``, each
        with ``new`` positions (rows ``query[b*new:(b+1)*new]``) after its ``cached[b]`` positions:
        writes their keys and values into the slots and the attention output into ``context``."""

    @abstractmethod
    def layer_out(self, index: int, hidden: Any, context: Any) -> Any:
        """Hidden rows [N, E] after layer ``index``, from its input rows and attention output [N, H*D]."""

    def check_slots(self, index: int, cache: SlotCache, first: int, cached: np.ndarray, new: int) -> None:
        """``attend``'s run of slots must lie inside the cache: its writes go through raw pointers."""
        if first < 0 or first + len(cached) > cache.rows or int(np.max(cached)) + new > cache.capacity:
            raise BackendError(f"layer {index}: slots {first}..{first + len(cached) - 1} with "
                               f"{int(np.max(cached)) + new} positions do not fit the slot cache "
                               f"({cache.rows} slots of {cache.capacity} positions)")

    def take_rows(self, hidden: Any, rows: np.ndarray) -> Any:
        """A new [len(rows), E] block of hidden rows (a layer's rows are gathered)."""
        return hidden[rows]

    def put_rows(self, hidden: Any, rows: np.ndarray, values: Any) -> None:
        hidden[rows] = values

    def empty_like(self, rows: Any) -> Any:
        """An uninitialized block shaped like ``rows`` (where ``attend`` writes its output)."""
        return np.empty_like(rows)


def host_available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def masked_position_bias(bias: np.ndarray, masked: int) -> np.ndarray:
    """The attention bias for a cache with ``masked`` masked positions in front of position 0.

    GPU backends keep such a position so that no graph ever sees an empty past. They get twice
    the mask value: a padding query whose real keys are all masked still gives them zero weight,
    so every output (padding rows included) equals the unpadded one.
    """
    bias = np.ascontiguousarray(bias, np.float32)
    if not masked:
        return bias
    return np.ascontiguousarray(np.concatenate([np.full((bias.shape[0], masked), MASKED_POSITION_VALUE,
                                                        np.float32), bias], axis=1))


class FlatPool:
    """Released per-layer flat buffers, kept for reuse (at most ``keep`` caches' worth).

    Used by the engines whose caches are one flat key and one flat value buffer per layer viewed
    as [capacity, batch, H, D]: any later request whose layer fits reuses the memory, so that a
    server does not pay page faults for a new cache at every request.

    A cache's ``layout`` (for the GPU engines: its batch, which places the masked position in
    front of position 0) says which bytes are read without being written first. A buffer reused
    under another layout gets ``reset`` before it is handed out: bytes the last cache wrote (NaN,
    if that request overflowed) would otherwise sit where this one reads them with zero weight,
    and 0 x NaN is NaN."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._free: list[tuple[list, list, Any]] = []

    def lease(self, needs: list[int], size, new, layout: Any = None, reset=None) -> tuple[list, list, Any]:
        """Flat key and value buffers per layer, each holding at least ``needs[l]`` (in the unit of
        ``size(buffer)``): a released cache's where they fit, ``new(need)`` where not. Returns
        ``(keys, values, layout)``: the cache's ``storage``."""
        # The newest released cache of this layout (nothing to reset), else the newest of any.
        same = [i for i, entry in enumerate(self._free) if entry[2] == layout]
        if self._free:
            keys, values, old = self._free.pop(same[-1] if same else -1)
        else:
            keys, values, old = [None] * len(needs), [None] * len(needs), layout
        for layer, need in enumerate(needs):
            for flat in (keys, values):
                if flat[layer] is None or size(flat[layer]) < need:
                    flat[layer] = new(need)
                elif old != layout and reset is not None:
                    reset(flat[layer])
        return keys, values, layout

    def give(self, cache: KVCache) -> None:
        """Keep a released cache's buffers (its ``storage``) for a later ``lease``."""
        if cache.storage is not None and len(self._free) < self.keep:
            self._free.append(cache.storage)
        cache.storage = None

    def held_bytes(self, size) -> int:
        """Bytes of the buffers held for reuse, ``size(buffer)`` each: memory a new cache may take."""
        return sum(size(b) for keys, values, _ in self._free for b in keys + values if b is not None)

    def clear(self) -> None:
        self._free.clear()
