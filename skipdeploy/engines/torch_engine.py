"""The PyTorch backend: the same math as the graphs, on the weights the export holds, on CPU or CUDA.

It reads the initializers of the exported ONNX files (so it needs no checkpoint) and runs them
with plain torch ops (``torch_base``, shared with the in-flight ``torch_inflight``), writing keys
and values into a preallocated sequence-major cache in place.

Two decode paths share the layer math:

- the dynamic path (the CPU default, and every prefill): attention over the valid prefix
  ``cache[:past+T]``; it is the reference that the other backends are compared with;
- the static-cache path (the CUDA default, ``static_cache=True`` anywhere): for a decode step
  (T = 1) attention runs over the layer's WHOLE buffer, masked beyond the write position, and the
  new key/value is written with ``index_copy_`` at a position held in a device tensor. Every
  shape and address of a step is then fixed, so on CUDA the whole step (embed, the step's
  layers, head) is captured once per (layer set, batch) as a CUDA graph and replayed: a
  schedule has at most L distinct layer sets. ``embed`` returns a pending step for T = 1, the
  ``layer`` calls record the layer set, and ``head`` replays the graph (DESIGN.md section 6).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest
from ..numerics import MASK_VALUE, round_up
from .base import KVCache, StaticEngine
from .torch_base import TorchGraphs, torch

# Static-cache buffers grow in steps of this many positions, so that nearby request sizes share
# buffers (and captured graphs).
BUCKET = 64
# Released static caches (buffers and their captured graphs) kept for reuse.
MAX_FREE = 4


@dataclass(eq=False)  # identity: list.remove must not compare tensors
class _Pool:
    """The storage of a static cache: whole-capacity buffers, the step's fixed inputs and the
    CUDA graphs captured on them. It belongs to one live cache at a time; released, it waits
    for a later cache of the same batch size (graphs included)."""

    batch: int
    keys: list[Any]
    values: list[Any]
    bias: Any = None              # [B, C_max] float32: attention bias of the current step
    ints: Any = None              # int64 [2B + 1]: token ids, positions, write position
    logits: Any = None            # [B, V] float32, the step's output
    host_ints: Any = None         # pinned staging (CUDA) for ints, bias and logits
    host_bias: Any = None
    host_logits: Any = None
    arange: Any = None            # int64 [C_max]
    graphs: dict = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return 0 if self.bias is None else self.bias.shape[1]


class _PendingStep:
    """A decode step whose work is deferred until ``head`` (so it can run as one CUDA graph).

    Hidden states are opaque to the runtime; when something does read this one as an array
    (e.g. the runtime's non-finite diagnosis), the step is run eagerly up to here.
    """

    def __init__(self, engine: "TorchEngine", ids: np.ndarray, positions: np.ndarray,
                 layers: tuple[int, ...] = (), cache: KVCache | None = None, past: int = -1,
                 bias: np.ndarray | None = None) -> None:
        self.engine, self.ids, self.positions = engine, ids, positions
        self.layers, self.cache, self.past, self.bias = layers, cache, past, bias
        self.shape = (ids.shape[0], 1, engine.spec.hidden_size)

    def then(self, index: int, cache: KVCache, past: int, bias: np.ndarray) -> "_PendingStep":
        if self.layers and (cache is not self.cache or past != self.past or bias.shape != self.bias.shape):
            raise BackendError("internal error: the layers of one decode step disagree on cache, past or bias")
        return _PendingStep(self.engine, self.ids, self.positions, self.layers + (index,), cache, past, bias)

    def materialize(self) -> "torch.Tensor":
        return self.engine._run_pending(self, eager_hidden=True)

    def __array__(self, dtype=None, copy=None):
        array = self.materialize().float().cpu().numpy()
        return array if dtype is None else array.astype(dtype)


class TorchEngine(TorchGraphs, StaticEngine):
    """Static decoding in torch: the dynamic path, or the static-cache path (``static_cache``,
    with ``cuda_graphs`` on CUDA)."""

    def __init__(self, manifest: Manifest, device: str = "cpu", dtype: str | None = None,
                 cuda_graphs: bool | None = None, static_cache: bool | None = None) -> None:
        super().__init__(manifest, device=device, dtype=dtype)
        cuda = self.device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = cuda
        if cuda_graphs and not cuda:
            raise BackendError("CUDA graphs need device='cuda'")
        self.cuda_graphs = bool(cuda_graphs)
        self.static_cache = bool(cuda_graphs if static_cache is None else static_cache)
        if self.cuda_graphs and not self.static_cache:
            raise BackendError("CUDA graphs need the static-cache decode path (static_cache=True)")
        self._free: list[_Pool] = []
        with self._on_device():
            self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    # -- cache -------------------------------------------------------------------------------
    def allocate(self, capacities: list[int], batch: int) -> KVCache:
        H, D = self.spec.kv_heads, self.spec.head_dim
        if not self.static_cache:
            shape = [(cap, batch, H, D) for cap in capacities]
            keys = [torch.empty(s, dtype=self.dtype, device=self.device) for s in shape]
            values = [torch.empty(s, dtype=self.dtype, device=self.device) for s in shape]
            return KVCache(keys, values, capacities, batch)
        pool = self._pool(capacities, batch)
        return KVCache([k[:cap] for k, cap in zip(pool.keys, capacities)],
                       [v[:cap] for v, cap in zip(pool.values, capacities)], capacities, batch, storage=pool)

    def release(self, cache: KVCache) -> None:
        if isinstance(cache.storage, _Pool):
            self._free.append(cache.storage)
            del self._free[:-MAX_FREE]
        cache.storage = None

    def _pool(self, capacities: list[int], batch: int) -> _Pool:
        """Static buffers for ``batch`` rows that hold at least ``capacities``: a released pool of
        that batch size (its graphs too) when there is one, grown (by BUCKET positions) where too
        small, which drops the graphs captured on the old addresses. Zeroed at allocation and on
        reuse: a step reads the whole buffer, masked positions get zero weight, and 0 x NaN is NaN,
        so a stale NaN from an earlier request would otherwise reach every later one."""
        H, D, L = self.spec.kv_heads, self.spec.head_dim, self.spec.num_layers
        pool = next((p for p in reversed(self._free) if p.batch == batch), None)
        if pool is None:
            pool = _Pool(batch, [None] * L, [None] * L)
        else:
            self._free.remove(pool)
            for t in pool.keys + pool.values:
                if t is not None:
                    t.zero_()
        grown = False
        for layer, cap in enumerate(capacities):
            if pool.keys[layer] is None or pool.keys[layer].shape[0] < cap:
                size = max(BUCKET, round_up(cap, BUCKET))
                pool.keys[layer] = torch.zeros((size, batch, H, D), dtype=self.dtype, device=self.device)
                pool.values[layer] = torch.zeros((size, batch, H, D), dtype=self.dtype, device=self.device)
                grown = True
        width = max(k.shape[0] for k in pool.keys)
        if pool.bias is None or pool.capacity < width:
            pool.bias = torch.zeros((batch, width), dtype=torch.float32, device=self.device)
            pool.arange = torch.arange(width, device=self.device)
            if self.device.type == "cuda":
                pool.host_bias = _host_zeros((batch, width), torch.float32)
            grown = True
        if pool.ints is None:
            pool.ints = torch.zeros(2 * batch + 1, dtype=torch.long, device=self.device)
            pool.logits = torch.zeros((batch, self.spec.vocab_size), dtype=torch.float32, device=self.device)
            if self.device.type == "cuda":
                pool.host_ints = _host_zeros((2 * batch + 1,), torch.long)
                pool.host_logits = _host_zeros((batch, self.spec.vocab_size), torch.float32)
        if grown:
            pool.graphs.clear()
        return pool

    def _held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pool in self._free for t in pool.keys + pool.values
                   if t is not None)

    # -- graphs ------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray):
        if self.static_cache and input_ids.shape[1] == 1:
            return _PendingStep(self, np.asarray(input_ids, np.int64), np.asarray(position_ids, np.int64))
        return super().embed(input_ids, position_ids)

    @torch.no_grad()
    def _layer(self, index: int, hidden, cache: KVCache, past: int, attention_bias: np.ndarray, positions=None):
        if isinstance(hidden, _PendingStep):
            return hidden.then(index, cache, past, attention_bias)
        return self._dynamic_layer(index, hidden, cache, past, attention_bias, positions)

    def _dynamic_layer(self, index: int, hidden, cache: KVCache, past: int, attention_bias: np.ndarray,
                       positions):
        """Attention over the valid prefix ``[:past+T]`` (the reference path)."""
        B, T, E = hidden.shape
        H, Hkv = self.spec.num_heads, self.spec.kv_heads
        pos = None if positions is None else torch.as_tensor(positions, dtype=torch.long, device=self.device)
        q, k, v = self._layer_input(index, hidden, pos)
        keys, values = cache.keys[index], cache.values[index]
        keys[past:past + T] = self._heads(k, Hkv).transpose(0, 1)
        values[past:past + T] = self._heads(v, Hkv).transpose(0, 1)
        G = H // Hkv                                                    # query heads per key/value head
        K = keys[:past + T].permute(1, 2, 3, 0).repeat_interleave(G, 1)  # [B,H,D,S]
        V = values[:past + T].permute(1, 2, 0, 3).repeat_interleave(G, 1)  # [B,H,S,D]
        q = self._heads(q, H).transpose(1, 2)                           # [B,H,T,D]
        scores = (q @ K).float()
        key_pos = torch.arange(past + T, device=self.device)
        query_pos = torch.arange(past, past + T, device=self.device)
        causal = torch.where(key_pos[None, :] <= query_pos[:, None], 0.0, MASK_VALUE)
        bias = torch.as_tensor(attention_bias, dtype=torch.float32, device=self.device)
        probs = torch.softmax(scores + causal + bias[:, None, None, :], dim=-1).to(self.dtype)
        context = (probs @ V).transpose(1, 2).reshape(B, T, -1)
        return self._layer_output(index, hidden, context)

    def _static_layer(self, index: int, hidden, pool: _Pool):
        """One decode position: write its key/value at the device-held position, then attend over
        the layer's whole buffer, masking keys beyond that position. No host sync, fixed shapes."""
        B, T, E = hidden.shape
        H, Hkv = self.spec.num_heads, self.spec.kv_heads
        G = H // Hkv
        q, k, v = self._layer_input(index, hidden, pool.ints[B:2 * B].view(B, 1))
        keys, values = pool.keys[index], pool.values[index]            # [C,B,Hkv,D]
        C = keys.shape[0]
        where = pool.ints[2 * B:2 * B + 1]                               # [1] write position
        keys.index_copy_(0, where, self._heads(k, Hkv).transpose(0, 1))
        values.index_copy_(0, where, self._heads(v, Hkv).transpose(0, 1))
        q = self._heads(q, H).transpose(1, 2)                           # [B,H,1,D]
        scores = (q @ keys.permute(1, 2, 3, 0).repeat_interleave(G, 1)).float()  # [B,H,1,C]
        visible = pool.arange[:C] <= where                               # [C]
        scores = torch.where(visible, scores + pool.bias[:, None, None, :C], MASK_VALUE)
        probs = torch.softmax(scores, dim=-1).to(self.dtype)
        context = (probs @ values.permute(1, 2, 0, 3).repeat_interleave(G, 1)).transpose(1, 2).reshape(B, T, -1)
        return self._layer_output(index, hidden, context)

    @torch.no_grad()
    def head(self, hidden) -> np.ndarray:
        if isinstance(hidden, _PendingStep):
            return self._run_pending(hidden)
        return super().head(hidden)

    # -- static decode steps -------------------------------------------------------------------
    def _step(self, pool: _Pool, layers: tuple[int, ...]) -> None:
        """The whole decode step on the pool's fixed buffers; what a CUDA graph captures."""
        B = pool.batch
        x = self._embed(pool.ints[:B].view(B, 1), pool.ints[B:2 * B].view(B, 1))
        for index in layers:
            x = self._static_layer(index, x, pool)
        pool.logits.copy_(self._head(x))

    def _stage(self, pool: _Pool, step: _PendingStep) -> None:
        """Copy the step's inputs into the pool's fixed input buffers."""
        B, n = pool.batch, step.past + 1
        if pool.host_ints is not None:  # CUDA: through pinned memory, asynchronously
            ints = pool.host_ints.numpy()
            ints[:B], ints[B:2 * B], ints[2 * B] = step.ids[:, 0], step.positions[:, 0], step.past
            pool.host_bias.numpy()[:, :n] = step.bias
            pool.ints.copy_(pool.host_ints, non_blocking=True)
            pool.bias.copy_(pool.host_bias, non_blocking=True)
        else:
            pool.ints[:B] = torch.from_numpy(step.ids[:, 0])
            pool.ints[B:2 * B] = torch.from_numpy(step.positions[:, 0])
            pool.ints[2 * B] = step.past
            pool.bias[:, :n] = torch.from_numpy(np.ascontiguousarray(step.bias, np.float32))

    @torch.no_grad()
    def _run_pending(self, step: _PendingStep, eager_hidden: bool = False):
        with self._on_device():  # capture and replay use the current device's streams
            return self._run_pending_here(step, eager_hidden)

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _run_pending_here(self, step: _PendingStep, eager_hidden: bool):
        B = step.ids.shape[0]
        if not step.layers:  # embed straight into the head: nothing to cache
            x = self._embed(torch.as_tensor(step.ids, device=self.device),
                            torch.as_tensor(step.positions, device=self.device))
            return x if eager_hidden else self._head(x).cpu().numpy()
        pool = step.cache.storage
        if not isinstance(pool, _Pool) or pool.batch != B:
            raise BackendError("internal error: a decode step's cache was not allocated by this engine")
        self._stage(pool, step)
        if eager_hidden:  # run up to here without capture, return the hidden states
            x = self._embed(pool.ints[:B].view(B, 1), pool.ints[B:2 * B].view(B, 1))
            for index in step.layers:
                x = self._static_layer(index, x, pool)
            return x
        if self.cuda_graphs:
            graph = pool.graphs.get(step.layers)
            if graph is None:
                graph = pool.graphs[step.layers] = self._capture(pool, step.layers)
            graph.replay()
            pool.host_logits.copy_(pool.logits, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return pool.host_logits.numpy()
        self._step(pool, step.layers)
        return pool.logits.cpu().numpy()

    def _capture(self, pool: _Pool, layers: tuple[int, ...]):
        """Capture the step for ``layers``. The warm-up run on a side stream computes exactly
        what the replay will (same staged inputs), so its cache writes are harmless."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step(pool, layers)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # Our side stream, on this engine's device: torch's default capture stream is one per
            # process, made on whichever device captured first.
            with torch.cuda.graph(graph, pool=self._graph_pool, stream=stream):
                self._step(pool, layers)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"CUDA graph capture failed ({first}); load the torch backend with "
                               "cuda_graphs=False to decode without graphs") from None
        return graph

    def graph_keys(self, cache: KVCache | None = None) -> set[tuple[int, tuple[int, ...]]]:
        """(batch, layer set) of every CUDA graph held by ``cache`` (default: the released caches)."""
        pools = [cache.storage] if cache is not None else self._free
        return {(pool.batch, layers) for pool in pools if isinstance(pool, _Pool) for layers in pool.graphs}

    def close(self) -> None:
        self._free.clear()


def _host_zeros(shape: tuple, dtype) -> "torch.Tensor":
    """Pinned host memory (asynchronous copies) where the platform gives it, pageable otherwise
    (some sandboxed GPU hosts refuse to pin)."""
    try:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    except RuntimeError:
        return torch.zeros(shape, dtype=dtype)
