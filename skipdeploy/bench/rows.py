"""Result rows of a benchmark: per batch size and contender, its times and ratios; token agreement."""

from __future__ import annotations

import statistics
from typing import Any, Sequence

import numpy as np

from ..manifest import ModelSpec
from .cost import bytes_per_token, cost_model_speedup
from .runners import Contender, Run


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


def paired_median(a: list[Run], b: list[Run], batch: int) -> float | None:
    """Median over rounds of tokens/s(a) / tokens/s(b): each round's runs were back to back."""
    ratios = [x.tokens_per_s(batch) / y.tokens_per_s(batch) for x, y in zip(a, b) if y.tokens_per_s(batch) > 0]
    return float(statistics.median(ratios)) if ratios else None


def rows(contenders: list[Contender], batch_sizes: list[int], spec: ModelSpec, prompt_length: int,
         new_tokens: int, bandwidths: dict[int, list[float]]) -> list[dict[str, Any]]:
    """One row per batch size and contender (the structure ``--json`` writes under ``rows``)."""
    out = []
    full = next(c for c in contenders if c.label == "full")
    hf = next((c for c in contenders if c.kind == "hf"), None)
    steps = new_tokens - 1  # decode steps: token 0 comes from the prefill
    for batch in batch_sizes:
        for c in contenders:
            runs = c.runs[batch]
            times = [t for run in runs for t in run.token_times]
            row: dict[str, Any] = {
                "batch": batch, "contender": c.label, "kind": c.kind, "export": c.export,
                "schedule": c.schedule.to_dict() if c.schedule is not None else None, "target_speedup": c.target,
                "layers_per_token": (c.schedule.mean_layers(steps) if c.schedule is not None
                                     else float(spec.num_layers)),
                "ttft_ms": 1e3 * statistics.median(run.ttft for run in runs),
                "ms_per_token": {"median": 1e3 * statistics.median(times), "p90": 1e3 * percentile(times, 90),
                                 "p99": 1e3 * percentile(times, 99), "mean": 1e3 * float(np.mean(times))},
                "tokens_per_s": statistics.median(run.tokens_per_s(batch) for run in runs),
                "runs": [{"ttft_ms": 1e3 * run.ttft, "decode_ms": 1e3 * run.decode_seconds,
                          "tokens_per_s": run.tokens_per_s(batch)} for run in runs],
                # A peer's too: how it compares with skipdeploy's float32 full schedule, same prompts, same rounds.
                "speedup_vs_full": (paired_median(runs, full.runs[batch], batch) if c.kind in ("skipdeploy", "peer")
                                    else None),
                "cost_model_speedup": None, "layer_speedup": None, "fraction_of_cost_model": None,
                "vs_hf": paired_median(runs, hf.runs[batch], batch) if hf is not None else None,
                "bytes_per_token": None, "memory_floor_ms_per_token": None, "fraction_of_floor": None,
            }
            if c.kind == "skipdeploy" and c.export != "float32":  # a schedule's gain on its own weights
                own_full = next(o for o in contenders if o.export == c.export and o.target is None)
                row["speedup_vs_export_full"] = paired_median(runs, own_full.runs[batch], batch)
            if c.kind == "skipdeploy":
                row["layer_speedup"] = c.schedule.layer_speedup(steps)
            if c.kind == "skipdeploy" and c.export == "float32":
                row["cost_model_speedup"] = cost_model_speedup(spec, c.schedule, prompt_length, new_tokens)
                if row["speedup_vs_full"] is not None:
                    row["fraction_of_cost_model"] = row["speedup_vs_full"] / row["cost_model_speedup"]
            if c.kind == "skipdeploy":
                row["bytes_per_token"] = bytes_per_token(c.manifest, c.schedule, batch, prompt_length, new_tokens)
                samples = bandwidths.get(batch)
                if samples:
                    row["memory_floor_ms_per_token"] = 1e3 * row["bytes_per_token"] / statistics.median(samples)
                    # Each round against the bandwidth measured right after it.
                    row["fraction_of_floor"] = statistics.median(
                        (row["bytes_per_token"] / bw) / (run.decode_seconds / len(run.token_times))
                        for run, bw in zip(runs, samples))
            out.append(row)
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """Token agreement of ``other`` with ``reference`` (same prompts): the fraction of positions
    equal, the mean fraction of each row before the first difference, and rows fully equal."""
    equal, prefix, rows_equal = [], [], 0
    for ref, got in zip(reference, other):
        n = min(len(ref), len(got))
        same = [a == b for a, b in zip(ref[:n], got[:n])]
        equal.append(float(np.mean(same)) if n else 1.0)
        first = next((i for i, s in enumerate(same) if not s), n)
        prefix.append(first / n if n else 1.0)
        rows_equal += int(all(same) and len(ref) == len(got))
    return {"positions_equal": float(np.mean(equal)), "prefix_before_first_difference": float(np.mean(prefix)),
            "rows_equal": rows_equal / max(1, len(reference))}


def agreements(contenders: list[Contender], batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Tokens of the quantized exports' full schedules, of the peers and of Hugging Face against the
    float32 full schedule (greedy, same prompts; the last timed run of each)."""
    full = next(c for c in contenders if c.label == "full")
    out = []
    for c in contenders:
        quantized_full = c.kind == "skipdeploy" and c.export != "float32" and c.target is None
        if quantized_full or c.label == "hf generate" or c.kind == "peer":
            for batch in batch_sizes:
                out.append({"contender": c.label, "reference": "full", "batch": batch,
                            **agreement(full.runs[batch][-1].tokens, c.runs[batch][-1].tokens)})
    return out
