"""``skipdeploy bench``: decode speed of an export, per batch size and schedule, against Hugging Face.

For every batch size the contenders are: the full schedule, one SkipDecode schedule per target
speedup (``Schedule.target_speedup``), optionally the int8-weight version of the export (full
schedule) and, when transformers is installed and the checkpoint is at hand, Hugging Face
``generate`` on the same checkpoint with the same number of threads. Every contender runs once
to warm up, then the contenders take turns, run by run, in an order that rotates every round, so
that drift of a shared machine hits all of them alike. Ratios (speedup against the full schedule,
against Hugging Face) are medians of the per-round ratios.

Reported per row: time to first token; time per output token (median, P90, P99 over every token
of every run); output tokens/s after warm-up (batch x decode steps / decode time, median over
runs); decoder layers run per token; the measured speedup against the full schedule in the same
runtime; the ideal speedup from the cost model below; the weight bytes a token reads and the
memory-bandwidth floor they imply (a probe measures the bandwidth after every round, and each
round is compared with its own sample); and, per export and batch size, the peak resident
memory of a ``generate`` in a fresh process against weights + KV cache.

Cost model (multiply-adds per generated token and row, from the model's shapes; E hidden, F ffn,
V vocabulary, W word-embedding width, S keys attended):
    embed  = E*W if W != E (project_in) else 0        (the lookups are free)
    layer  = 4*E*E + 2*E*F + 2*S*E                    (q, k, v, out projections; fc1, fc2;
                                                       scores and weighted values)
    head   = W*V + E*W if W != E (project_out)        (final LayerNorm not counted)
A step that runs the layer set ``Ls`` costs embed + sum over Ls of layer + head, and a schedule's
ideal speedup is the full schedule's cost over its own, summed over the decode steps measured.
For an opt-125m shape the head (38.6 M) is 5.5 layers' worth (7.1 M each), so halving the layers
is ideally a 1.53x speedup, not 2x; the layer-count ratio (``ideal_speedup_layers``) is reported too.

The module imports numpy and skipdeploy at import time; torch and transformers (the baseline),
onnx (the bandwidth probe, the int8 export) and matplotlib (``--plot``) only when used.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError, SkipDeployError
from .manifest import Manifest, ModelSpec
from .schedule import LayerSchedule, Schedule

MEMORY_HEADROOM = 300_000_000  # bytes allowed above weights + KV cache for the peak resident memory
PROBE_BYTES = 256 << 20        # weight matrix of the bandwidth probe: well past any last-level cache


# -- cost model ------------------------------------------------------------------------------------
def cost_model(spec: ModelSpec) -> dict[str, int]:
    """Multiply-adds per row of one decode step, by component; ``layer`` excludes attention
    (``attention_per_key`` times the keys attended is added per layer)."""
    E, F, V, W = spec.hidden_size, spec.ffn_dim, spec.vocab_size, spec.word_embed_proj_dim
    return {"embed": E * W if W != E else 0, "layer": 4 * E * E + 2 * E * F, "attention_per_key": 2 * E,
            "head": W * V + (E * W if W != E else 0)}


def step_macs(spec: ModelSpec, layers: int, keys: int) -> int:
    """Multiply-adds per row of a decode step that runs ``layers`` layers over ``keys`` keys."""
    c = cost_model(spec)
    return c["embed"] + layers * (c["layer"] + c["attention_per_key"] * keys) + c["head"]


def ideal_speedup(spec: ModelSpec, schedule: LayerSchedule, prompt_length: int, new_tokens: int) -> float:
    """The full schedule's cost over ``schedule``'s, over the decode steps 0 .. new_tokens-2 (the
    forwards that produce generated tokens 1 .. new_tokens-1; token 0 comes from the prefill)."""
    steps = range(max(1, new_tokens - 1))
    full = sum(step_macs(spec, spec.num_layers, prompt_length + s + 1) for s in steps)
    mine = sum(step_macs(spec, schedule.count(s), prompt_length + s + 1) for s in steps)
    return full / mine


# -- bytes and bandwidth ---------------------------------------------------------------------------
def graph_bytes(manifest: Manifest) -> dict[str, int]:
    """Bytes of each graph's file plus the external data it reads (≈ its weights)."""
    def size(entry: dict) -> int:
        return sum((manifest.directory / name).stat().st_size for name in [entry["file"], *entry.get("data", [])])

    out = {"embed": size(manifest.graphs["embed"]), "head": size(manifest.graphs["head"])}
    for i, entry in enumerate(manifest.graphs["layers"]):
        out[f"layer_{i:02d}"] = size(entry)
    return out


def weight_bytes(manifest: Manifest) -> int:
    """Bytes of every graph and data file of the export, each file once (shared data counted once)."""
    names = set()
    for entry in [manifest.graphs["embed"], manifest.graphs["head"], *manifest.graphs["layers"]]:
        names.update([entry["file"], *entry.get("data", [])])
    return sum((manifest.directory / n).stat().st_size for n in names)


def bytes_per_token(manifest: Manifest, schedule: LayerSchedule, batch: int, prompt_length: int,
                    new_tokens: int) -> float:
    """Mean bytes a decode step reads: the weights of the layers it runs and of the head (the
    embedding reads a row per token: not counted), plus the keys and values it attends to."""
    sizes = graph_bytes(manifest)
    spec = manifest.model
    itemsize = 2 if manifest.dtype == "float16" else 4
    steps = range(max(1, new_tokens - 1))
    total = 0.0
    for s in steps:
        layers = schedule.layers(s)
        kv = 2 * (prompt_length + s) * batch * spec.hidden_size * itemsize
        total += sum(sizes[f"layer_{i:02d}"] + kv for i in layers) + sizes["head"]
    return total / len(steps)


def bandwidth_probe(threads: int | None, nbytes: int = PROBE_BYTES) -> Callable[[int], float] | None:
    """A function ``measure(repeats) -> bytes/s``: the best of ``repeats`` runs of a [1, K] x [K, N]
    MatMul over a 256 MiB float32 matrix (past any cache) in onnxruntime, with the runtime's session
    settings. ``run_bench`` measures after every round, because the bandwidth a VM gets drifts with
    its neighbours (45 to 71 GB/s within minutes here), and pairs each round with its own sample.
    None when onnx (to build it) is missing."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    import onnxruntime as ort

    from .engines.onnxruntime_engine import session_options

    k = 8192
    n = max(1, nbytes // (4 * k))
    # Random values: pages of one repeated value can be merged by the host (KSM) and then read
    # from cache, which made a constant-filled probe report 90 GB/s here.
    weight = np.random.default_rng(0).random((k, n), np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)
    blob = model.SerializeToString()
    del weight, graph, model
    session = ort.InferenceSession(blob, session_options(threads), providers=["CPUExecutionProvider"])
    del blob
    x = np.ones((1, k), np.float32)
    session.run(None, {"x": x})

    def measure(repeats: int) -> float:
        return 4 * k * n / min(_timed(lambda: session.run(None, {"x": x})) for _ in range(repeats))

    return measure


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- contenders -------------------------------------------------------------------------------------
@dataclass
class Run:
    ttft: float                 # seconds from the call to the first generated token
    token_times: list[float]    # seconds between consecutive generated tokens
    tokens: list[list[int]]

    @property
    def decode_seconds(self) -> float:
        return float(sum(self.token_times))

    def tokens_per_s(self, batch: int) -> float:
        return batch * len(self.token_times) / self.decode_seconds if self.token_times else 0.0


@dataclass
class Contender:
    label: str
    kind: str                              # "skipdeploy" or "hf"
    run: Callable[[list[list[int]]], Run]
    export: str = "float32"
    schedule: LayerSchedule | None = None
    target: float | None = None
    manifest: Manifest | None = None
    runs: dict[int, list[Run]] = field(default_factory=dict)


def _skipdeploy_runner(runtime, schedule: LayerSchedule, new_tokens: int) -> Callable[[list[list[int]]], Run]:
    def run(prompts: list[list[int]]) -> Run:
        marks: list[float] = []
        start = time.perf_counter()
        steps = runtime.stream(prompts, new_tokens, schedule, eos_token_id=None)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result = done.value
                break
            marks.append(time.perf_counter())
        return Run(marks[0] - start, list(np.diff(marks)), result.tokens)
    return run


def _hf_runner(model, new_tokens: int, pad_token_id: int) -> Callable[[list[list[int]]], Run]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Time stamps of every ``put``: the prompt first, then one per generated token."""

        def __init__(self) -> None:
            self.marks: list[float] = []

        def put(self, value) -> None:
            self.marks.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(prompts: list[list[int]]) -> Run:
        ids = torch.tensor(prompts, dtype=torch.long)
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
                                 streamer=clock)
        marks = clock.marks[1:]  # the first put is the prompt
        return Run(marks[0] - start, list(np.diff(marks)), out[:, ids.shape[1]:].tolist())
    return run


def _load_hf(checkpoint: str | None, manifest: Manifest, threads: int,
             log: Callable[[str], None]):
    """The transformers model of the export's checkpoint, or None (with the reason logged)."""
    source = checkpoint or manifest.source
    if not source:
        log("Hugging Face baseline skipped: the manifest names no checkpoint (pass --checkpoint)")
        return None
    try:
        import torch
        from transformers import OPTForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        log("Hugging Face baseline skipped: transformers/torch are not installed")
        return None
    if checkpoint is None and not Path(source).expanduser().is_dir():
        log(f"Hugging Face baseline: {source} is not a local directory; trying the hub "
            "(pass --checkpoint DIR to use a local copy)")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    try:
        return OPTForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    except Exception as exc:  # a missing or unreachable checkpoint must not end the benchmark
        log(f"Hugging Face baseline skipped: cannot load {source} ({str(exc).splitlines()[0] if str(exc) else exc})")
        return None


# -- the benchmark ----------------------------------------------------------------------------------
def prompts_for(batch: int, prompt_length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random prompts of token ids above OPT's specials (0..3), one seed per batch size."""
    rng = np.random.default_rng(seed + 1000 * batch)
    return rng.integers(4, max(5, min(vocab_size, 50_000)), size=(batch, prompt_length)).tolist()


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


def _paired_median(a: list[Run], b: list[Run], batch: int) -> float | None:
    """Median over rounds of tokens/s(a) / tokens/s(b): each round's runs were back to back."""
    ratios = [x.tokens_per_s(batch) / y.tokens_per_s(batch) for x, y in zip(a, b) if y.tokens_per_s(batch) > 0]
    return float(statistics.median(ratios)) if ratios else None


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """Token agreement of ``other`` with ``reference`` (same prompts): the fraction of positions
    equal, the mean fraction of each row before the first difference, and rows fully equal."""
    equal, prefix, rows = [], [], 0
    for ref, got in zip(reference, other):
        n = min(len(ref), len(got))
        same = [a == b for a, b in zip(ref[:n], got[:n])]
        equal.append(float(np.mean(same)) if n else 1.0)
        first = next((i for i, s in enumerate(same) if not s), n)
        prefix.append(first / n if n else 1.0)
        rows += int(all(same) and len(ref) == len(got))
    return {"positions_equal": float(np.mean(equal)), "prefix_before_first_difference": float(np.mean(prefix)),
            "rows_equal": rows / max(1, len(reference))}


def memory_probe(directory: str, batch: int, prompt_length: int, new_tokens: int, threads: int | None,
                 seed: int) -> dict[str, int]:
    """Peak resident memory of loading ``directory`` and one full-schedule ``generate`` (run this
    in a fresh process: the peak is the process's)."""
    from .runtime import cache_bytes, load, plan_capacities

    runtime = load(directory, verify=False, threads=threads)
    spec = runtime.spec
    full = Schedule.full(spec.num_layers)
    runtime.generate(prompts_for(batch, prompt_length, spec.vocab_size, seed), new_tokens, full, eos_token_id=None)
    peak = _peak_rss()
    itemsize = 2 if runtime.manifest.dtype == "float16" else 4
    kv = cache_bytes(plan_capacities(full, prompt_length, new_tokens), batch, spec.num_heads, spec.head_dim, itemsize)
    return {"peak_rss_bytes": int(peak), "weights_bytes": weight_bytes(runtime.manifest), "kv_cache_bytes": int(kv)}


def _peak_rss() -> int:
    """This process's peak resident set in bytes. Linux: VmHWM, which exec resets (ru_maxrss
    does not: a child started from a big process reports the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _memory_in_subprocess(directory: Path, batch: int, prompt_length: int, new_tokens: int,
                          threads: int | None, seed: int) -> dict[str, Any]:
    args = json.dumps([str(directory), batch, prompt_length, new_tokens, threads, seed])
    code = ("import json, sys; from skipdeploy.bench import memory_probe; "
            "print(json.dumps(memory_probe(*json.loads(sys.argv[1]))))")
    root = str(Path(__file__).resolve().parent.parent)  # import this skipdeploy, whatever the cwd holds
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=1800,
                          cwd=root, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory probe failed: {tail}"}
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["budget_bytes"] = data["weights_bytes"] + data["kv_cache_bytes"] + MEMORY_HEADROOM
    data["within_budget"] = data["peak_rss_bytes"] <= data["budget_bytes"]
    return data


def _environment(threads: int) -> dict[str, Any]:
    import onnxruntime

    env: dict[str, Any] = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                           "numpy": np.__version__, "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads,
                           "platform": platform.platform()}
    for name in ("torch", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            env[name] = getattr(module, "__version__", "?")
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def run_bench(directory: str | os.PathLike, *, batch_sizes: Sequence[int] = (1, 8),
              target_speedups: Sequence[float] = (2, 3, 5), prompt_length: int = 32, new_tokens: int = 64,
              repeats: int = 5, warmup: int = 1, decay_tokens: int | None = None, threads: int | None = None,
              hf: bool = True, checkpoint: str | None = None, quantize: str | None = None,
              int8_export: str | os.PathLike | None = None, memory: bool = True, bandwidth: bool = True,
              seed: int = 0, progress: bool | None = None, probe_bytes: int = PROBE_BYTES,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return its results (the structure ``--json`` writes)."""
    from .runtime import load

    log = log or (lambda msg: print(msg, file=sys.stderr))
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be integers >= 1 (got {batch_sizes})")
    for name, value, low in (("prompt length", prompt_length, 1), ("new tokens", new_tokens, 2),
                             ("repeats", repeats, 1), ("warm-up runs", warmup, 0)):
        if value < low:
            raise InputError(f"{name} must be >= {low} (got {value})")
    if quantize not in (None, "int8"):
        raise InputError(f"--quantize takes int8 (got {quantize!r})")
    threads = threads or os.cpu_count() or 1
    runtime = load(directory, threads=threads)
    manifest, spec = runtime.manifest, runtime.spec
    if manifest.raw.get("quantization"):
        raise InputError(f"{directory} is a quantized export; bench the float32 export and add --quantize int8")
    L = spec.num_layers
    decay = decay_tokens or new_tokens
    schedules: list[tuple[str, LayerSchedule, float | None]] = [("full", Schedule.full(L), None)]
    for k in target_speedups:
        if k <= 1:
            raise InputError(f"target speedups must be > 1 (got {k:g}); the full schedule is always measured")
        schedules.append((f"skip {k:g}x", Schedule.target_speedup(L, float(k), decay_tokens=decay), float(k)))

    contenders = [Contender(label, "skipdeploy", _skipdeploy_runner(runtime, sched, new_tokens), schedule=sched,
                            target=k, manifest=manifest) for label, sched, k in schedules]
    temp_dir = None
    int8_dir = None
    if quantize:
        int8_dir, temp_dir = _int8_export(manifest, int8_export, log)
        q_runtime = load(int8_dir, threads=threads)
        contenders.append(Contender("int8 full", "skipdeploy", _skipdeploy_runner(q_runtime, Schedule.full(L), new_tokens),
                                    export="int8", schedule=Schedule.full(L), manifest=q_runtime.manifest))
    hf_model = _load_hf(checkpoint, manifest, threads, log) if hf else None
    if hf_model is not None:
        pad = spec.pad_token_id if spec.pad_token_id is not None else (spec.eos_token_id or 0)
        contenders.append(Contender("hf generate", "hf", _hf_runner(hf_model, new_tokens, pad)))

    load_before = _load_average()
    probe = bandwidth_probe(threads, probe_bytes) if bandwidth else None
    bandwidths: dict[int, list[float]] = {}  # batch -> one sample after each round

    def sample_bandwidth(batch: int) -> None:
        bandwidths.setdefault(batch, []).append(probe(3))

    try:
        _measure(contenders, batch_sizes, prompt_length, new_tokens, spec.vocab_size, repeats, warmup, seed, progress,
                 between_rounds=sample_bandwidth if probe else None)
        probe = None  # frees its 256 MiB before the memory probes
        mem = {}
        if memory:
            for label, path in [("float32", manifest.directory)] + ([("int8", int8_dir)] if int8_dir else []):
                for batch in batch_sizes:
                    mem[f"{label}/{batch}"] = {"export": label, "batch": batch, **_memory_in_subprocess(
                        Path(path), batch, prompt_length, new_tokens, threads, seed)}
        rows = _rows(contenders, batch_sizes, spec, prompt_length, new_tokens, bandwidths)
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    load_after = _load_average()
    costs = cost_model(spec)
    results = {
        "export": str(manifest.directory), "model": {"layers": L, "hidden": spec.hidden_size, "ffn": spec.ffn_dim,
                                                     "vocab": spec.vocab_size, "dtype": manifest.dtype},
        "config": {"batch_sizes": batch_sizes, "target_speedups": [float(k) for k in target_speedups],
                   "prompt_length": prompt_length, "new_tokens": new_tokens, "decay_tokens": decay,
                   "repeats": repeats, "warmup": warmup, "threads": threads, "seed": seed,
                   "quantize": quantize, "hf_baseline": hf_model is not None},
        "environment": {**_environment(threads), "load_average_before": load_before, "load_average_after": load_after},
        "cost_model": {**costs, "head_in_layers": costs["head"] / costs["layer"]},
        "bandwidth_bytes_per_s": {str(b): v for b, v in bandwidths.items()},
        "rows": rows,
        "memory": list(mem.values()),
        "agreement": _agreements(contenders, batch_sizes),
    }
    return results


def _int8_export(manifest: Manifest, target: str | os.PathLike | None,
                 log: Callable[[str], None]) -> tuple[Path, Path | None]:
    """An int8 export of ``manifest``: ``target`` if it already holds one, else a new one there
    (kept) or in a temporary directory (removed after the benchmark)."""
    from .manifest import MANIFEST, read_manifest

    if target is not None and (Path(target) / MANIFEST).is_file():
        made = read_manifest(target, verify=False)
        if (made.quantization or {}).get("weights") != "int8":
            raise InputError(f"{target} is not an int8 export; pass another --int8-export")
        from .exporter.quantize import is_quantized_from

        if not is_quantized_from(made, manifest):
            raise InputError(f"{target} was quantized from another export than {manifest.directory} (or an "
                             "earlier version of it); remove it or pass another --int8-export")
        return Path(target), None
    try:
        from .exporter.quantize import quantize_export
    except ImportError as exc:
        raise SkipDeployError(f"--quantize needs onnx ({exc}); pip install 'skipdeploy[export]'") from None
    temp = None
    if target is None:
        temp = Path(tempfile.mkdtemp(prefix="skipdeploy-bench-int8-"))
        target = temp / "int8"
    log(f"quantizing {manifest.directory} to int8 weights in {target}")
    quantize_export(manifest.directory, target, progress=False, log=log)
    return Path(target), temp


def _measure(contenders: list[Contender], batch_sizes: list[int], prompt_length: int, new_tokens: int,
             vocab_size: int, repeats: int, warmup: int, seed: int, progress: bool | None,
             between_rounds: Callable[[int], None] | None = None) -> None:
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


def _rows(contenders: list[Contender], batch_sizes: list[int], spec: ModelSpec, prompt_length: int,
          new_tokens: int, bandwidths: dict[int, list[float]]) -> list[dict[str, Any]]:
    rows = []
    full = next(c for c in contenders if c.label == "full")
    hf = next((c for c in contenders if c.kind == "hf"), None)
    for batch in batch_sizes:
        for c in contenders:
            runs = c.runs[batch]
            times = [t for run in runs for t in run.token_times]
            row: dict[str, Any] = {
                "batch": batch, "contender": c.label, "kind": c.kind, "export": c.export,
                "schedule": c.schedule.to_dict() if c.schedule is not None else None, "target_speedup": c.target,
                "layers_per_token": (float(np.mean([c.schedule.count(s) for s in range(new_tokens - 1)]))
                                     if c.schedule is not None else float(spec.num_layers)),
                "ttft_ms": 1e3 * statistics.median(run.ttft for run in runs),
                "ms_per_token": {"median": 1e3 * statistics.median(times), "p90": 1e3 * _percentile(times, 90),
                                 "p99": 1e3 * _percentile(times, 99), "mean": 1e3 * float(np.mean(times))},
                "tokens_per_s": statistics.median(run.tokens_per_s(batch) for run in runs),
                "runs": [{"ttft_ms": 1e3 * run.ttft, "decode_ms": 1e3 * run.decode_seconds,
                          "tokens_per_s": run.tokens_per_s(batch)} for run in runs],
                "speedup_vs_full": _paired_median(runs, full.runs[batch], batch) if c.kind == "skipdeploy" else None,
                "ideal_speedup": None, "ideal_speedup_layers": None, "fraction_of_ideal": None,
                "vs_hf": _paired_median(runs, hf.runs[batch], batch) if hf is not None else None,
                "bytes_per_token": None, "memory_floor_ms_per_token": None, "fraction_of_floor": None,
            }
            if c.kind == "skipdeploy" and c.export == "float32":
                row["ideal_speedup"] = ideal_speedup(spec, c.schedule, prompt_length, new_tokens)
                row["ideal_speedup_layers"] = spec.num_layers / row["layers_per_token"]
                if row["speedup_vs_full"] is not None:
                    row["fraction_of_ideal"] = row["speedup_vs_full"] / row["ideal_speedup"]
            if c.kind == "skipdeploy":
                row["bytes_per_token"] = bytes_per_token(c.manifest, c.schedule, batch, prompt_length, new_tokens)
                samples = bandwidths.get(batch)
                if samples:
                    row["memory_floor_ms_per_token"] = 1e3 * row["bytes_per_token"] / statistics.median(samples)
                    # Each round against the bandwidth measured right after it.
                    row["fraction_of_floor"] = statistics.median(
                        (row["bytes_per_token"] / bw) / (run.decode_seconds / len(run.token_times))
                        for run, bw in zip(runs, samples))
            rows.append(row)
    return rows


def _agreements(contenders: list[Contender], batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Tokens of the int8 export and of Hugging Face against the float32 full schedule (greedy,
    same prompts; the last timed run of each)."""
    full = next(c for c in contenders if c.label == "full")
    out = []
    for c in contenders:
        if c.label in ("int8 full", "hf generate"):
            for batch in batch_sizes:
                out.append({"contender": c.label, "reference": "full", "batch": batch,
                            **agreement(full.runs[batch][-1].tokens, c.runs[batch][-1].tokens)})
    return out


# -- output ----------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(results: dict[str, Any]) -> str:
    cfg, env = results["config"], results["environment"]
    bw = [x for samples in (results.get("bandwidth_bytes_per_s") or {}).values() for x in samples]
    lines = [
        f"skipdeploy bench {results['export']}: {results['model']['layers']} layers, hidden "
        f"{results['model']['hidden']}, vocab {results['model']['vocab']}, {results['model']['dtype']}; "
        f"{env['threads']} threads on {env['cpu']}",
        f"prompt {cfg['prompt_length']} tokens, {cfg['new_tokens']} new tokens, batch sizes "
        f"{','.join(map(str, cfg['batch_sizes']))}; {cfg['repeats']} alternated rounds after {cfg['warmup']} warm-up"
        + (f"; weights stream at {min(bw) / 1e9:.0f}-{max(bw) / 1e9:.0f} GB/s (probe after each round)" if bw else ""),
        "",
        f"{'batch':>5}  {'contender':<12} {'layers':>6} {'TTFT':>7} {'ms/token':>8} {'p90':>6} {'p99':>6} "
        f"{'tok/s':>7} {'speedup':>7} {'ideal':>6} {'of ideal':>8} {'vs HF':>6} {'floor':>6} {'of floor':>8}",
    ]
    for row in results["rows"]:
        ms = row["ms_per_token"]
        lines.append(
            f"{row['batch']:>5}  {row['contender']:<12} {row['layers_per_token']:>6.2f} {row['ttft_ms']:>7.1f} "
            f"{ms['median']:>8.2f} {ms['p90']:>6.2f} {ms['p99']:>6.2f} {row['tokens_per_s']:>7.1f} "
            f"{_fmt(row['speedup_vs_full'], '.2f', 'x'):>7} {_fmt(row['ideal_speedup'], '.2f', 'x'):>6} "
            f"{_fmt(None if row['fraction_of_ideal'] is None else 100 * row['fraction_of_ideal'], '.0f', '%'):>8} "
            f"{_fmt(row['vs_hf'], '.2f', 'x'):>6} {_fmt(row['memory_floor_ms_per_token'], '.2f'):>6} "
            f"{_fmt(None if row['fraction_of_floor'] is None else 100 * row['fraction_of_floor'], '.0f', '%'):>8}")
    lines.append("")
    lines.append("TTFT, ms/token (median), p90, p99 and floor in ms; tok/s = output tokens/s after warm-up; speedup "
                 "against the full schedule and vs HF are medians of per-round ratios; ideal = cost model "
                 "(multiply-adds); floor = weight + KV bytes per token / probe bandwidth (median), of floor = "
                 "floor / time per token, per round against that round's probe (100% = bandwidth-bound).")
    for a in results.get("agreement", []):
        lines.append(f"agreement {a['contender']} vs {a['reference']}, batch {a['batch']}: "
                     f"{100 * a['positions_equal']:.1f}% of tokens equal, {100 * a['rows_equal']:.0f}% of rows "
                     f"identical, first difference after {100 * a['prefix_before_first_difference']:.0f}% of a row on average")
    for m in results.get("memory", []):
        if "error" in m:
            lines.append(f"memory {m['export']}, batch {m['batch']}: {m['error']}")
            continue
        lines.append(f"memory {m['export']}, batch {m['batch']}: peak RSS {m['peak_rss_bytes'] / 1e6:.0f} MB; weights "
                     f"{m['weights_bytes'] / 1e6:.0f} MB + KV cache {m['kv_cache_bytes'] / 1e6:.1f} MB + "
                     f"{MEMORY_HEADROOM / 1e6:.0f} MB = {m['budget_bytes'] / 1e6:.0f} MB budget: "
                     f"{'within' if m['within_budget'] else 'OVER'}")
    load = [env.get("load_average_before"), env.get("load_average_after")]
    cores = env.get("cores") or 1
    # The benchmark's own threads add up to `threads` to the load average after it.
    own = [0, env.get("threads") or cores]
    if any(v is not None and v > base + 0.5 * cores for v, base in zip(load, own)):
        lines.append(f"note: load average {_fmt(load[0], '.1f')} before, {_fmt(load[1], '.1f')} after on "
                     f"{env.get('cores')} cores: other work shared the machine; trust the ratios more than the times")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | os.PathLike) -> None:
    """PNG: ms/token per schedule and batch size (Hugging Face and the memory floor as lines), and
    the measured speedup next to the ideal one."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SkipDeployError("--plot needs matplotlib: pip install 'skipdeploy[plot]'") from None
    rows = results["rows"]
    batches = results["config"]["batch_sizes"]
    labels = [r["contender"] for r in rows if r["batch"] == batches[0] and r["kind"] == "skipdeploy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(batches)
    xs = np.arange(len(labels))
    for i, batch in enumerate(batches):
        mine = {r["contender"]: r for r in rows if r["batch"] == batch}
        ms = [mine[label]["ms_per_token"]["median"] for label in labels]
        bars = left.bar(xs + i * width, ms, width, label=f"batch {batch}")
        color = bars[0].get_facecolor()
        hf = mine.get("hf generate")
        if hf is not None:
            left.axhline(hf["ms_per_token"]["median"], color=color, linestyle="--", linewidth=1,
                         label=f"HF generate, batch {batch}")
        floors = [mine[label]["memory_floor_ms_per_token"] for label in labels]
        if all(f is not None for f in floors):
            left.scatter(xs + i * width, floors, marker="_", s=300, color="black",
                         label="memory floor" if i == 0 else None, zorder=3)
        sched = [label for label in labels if mine[label]["ideal_speedup"] is not None]
        sx = [labels.index(label) for label in sched]
        right.plot(sx, [mine[label]["speedup_vs_full"] for label in sched], "o-", color=color,
                   label=f"measured, batch {batch}")
        right.plot(sx, [mine[label]["ideal_speedup"] for label in sched], "s--", color=color, alpha=0.6,
                   label=f"ideal (cost model), batch {batch}")
    sched = [label for label in labels if next(r for r in rows if r["contender"] == label)["ideal_speedup"] is not None]
    right.plot(range(len(sched)), [next(r for r in rows if r["contender"] == label)["ideal_speedup_layers"]
                                   for label in sched], ":", color="gray", label="layer-count ratio")
    left.set(xticks=xs + width * (len(batches) - 1) / 2, xticklabels=labels, ylabel="ms per output token",
             title="decode time per token (median)")
    left.legend(fontsize=7)
    right.set(xticks=range(len(sched)), xticklabels=sched, ylabel="speedup over the full schedule",
              title="SkipDecode speedup: measured and ideal")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _floats(value: str, name: str, kind=float) -> list:
    try:
        return [kind(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise InputError(f"{name} takes comma-separated numbers (got {value!r})") from None


def bench_command():
    """The click command (built lazily so that importing this module needs no click)."""
    import click

    @click.command("bench")
    @click.argument("directory", type=click.Path(path_type=Path))
    @click.option("--batch-sizes", default="1,8", show_default=True, metavar="1,8", help="Batch sizes to measure.")
    @click.option("--target-speedups", default="2,3,5", show_default=True, metavar="2,3,5",
                  help="SkipDecode schedules to measure, as target ideal speedups (Schedule.target_speedup); "
                       "the full schedule is always measured. Empty for none.")
    @click.option("--prompt-length", type=int, default=32, show_default=True, help="Prompt tokens per row (random ids).")
    @click.option("--new-tokens", type=int, default=64, show_default=True, help="Tokens generated per row.")
    @click.option("--repeats", type=int, default=5, show_default=True,
                  help="Timed rounds; each round runs every contender once, in rotating order.")
    @click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs per contender first.")
    @click.option("--decay-tokens", type=int, help="Decay length of the skip schedules [default: --new-tokens].")
    @click.option("--threads", type=int, help="Threads for onnxruntime and for PyTorch [default: all cores].")
    @click.option("--quantize", type=click.Choice(["int8"]),
                  help="Also measure the int8-weight version of the export (full schedule) and its token "
                       "agreement with float32; made in a temporary directory unless --int8-export names one.")
    @click.option("--int8-export", type=click.Path(path_type=Path),
                  help="Where the int8 export is (reused) or is written (kept).")
    @click.option("--checkpoint", help="Checkpoint for the Hugging Face baseline [default: the export's source].")
    @click.option("--no-hf", is_flag=True, help="Skip the Hugging Face generate baseline.")
    @click.option("--no-memory", is_flag=True, help="Skip the peak-memory probe (a fresh process per batch size).")
    @click.option("--no-bandwidth", is_flag=True, help="Skip the bandwidth probe (and the memory floor).")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompts.")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                  help="Write the results as JSON (per run, per row, environment).")
    @click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
                  help="Write a PNG: ms/token per schedule, and measured against ideal speedup.")
    def bench(directory: Path, batch_sizes: str, target_speedups: str, prompt_length: int, new_tokens: int,
              repeats: int, warmup: int, decay_tokens: int | None, threads: int | None, quantize: str | None,
              int8_export: Path | None, checkpoint: str | None, no_hf: bool, no_memory: bool, no_bandwidth: bool,
              seed: int, json_path: Path | None, plot_path: Path | None) -> None:
        """Measure decode speed per batch size and schedule, against Hugging Face generate.

        Times to first token, time per output token (median, P90, P99), output tokens/s, layers
        per token, the speedup of each SkipDecode schedule over the full one next to its ideal
        (a multiply-add cost model: embed + layers run + head), and the same checkpoint in
        Hugging Face generate with the same threads. Contenders alternate run by run, so
        machine drift hits all alike. Prompts are random token ids; EOS is ignored so every
        row generates --new-tokens tokens.

        \b
        Example:
          skipdeploy bench opt-125m-sd --batch-sizes 1,8 --target-speedups 2,3,5 \\
              --quantize int8 --json bench.json --plot bench.png
        """
        results = run_bench(directory, batch_sizes=_floats(batch_sizes, "--batch-sizes", int),
                            target_speedups=_floats(target_speedups, "--target-speedups"),
                            prompt_length=prompt_length, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                            decay_tokens=decay_tokens, threads=threads, hf=not no_hf, checkpoint=checkpoint,
                            quantize=quantize, int8_export=int8_export, memory=not no_memory,
                            bandwidth=not no_bandwidth, seed=seed, log=lambda m: click.echo(m, err=True))
        click.echo(format_table(results))
        if json_path:
            json_path.write_text(json.dumps(results, indent=1) + "\n")
            click.echo(f"results written to {json_path}")
        if plot_path:
            plot(results, plot_path)
            click.echo(f"plot written to {plot_path}")

    return bench


__all__ = ["agreement", "bandwidth_probe", "bench_command", "cost_model", "format_table", "ideal_speedup",
           "memory_probe", "plot", "run_bench", "step_macs"]
