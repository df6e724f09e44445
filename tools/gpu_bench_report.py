"""The results file of tools/gpu_bench.py: written after every step, never half-written.

A device run is cut off at its time limit, so nothing may wait for the end: every phase time,
check, skipped contender and timed ``generate`` call rewrites the file at once (a temporary file
renamed over it, so that a reader, or a kill, never sees a partial one). Several runs (one per
model shape, in separate processes) share one file: each replaces its own entry in ``"runs"``,
keyed by shape, dtype and device, and keeps the others.

    {"runs": [{"shape": "opt-125m", "dtype": "float16", "device": "cuda", "gpu": "NVIDIA H200",
               "status": "running" | "done" | "failed: <what>" | "cut: <why>" | "error: <why>",
               "phases": {"checkpoint": 2.1, "export": 9.8, ...},   # seconds, in order
               "checks": [...], "skipped": [...], "errors": [...], "rows": [...]}]}

A run whose status is still "running" was killed before it could say so.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path


def _load_runs(path: Path) -> list[dict]:
    try:
        runs = json.loads(path.read_text()).get("runs")
    except (OSError, ValueError, AttributeError):  # absent, or some other file: start afresh
        return []
    return runs if isinstance(runs, list) else []


def write_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class Results:
    """One run's results, saved to ``path`` (if any) after every change."""

    def __init__(self, path: Path | None, log, **run):
        self.path, self.log = path, log
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.run = {**run, "status": "running", "phases": {}, "checks": [], "skipped": [], "errors": [], "rows": []}
        self.times: dict[tuple[str, str, int], list[float]] = {}  # (backend, schedule, batch) -> seconds
        self.layers: dict[str, float] = {}  # schedule -> mean layers per generated token
        self.new_tokens = run.get("new_tokens", 1)
        self.current: str | None = None  # the phase under way, for a run cut off inside it
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        key = tuple(self.run.get(k) for k in ("shape", "dtype", "device"))
        runs = [r for r in _load_runs(self.path) if tuple(r.get(k) for k in ("shape", "dtype", "device")) != key]
        write_atomically(self.path, {"runs": [*runs, self.run]})

    @contextlib.contextmanager
    def phase(self, name: str, quiet: bool = False):
        """Time a phase (adding to its earlier time, if any), log it unless ``quiet``, and save it;
        a failed phase is saved too, with its time so far."""
        t, outer, self.current = time.perf_counter(), self.current, name
        try:
            yield
        finally:
            self.current = outer
            seconds = round(time.perf_counter() - t, 2)
            self.run["phases"][name] = round(self.run["phases"].get(name, 0.0) + seconds, 2)
            if not quiet:
                self.log(f"phase {name}: {seconds:.1f} s")
            self.save()

    def skip(self, what: str, why: str) -> None:
        self.log(f"{what}: skipped ({why})")
        self.run["skipped"].append(f"{what}: {why}")
        self.save()

    def check(self, name: str, error: float, passed: bool, detail: str = "") -> None:
        self.run["checks"].append({"check": name, "max_error": error, "passed": passed, "detail": detail})
        self.save()

    def set(self, **fields) -> None:
        self.run.update(fields)
        self.save()

    def record(self, backend: str, schedule: str, batch: int, seconds: float) -> None:
        self.times.setdefault((backend, schedule, batch), []).append(seconds)
        self.run["rows"] = self.rows()
        self.save()

    def rows(self) -> list[dict]:
        """Medians so far; ``vs_hf`` and ``vs_own_full`` once those contenders have a time."""
        ms = {key: 1e3 * statistics.median(ts) / self.new_tokens for key, ts in self.times.items()}
        rows = []
        for (backend, sched, batch), value in sorted(ms.items(), key=lambda kv: kv[0][2]):
            hf, full = ms.get(("hf", "full", batch)), ms.get((backend, "full", batch))
            rows.append({"batch": batch, "backend": backend, "schedule": sched,
                         "layers_per_token": round(self.layers.get(sched, float("nan")), 2),
                         "ms_per_token": round(value, 3), "tokens_per_s": round(batch * 1e3 / value, 1),
                         "vs_hf": round(hf / value, 2) if hf else None,
                         "vs_own_full": round(full / value, 2) if full else None,
                         "repeats": len(self.times[(backend, sched, batch)])})
        return rows

    def table(self) -> str:
        return table(self.run)


def table(run: dict) -> str:
    """A run's rows as a markdown table, under a line that says what was measured and how far it got."""
    rows = run.get("rows", [])
    repeats = min((r["repeats"] for r in rows), default=0)
    ratio = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    lines = [f"## {run['shape']} (random weights), {run['dtype']}, {run['gpu']}: prompt {run['prompt']}, "
             f"{run['new_tokens']} new tokens, ms/token = generate wall time / {run['new_tokens']}, "
             f"median of {repeats} (status: {run.get('status')})", "",
             "| batch | backend | schedule | layers/token | ms/token | tokens/s | vs HF | vs own full |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['backend']} | {r['schedule']} | {r['layers_per_token']} "
                     f"| {r['ms_per_token']:.2f} | {r['tokens_per_s']:.0f} | {ratio(r['vs_hf'])} "
                     f"| {ratio(r['vs_own_full'])} |")
    phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in run.get("phases", {}).items())
    lines += ["", f"phases (s): {phases or 'none'}"]
    lines += [f"skipped: {line}" for line in run.get("skipped", [])]
    lines += [f"ERROR: {line}" for line in run.get("errors", [])]
    lines += [f"check {c['check']}: max error {c['max_error']:.3e} {'ok' if c['passed'] else 'FAILED'}"
              for c in run.get("checks", [])]
    return "\n".join(lines)


if __name__ == "__main__":  # print what a results file holds, e.g. after a run was cut off
    import sys

    for path in sys.argv[1:]:
        runs = _load_runs(Path(path))
        print("\n\n".join(table(run) for run in runs) if runs else f"{path}: no results")
