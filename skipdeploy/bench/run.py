"""The benchmark: build the contenders, let them take turns, probe, and collect the results."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InputError, SkipDeployError
from ..manifest import Manifest
from ..schedule import LayerSchedule, Schedule
from .cost import cost_model
from .probes import PROBE_BYTES, bandwidth_probe, environment, load_average, memory_in_subprocess
from .rows import agreements, rows
from .runners import Contender, hf_runner, load_hf, prompts_for, skipdeploy_runner


class BenchError(SkipDeployError):
    """The timings are in, but a probe failed: ``results`` holds what was measured, with the
    one-line reasons under ``results["errors"]`` (the first is the message)."""

    def __init__(self, results: dict[str, Any]) -> None:
        errors = results["errors"]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(errors[0] + more)
        self.results = results


def run_bench(directory: str | os.PathLike, *, batch_sizes: Sequence[int] = (1, 8),
              target_speedups: Sequence[float] = (2, 3, 5), prompt_length: int = 32, new_tokens: int = 64,
              repeats: int = 5, warmup: int = 1, decay_tokens: int | None = None, threads: int | None = None,
              hf: bool = True, checkpoint: str | None = None, quantize: str | Sequence[str] | None = None,
              int8_export: str | os.PathLike | None = None, quantized_dir: str | os.PathLike | None = None,
              memory: bool = True, bandwidth: bool = True,
              seed: int = 0, progress: bool | None = None, probe_bytes: int = PROBE_BYTES,
              peers: Sequence[str] = (), work_dir: str | os.PathLike | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return its results (the structure ``--json`` prints). Raises
    :class:`BenchError`, holding the results, when a memory probe fails.

    ``peers``: other engines as contenders (``peers.peer_names``: ``ct2``, ``ortgenai``,
    ``ct2-int8``, ...), converted from ``checkpoint`` (default: the export's source) once into
    ``work_dir`` (default: under ``~/.cache/skipdeploy/peers``), each run in a worker process
    (``peer_workers``). One that cannot run is skipped with a line to ``log``.

    ``quantize``: weight schemes (``int8``, ``int4``, ``int8-dynamic``) whose exports of this one are
    measured too, full and with every target schedule, with their token agreement against float32
    full; each is reused from (or written to) ``quantized_dir/SCHEME`` (``int8_export``: the int8
    one's own directory), else made in a temporary directory."""
    from ..runtime import load

    log = log or (lambda msg: print(msg, file=sys.stderr))
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be integers >= 1 (got {batch_sizes})")
    for name, value, low in (("prompt length", prompt_length, 1), ("new tokens", new_tokens, 2),
                             ("repeats", repeats, 1), ("warm-up runs", warmup, 0)):
        if value < low:
            raise InputError(f"{name} must be >= {low} (got {value})")
    schemes = [quantize] if isinstance(quantize, str) else list(quantize or ())
    from ..exporter.quantize import SCHEMES, scheme_of

    bad = [q for q in schemes if q not in SCHEMES]
    if bad or len(set(schemes)) != len(schemes):
        raise InputError(f"--quantize takes {', '.join(SCHEMES)}, each once (got {','.join(map(str, schemes))})")
    peer_list: list[str] = []
    if peers:
        from .peers import peer_names

        peer_list = peer_names(list(peers))
    threads = threads or os.cpu_count() or 1
    runtime = load(directory, threads=threads)
    manifest, spec = runtime.manifest, runtime.spec
    if manifest.raw.get("quantization"):
        raise InputError(f"{directory} is a quantized export; bench the float32 export and add --quantize "
                         f"{scheme_of(manifest.quantization)}")
    L = spec.num_layers
    decay = decay_tokens or max(1, new_tokens - 1)  # the decode steps measured: the target is met over them
    schedules: list[tuple[str, LayerSchedule, float | None]] = [("full", Schedule.full(L), None)]
    for k in target_speedups:
        if k <= 1:
            raise InputError(f"target speedups must be > 1 (got {k:g}); the full schedule is always measured")
        schedules.append((f"skip {k:g}x", Schedule.target_speedup(L, float(k), decay_tokens=decay), float(k)))

    contenders = [Contender(label, "skipdeploy", skipdeploy_runner(runtime, sched, new_tokens), schedule=sched,
                            target=k, manifest=manifest) for label, sched, k in schedules]
    temp_dirs: list[Path] = []
    quantized: dict[str, Path] = {}  # scheme -> its export
    for scheme in schemes:
        target = int8_export if scheme == "int8" and int8_export is not None else \
            (Path(quantized_dir) / scheme if quantized_dir is not None else None)
        quantized[scheme], temp = quantized_export_of(manifest, scheme, target, log)
        if temp is not None:
            temp_dirs.append(temp)
        q_runtime = load(quantized[scheme], threads=threads)
        contenders += [Contender(f"{scheme} {label}", "skipdeploy", skipdeploy_runner(q_runtime, sched, new_tokens),
                                 export=scheme, schedule=sched, target=k, manifest=q_runtime.manifest)
                       for label, sched, k in schedules]
    peer_set = None
    bandwidths: dict[int, list[float]] = {}  # batch -> one sample after each round
    mem: list[dict[str, Any]] = []
    errors: list[str] = []
    try:  # from here on, the workers and the temporary quantized exports are cleaned up however it ends
        if checkpoint:  # gguf:FILE -> its (cached) conversion, which records the file for llama.cpp
            from ..exporter.checkpoint import local_source

            checkpoint = local_source(checkpoint, log=log)
        if peer_list:
            from .peer_workers import Peers

            peer_set = Peers(peer_list, checkpoint or manifest.source, work_dir, threads, new_tokens, log)
            contenders += peer_set.contenders
        hf_model = load_hf(checkpoint, manifest, threads, log) if hf else None
        if hf_model is not None:
            contenders.append(Contender("hf generate", "hf", hf_runner(hf_model, new_tokens, spec.pad_id)))

        load_before = load_average()
        probe = bandwidth_probe(threads, probe_bytes) if bandwidth else None

        def sample_bandwidth(batch: int) -> None:
            bandwidths.setdefault(batch, []).append(probe(3))

        measure(contenders, batch_sizes, prompt_length, new_tokens, spec.vocab_size, repeats, warmup, seed, progress,
                between_rounds=sample_bandwidth if probe else None)
        probe = None  # frees its 256 MiB before the memory probes
        if peer_set is not None:
            peer_set.close()  # their memory, before the memory probes
        if memory:
            for label, path in [("float32", manifest.directory), *quantized.items()]:
                for batch in batch_sizes:
                    try:
                        mem.append({"export": label, "batch": batch, **memory_in_subprocess(
                            path, batch, prompt_length, new_tokens, threads, seed)})
                    except SkipDeployError as exc:
                        errors.append(f"{label} export, batch {batch}: {exc}")
        result_rows = rows(contenders, batch_sizes, spec, prompt_length, new_tokens, bandwidths)
    finally:
        if peer_set is not None:
            peer_set.close()
        for temp in temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)
    load_after = load_average()
    costs = cost_model(spec)
    results = {
        "export": str(manifest.directory), "model": {"layers": L, "hidden": spec.hidden_size, "ffn": spec.ffn_dim,
                                                     "vocab": spec.vocab_size, "dtype": manifest.dtype},
        "config": {"batch_sizes": batch_sizes, "target_speedups": [float(k) for k in target_speedups],
                   "prompt_length": prompt_length, "new_tokens": new_tokens, "decay_tokens": decay,
                   "repeats": repeats, "warmup": warmup, "threads": threads, "seed": seed,
                   "quantize": schemes, "hf_baseline": hf_model is not None, "peers": peer_list},
        "environment": {**environment(threads), **(peer_set.versions() if peer_set else {}),
                        "load_average_before": load_before, "load_average_after": load_after},
        "cost_model": {**costs, "head_in_layers": costs["head"] / costs["layer"]},
        "bandwidth_bytes_per_s": {str(b): v for b, v in bandwidths.items()},
        "rows": result_rows,
        "memory": mem,
        "agreement": agreements(contenders, batch_sizes),
        "peers": ({"work_dir": str(peer_set.work_root), "prepared": peer_set.prepared, "skipped": peer_set.skipped}
                  if peer_set else None),
        "errors": errors,
    }
    if errors:
        raise BenchError(results)
    return results


def quantized_export_of(manifest: Manifest, scheme: str, target: str | os.PathLike | None,
                        log: Callable[[str], None]) -> tuple[Path, Path | None]:
    """A ``scheme`` export of ``manifest``: ``target`` if it already holds one made from it, else a
    new one there (kept) or in a temporary directory (returned second: remove it after the run)."""
    from ..exporter.quantize import is_quantized_from, scheme_of
    from ..manifest import MANIFEST, read_manifest

    if target is not None and (Path(target) / MANIFEST).is_file():
        made = read_manifest(target, verify=False)
        if scheme_of(made.quantization) != scheme:  # an int8 export from before issue 18 is int8-dynamic
            raise InputError(f"{target} is not an {scheme} export ({scheme_of(made.quantization) or 'float'} "
                             "weights); pass another directory")
        if not is_quantized_from(made, manifest):
            raise InputError(f"{target} was quantized from another export than {manifest.directory} (or an "
                             "earlier version of it); remove it or pass another directory")
        return Path(target), None
    try:
        from ..exporter.quantize import quantize_export
    except ImportError as exc:
        raise SkipDeployError(f"--quantize needs onnx ({exc}); pip install 'skipdeploy[export]'") from None
    temp = None
    if target is None:
        temp = Path(tempfile.mkdtemp(prefix=f"skipdeploy-bench-{scheme}-"))
        target = temp / scheme
    log(f"quantizing {manifest.directory} to {scheme} weights in {target}")
    quantize_export(manifest.directory, target, weights=scheme, progress=False, log=log)
    return Path(target), temp


def measure(contenders: list[Contender], batch_sizes: list[int], prompt_length: int, new_tokens: int,
            vocab_size: int, repeats: int, warmup: int, seed: int, progress: bool | None,
            between_rounds: Callable[[int], None] | None = None) -> None:
    """Fill every contender's ``runs[batch]``: ``warmup`` untimed runs each, then ``repeats``
    rounds in which every contender runs once, in an order that rotates every round (so that
    drift of a shared machine hits all of them alike); ``between_rounds(batch)`` after each."""
    from tqdm.auto import tqdm

    total = len(batch_sizes) * len(contenders) * (warmup + repeats)
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr,
               disable=None if progress is None else not progress)
    try:
        for batch in batch_sizes:
            prompts = prompts_for(batch, prompt_length, vocab_size, seed)
            for c in contenders:
                c.runs[batch] = []
                for _ in range(warmup):
                    bar.set_postfix_str(f"batch {batch}, {c.label} (warm-up)")
                    c.run(prompts)
                    bar.update()
            for r in range(repeats):
                order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
                for c in order:
                    bar.set_postfix_str(f"batch {batch}, {c.label}, round {r + 1}/{repeats}")
                    c.runs[batch].append(c.run(prompts))
                    bar.update()
                if between_rounds is not None:
                    between_rounds(batch)
    finally:
        bar.close()
