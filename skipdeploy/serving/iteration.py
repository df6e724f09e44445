"""One iteration of in-flight batching: every running request advances by one forward pass.

A request either feeds its last token (a decode step with its own schedule's layers at its own
step) or the next chunk of its prompt (the prompt layers). All their positions are laid out as
rows of one block [N, E]; then, layer by layer, only the rows whose layer set holds the layer go
through it: the layer's projections run on all of them at once, the attention on each run of
consecutive cache slots over that slot's own positions. Rows that skip a layer pass through
unchanged, which is what SkipDecode does.

Invariant (checked): a row runs layer l at its step s only if l is in its schedule's
``layers(s)``, so the positions a layer caches for a request are a prefix of its sequence, and
the layer's cached length equals the positions before the new ones: no row ever attends over a
cache with holes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engines import InflightEngine, SlotCache
from ..errors import NumericalError
from ..runtime.kv import check_cached
from .request import Request


@dataclass
class _Part:
    """A request's share of one iteration."""

    request: Request
    ids: list[int]
    start: int             # position of the first id
    layers: tuple[int, ...]
    prefill: bool
    logits: bool           # whether this pass produces the request's next token


@dataclass
class IterationStats:
    rows: int              # requests that advanced
    positions: int         # positions run (prompt chunks included)
    layer_calls: int       # layers run at all (by at least one row)
    layer_rows: int        # sum over layers of the rows that ran them
    tokens: int            # tokens generated


def plan(running: list[Request], prefill_budget: int, prefill_first: bool = False) -> list[_Part]:
    """Each running request's share, in slot order. While some request is decoding, prompt chunks
    take at most ``prefill_budget`` positions in all, so that they do not stall its next token;
    with nobody decoding, prompts run whole. ``prefill_first``: an iteration that runs prompt
    chunks runs nothing else (a new request's first token then waits for the prompts only, not
    for every running row's step as well)."""
    if not any(r.prefilled == len(r.prompt) for r in running):
        prefill_budget = sum(len(r.prompt) - r.prefilled for r in running)
    parts = []
    for r in sorted(running, key=lambda r: r.slot):
        if r.prefilled < len(r.prompt):
            n = min(prefill_budget, len(r.prompt) - r.prefilled)
            if n <= 0:
                continue
            prefill_budget -= n
            parts.append(_Part(r, r.prompt[r.prefilled:r.prefilled + n], r.prefilled, r.schedule.prompt_layers(),
                               True, r.prefilled + n == len(r.prompt)))
        else:
            s = r.step
            parts.append(_Part(r, [r.tokens[-1]], len(r.prompt) + s, r.schedule.layers(s), False, True))
    if prefill_first and any(p.prefill for p in parts):
        return [p for p in parts if p.prefill]
    return parts


def run(engine: InflightEngine, cache: SlotCache, parts: list[_Part]) -> tuple[np.ndarray, IterationStats]:
    """The forward pass of ``parts``; returns the logits [n, V] of the parts that produce a token."""
    L = engine.spec.num_layers
    offsets = np.cumsum([0] + [len(p.ids) for p in parts])
    ids = np.array([[t for p in parts for t in p.ids]], np.int64)
    positions = np.array([[p.start + i for p in parts for i in range(len(p.ids))]], np.int64)
    embedded = engine.embed(ids, positions)
    hidden = engine.take_rows(embedded[0], np.arange(offsets[-1]))  # owned: embed may reuse its buffer
    member = np.zeros((len(parts), L), bool)
    for i, p in enumerate(parts):
        member[i, list(p.layers)] = True
    layer_calls = layer_rows = 0
    for layer in range(L):
        rows = np.flatnonzero(member[:, layer])
        if rows.size == 0:
            continue
        layer_calls += 1
        layer_rows += rows.size
        index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in rows])
        x = engine.take_rows(hidden, index)
        query, key, value = engine.layer_in(layer, x, positions[0, index])
        context = engine.empty_like(query)
        _attend(engine, cache, layer, [parts[i] for i in rows], query, key, value, context)
        engine.put_rows(hidden, index, engine.layer_out(layer, x, context))
    heads = [offsets[i + 1] - 1 for i, p in enumerate(parts) if p.logits]
    logits = np.array(engine.head(engine.take_rows(hidden, np.array(heads, np.int64))[:, None, :]), np.float32) \
        if heads else np.zeros((0, engine.spec.vocab_size), np.float32)
    if not np.isfinite(logits).all():
        bad = [p.request.id for p, row in zip([p for p in parts if p.logits], logits) if not np.isfinite(row).all()]
        raise NumericalError(f"non-finite logits for request(s) {', '.join(bad)} ({engine.manifest.directory}); "
                             "the export's weights or inputs are broken")
    stats = IterationStats(len(parts), int(offsets[-1]), layer_calls, layer_rows, len(heads))
    return logits, stats


def _attend(engine: InflightEngine, cache: SlotCache, layer: int, members: list[_Part], query, key, value, context) -> None:
    """Attention for the layer's rows: one call per run of consecutive decode slots, one per prompt
    chunk; then each member's cached length grows by its new positions."""
    run: list[_Part] = []
    offset = run_start = 0

    def flush() -> None:
        if run:
            span = slice(run_start, run_start + len(run))
            cached = np.array([p.request.valid[layer] for p in run], np.int64)
            engine.attend(layer, query[span], key[span], value[span], context[span], cache, run[0].request.slot,
                          cached, 1)
            run.clear()

    for p in members:
        check_cached(layer, int(p.request.valid[layer]), p.start, f"request {p.request.id}")
        n = len(p.ids)
        if p.prefill:
            flush()
            span = slice(offset, offset + n)
            engine.attend(layer, query[span], key[span], value[span], context[span], cache, p.request.slot,
                          np.array([p.request.valid[layer]], np.int64), n)
        else:
            if run and p.request.slot != run[-1].request.slot + 1:
                flush()
            if not run:
                run_start = offset
            run.append(p)
        offset += n
    flush()
    for p in members:
        p.request.valid[layer] += len(p.ids)


