"""``skipdeploy eval``: held-out perplexity and greedy agreement per SkipDecode schedule.

Everything runs through the skipdeploy runtime (the deployed graphs, not PyTorch): perplexity by
teacher forcing with :meth:`Runtime.score` (prefill over the context, then the true tokens fed
step by step with the schedule's layers), and greedy agreement with a reference, the full
schedule of the same export or, with ``reference``, of another one (the original model of a
fine-tune): ``agreement`` is the fraction of generated tokens, position by position, that a
schedule's greedy output shares with the reference's over prompts cut from the same data, and
``prefix`` the mean share of each continuation identical to the reference's from its start
(``prefix_tokens`` in tokens; after the first difference the continuations drift apart, so
this is the stricter figure). A checkpoint directory is exported to a temporary directory first
(that part needs torch); an export directory is used as it is.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from ..schedule import LayerSchedule, Schedule
from . import data as data_mod


def schedule_for(num_layers: int, speedup: float, decay_tokens: int, warmup_layers: int = 1,
                 prompt: str = "full") -> LayerSchedule:
    """``Schedule.full`` for a speedup of 1, else ``Schedule.target_speedup``."""
    if speedup == 1:
        return Schedule.full(num_layers)
    return Schedule.target_speedup(num_layers, speedup, decay_tokens=decay_tokens, warmup_layers=warmup_layers,
                                   prompt=prompt)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def evaluate(model: str | Path, data: Sequence[str], speedups: Sequence[float] = (1, 2, 3, 5), *,
             reference: str | Path | None = None, seq_len: int = 256, context: int | None = None,
             decay_tokens: int | None = None, warmup_layers: int = 1, prompt: str = "full", chunks: int = 64,
             prompts: int = 32,
             prompt_tokens: int | None = None, new_tokens: int | None = None, batch_size: int = 16,
             seed: int = 0, backend: str = "onnxruntime", log: Callable[[str], None] | None = None) -> dict:
    """Evaluate a checkpoint or export directory; returns ``{"results": [...], ...}`` (see the CLI)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    kw = {k: v for k, v in locals().items() if k not in ("model", "reference", "log")}
    with contextlib.ExitStack() as stack:
        directory = _as_export(model, stack, log)
        ref = None if reference is None else _as_export(reference, stack, log)
        report = _evaluate_export(directory, reference=ref, log=log, **kw)
    exported = directory != Path(model).expanduser()
    report.update(model=str(model), export=None if exported else str(directory),
                  reference=None if reference is None else str(reference))
    return report


def _as_export(model: str | Path, stack: contextlib.ExitStack, log) -> Path:
    """``model`` itself when it is an export, else its export in a temporary directory."""
    path = Path(model).expanduser()
    if (path / "manifest.json").is_file():
        return path
    from .. import export

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="skipdeploy-eval-")))
    log(f"exporting {model} to a temporary directory")
    export(model, tmp / "export", progress=False, log=lambda m: None)
    return tmp / "export"


def _greedy_match(reference: list[list[int]], tokens: list[list[int]]) -> tuple[float, float]:
    """(per-position agreement, mean length of the identical prefix in tokens)."""
    same = total = prefix = 0
    for ref, got in zip(reference, tokens):
        equal = [a == b for a, b in zip(ref, got)]
        same, total = same + sum(equal), total + len(ref)
        prefix += equal.index(False) if False in equal else len(equal)
    return same / max(1, total), prefix / max(1, len(reference))


def _evaluate_export(directory: Path, *, reference: Path | None, data, speedups, seq_len, context, decay_tokens,
                     warmup_layers, prompt, chunks, prompts, prompt_tokens, new_tokens, batch_size, seed, backend,
                     log) -> dict:
    from ..runtime import load

    runtime = load(directory, backend=backend)
    ref_runtime = None if reference is None else load(reference, backend=backend)
    spec, manifest = runtime.spec, runtime.manifest
    L = spec.num_layers
    if manifest.tokenizer_path is None:
        raise InputError(f"{directory} has no tokenizer: evaluation on text needs one")
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2: a context token and a scored one (got {seq_len})")
    if seq_len > min(spec.max_positions, manifest.limits.get("max_length") or spec.max_positions):
        raise InputError(f"--seq-len {seq_len} exceeds the model's {spec.max_positions} positions")
    context = context or seq_len // 2
    if not 1 <= context < seq_len:
        raise InputError(f"--context must be in [1, {seq_len - 1}] (got {context})")
    default = manifest.schedule
    if decay_tokens is None:
        decay_tokens = default.decay_tokens if isinstance(default, Schedule) and not default.is_full() \
            else seq_len - context
    prompt_tokens = prompt_tokens or context
    new_tokens = new_tokens or decay_tokens
    if prompt_tokens + new_tokens - 1 > spec.max_positions:
        raise InputError(f"{prompt_tokens} prompt tokens + {new_tokens} new tokens exceed the model's positions")
    schedules = [(float(k), schedule_for(L, k, decay_tokens, warmup_layers, prompt)) for k in speedups]
    if ref_runtime is not None:
        _check_reference(ref_runtime, runtime, reference, prompt_tokens + new_tokens - 1)

    tokenizer = data_mod.load_tokenizer(manifest.tokenizer_path)
    bos = spec.bos_token_id if spec.bos_token_id is not None else 2
    all_chunks = data_mod.load_chunks(data, tokenizer, max(seq_len, prompt_tokens), bos)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(all_chunks))
    ppl_rows = all_chunks[np.sort(order[:chunks]), :seq_len]
    rest = order[chunks:] if len(order) > chunks else order
    gen_rows = all_chunks[np.sort(rest[:prompts]), :prompt_tokens]
    log(f"evaluating {len(schedules)} schedule(s) on {len(ppl_rows)} chunks x {seq_len - context} scored tokens "
        f"and {len(gen_rows)} prompts x {new_tokens} greedy tokens")

    def greedy(sched: LayerSchedule, rt=runtime) -> tuple[list[list[int]], float]:
        tokens: list[list[int]] = []
        seconds = steps = 0
        for b in _batches(len(gen_rows), batch_size):
            result = rt.generate(gen_rows[b].tolist(), new_tokens, sched, eos_token_id=None)
            tokens += result.tokens
            seconds += result.decode_seconds
            steps += len(result.layers_per_step)
        return tokens, 1e3 * seconds / max(1, steps)

    runtime.generate(gen_rows[:1].tolist(), 4, Schedule.full(L), eos_token_id=None)  # warm-up before timing
    own_full, full_ms = greedy(Schedule.full(L))
    wanted = own_full if ref_runtime is None else greedy(Schedule.full(ref_runtime.spec.num_layers), ref_runtime)[0]
    results = []
    for k, sched in schedules:
        logprobs = np.concatenate([runtime.score(ppl_rows[b].tolist(), context, sched)
                                   for b in _batches(len(ppl_rows), batch_size)])
        tokens, ms = (own_full, full_ms) if sched.is_full() else greedy(sched)
        agreement, prefix = _greedy_match(wanted, tokens)
        entry = {"target_speedup": k, "layer_speedup": sched.layer_speedup(decay_tokens),
                 "perplexity": float(math.exp(-logprobs.mean())), "agreement": agreement,
                 "prefix": prefix / new_tokens, "prefix_tokens": prefix,
                 "mean_log_prob": float(logprobs.mean()), "ms_per_token": ms,
                 "measured_speedup": full_ms / ms if ms > 0 else None,
                 "layers_per_token": sched.mean_layers(decay_tokens), "schedule": sched.to_dict()}
        results.append(entry)
        log(f"  {k:g}x: perplexity {entry['perplexity']:.3f}, agreement {entry['agreement']:.3f}, identical prefix "
            f"{prefix:.1f} tokens (layer speedup {entry['layer_speedup']:.2f}x, "
            f"measured {entry['measured_speedup']:.2f}x)")
    return {"results": results, "data": list(data), "seq_len": seq_len, "context": context,
            "decay_tokens": decay_tokens,
            "tokens_scored": int(len(ppl_rows) * (seq_len - context)), "prompts": len(gen_rows),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "backend": backend, "seed": seed}


def _check_reference(ref, runtime, path: Path, positions: int) -> None:
    """The reference must read the same token ids as the model: same vocabulary, same tokenizer."""
    if ref.spec.vocab_size != runtime.spec.vocab_size:
        raise InputError(f"the reference {path} has a vocabulary of {ref.spec.vocab_size} tokens, the model "
                         f"{runtime.spec.vocab_size}: agreement needs the same tokenizer")
    mine, theirs = runtime.manifest.tokenizer_path, ref.manifest.tokenizer_path
    if mine and theirs and data_mod.load_tokenizer(mine).get_vocab() != data_mod.load_tokenizer(theirs).get_vocab():
        raise InputError(f"the reference {path} has another tokenizer than the model: agreement needs the same one")
    if positions > ref.spec.max_positions:
        raise InputError(f"the prompts and new tokens ({positions} positions) exceed the reference's "
                         f"{ref.spec.max_positions}")
