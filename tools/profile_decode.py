"""Where a decode step's time goes, against the memory-bandwidth floor (issue 18, "toward the floor").

    python tools/profile_decode.py EXPORT [--batch 1] [--past 64] [--steps 40] [--threads 2]

Three views of one decode step of the full schedule (every layer), on the export's own sessions:
1. the step, timed whole, and its parts timed one call at a time (embed, each layer, head): what
   is left is Python between the calls;
2. one layer graph with onnxruntime's profiler: the kernels' own time by operator type, and the
   Run() time around them (session overhead: binding, allocation, dispatch of every node);
3. the bytes a step must read (weights of every layer and the head, the KV cache) over the
   bandwidth measured in the same run: the floor each part is held against.
Prints a table; ``--json`` prints the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--past", type=int, default=64, help="cached positions before the step")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    import skipdeploy
    from skipdeploy.bench.cost import bytes_per_token, graph_bytes
    from skipdeploy.bench.probes import bandwidth_probe
    from skipdeploy.engines.onnxruntime_engine import session_options
    from skipdeploy.schedule import Schedule

    runtime = skipdeploy.load(args.export, threads=args.threads)
    manifest, spec, engine = runtime.manifest, runtime.spec, runtime.engine
    L, B = spec.num_layers, args.batch
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, min(spec.vocab_size, 50_000), size=(B, args.past)).tolist()

    # 1. Whole steps, with the engine's calls inside them timed one by one.
    parts: dict[str, float] = defaultdict(float)

    def timed(name, call):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return call(*a, **k)
            finally:
                parts[name] += time.perf_counter() - t0
        return wrapper

    for name in ("embed", "layer", "head"):
        setattr(engine, name, timed(name, getattr(engine, name)))
    gen = runtime.generator(prompt, args.steps + 2, Schedule.full(L), eos_token_id=None)
    gen.generate_next_token()  # the prefill
    parts.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        gen.generate_next_token()
    total = time.perf_counter() - start
    past = gen.batch.ids.shape[1] + gen._forwards - 1
    gen.close()
    step_ms = 1e3 * total / args.steps
    embed_ms, head_ms = (1e3 * parts[n] / args.steps for n in ("embed", "head"))
    layer_ms = 1e3 * parts["layer"] / args.steps / L

    # 2. One layer graph under onnxruntime's profiler.
    options = session_options(args.threads, shared_arena=False)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "layer")
    session = ort.InferenceSession(str(manifest.layer_path(0)), options, providers=["CPUExecutionProvider"])
    feeds = {"hidden": rng.standard_normal((B, 1, spec.hidden_size)).astype(np.float32),
             "past_key": rng.standard_normal((past, B, spec.kv_heads, spec.head_dim)).astype(np.float32),
             "past_value": rng.standard_normal((past, B, spec.kv_heads, spec.head_dim)).astype(np.float32),
             "attention_bias": np.zeros((B, past + 1), np.float32)}
    if manifest.layers_take_positions:
        feeds["position_ids"] = np.full((B, 1), past, np.int64)
    for _ in range(args.steps):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs = [e["dur"] for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    kernels: dict[str, list[float]] = defaultdict(list)
    nodes_per_run = 0
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            kernels[e["args"]["op_name"]].append(e["dur"])
    runs = runs[2:]  # the first runs allocate
    n_runs = len(runs) + 2
    nodes_per_run = sum(len(v) for v in kernels.values()) / max(1, n_runs)
    run_us = statistics.median(runs) if runs else float("nan")
    kernel_us = {op: sum(v) / n_runs for op, v in kernels.items()}
    kernel_total = sum(kernel_us.values())

    # 3. Bytes and bandwidth.
    probe = bandwidth_probe(args.threads, 256 << 20)
    bandwidth = statistics.median(probe(3) for _ in range(3))
    step_bytes = bytes_per_token(manifest, Schedule.full(L), B, args.past, 2)
    head_bytes = graph_bytes(manifest)["head"]
    floor_ms = 1e3 * step_bytes / bandwidth
    result = {
        "export": str(manifest.directory), "batch": B, "past": past, "threads": args.threads,
        "bandwidth_GBps": bandwidth / 1e9, "step_ms": step_ms, "floor_ms": floor_ms, "of_floor": floor_ms / step_ms,
        "embed_ms": embed_ms, "layer_ms": layer_ms, "layers_ms": L * layer_ms, "head_ms": head_ms,
        "head_floor_ms": 1e3 * head_bytes / bandwidth,
        "python_between_calls_ms": step_ms - embed_ms - L * layer_ms - head_ms,
        "layer_run_us": run_us, "layer_kernels_us": kernel_total, "layer_nodes": nodes_per_run,
        "layer_overhead_us": run_us - kernel_total,
        "layer_kernels_by_op_us": dict(sorted(kernel_us.items(), key=lambda kv: -kv[1])),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{manifest.directory}: batch {B}, {past} cached positions, {args.threads} threads, "
          f"bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"decode step (full schedule): {step_ms:.2f} ms; floor {floor_ms:.2f} ms ({100 * floor_ms / step_ms:.0f}%)")
    print(f"  embed {embed_ms:.3f} ms, {L} layers x {layer_ms:.3f} ms = {L * layer_ms:.2f} ms, head {head_ms:.2f} ms "
          f"(its weights alone: {result['head_floor_ms']:.2f} ms at this bandwidth), Python between calls "
          f"{result['python_between_calls_ms']:.2f} ms")
    print(f"one layer graph: Run() {run_us:.0f} us, its {nodes_per_run:.0f} kernels {kernel_total:.0f} us, "
          f"around them {run_us - kernel_total:.0f} us")
    for op, us in result["layer_kernels_by_op_us"].items():
        print(f"    {op:<28} {us:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
