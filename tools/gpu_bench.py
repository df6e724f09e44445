"""GPU benchmark: skipdeploy's GPU backends against Hugging Face ``generate`` on the same GPU, same run.

Makes a random opt-1.3b-shaped checkpoint (24 layers, hidden 2048; no download, no tokenizer),
exports it in float16 (graph checks skipped: the test suite checks the graphs), and times, at
batch 1 and 32, greedy decoding of N new tokens after a P-token prompt:

- ``hf``: transformers ``OPTForCausalLM`` in float16 on the GPU, ``generate`` (full model);
- ``torch-graphs``: skipdeploy's torch backend on CUDA (fp16, static cache, one CUDA graph per
  layer set), with the full schedule and SkipDecode schedules of layer speedup 2x and 3x;
- ``torch-eager``: the same backend without CUDA graphs (dynamic path), full schedule;
- ``ort-cuda`` / ``tensorrt``: when onnxruntime's CUDA provider / TensorRT are usable here.

ms/token is the wall time of a whole ``generate`` call (prefill included) divided by N, median
over repeats after a warm-up, contenders alternated within each repeat. EOS is disabled so that
every contender produces exactly N tokens. Prints a table; ``--json FILE`` writes the rows.

    PYTHONPATH=. python tools/gpu_bench.py [--new-tokens 64] [--prompt 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

START = time.perf_counter()
CHECK_TOLERANCE = 5e-2  # relative to max(1, |logits|); fp16 against fp16 transformers measures ~1e-3


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where to write the checkpoint and export [default: a temp dir]")
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length (random token ids)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; optional contenders are dropped past it")
    ap.add_argument("--json", type=Path, help="write the result rows here")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a float32 smoke test of this script (use a small --shape)")
    args = ap.parse_args()

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible to torch; nothing to measure", file=sys.stderr)
        return 1
    dtype = "float16" if cuda else "float32"
    import skipdeploy
    from skipdeploy import Schedule
    from skipdeploy.random_checkpoint import make_checkpoint

    gpu = torch.cuda.get_device_name(0) if cuda else "CPU"
    log(f"GPU {gpu}; torch {torch.__version__}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="skipdeploy-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, args.shape, seed=0, tokenizer=False)
    log(f"random {args.shape} checkpoint in {ckpt}")
    export_dir = work / f"export-{dtype}"
    N, P = args.new_tokens, args.prompt
    batches = [int(b) for b in args.batches.split(",")]
    if not (export_dir / "manifest.json").is_file():
        skipdeploy.export(ckpt, export_dir, dtype=dtype, check_graphs=False, max_length=P + N + 8,
                          max_batch=max(batches), force=True, progress=False, log=log)
    log(f"{dtype} export in {export_dir}")

    from skipdeploy.manifest import read_manifest

    spec = read_manifest(export_dir, verify=False).model  # loading a runtime just for this took 18 s
    L, vocab = spec.num_layers, spec.vocab_size
    schedules = {"full": Schedule.full(L)}
    for k in (2.0, 3.0):
        try:
            schedules[f"{k:g}x"] = Schedule.target_speedup(L, k, decay_tokens=N)
        except skipdeploy.SkipDeployError as exc:
            log(f"schedule {k:g}x: skipped ({exc})")
    for name, s in schedules.items():
        log(f"schedule {name}: {s.describe()}; layer speedup {s.layer_speedup(N):.2f}x over {N} steps")

    rng = np.random.default_rng(0)
    prompts = {b: [[2, *rng.integers(4, vocab, P - 1).tolist()] for _ in range(b)] for b in batches}

    contenders: list[tuple[str, str, callable]] = []  # (backend, schedule, fn(batch) -> seconds)

    # Hugging Face generate, fp16, same GPU.
    from transformers import OPTForCausalLM

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    hf = OPTForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).to(args.device).eval()
    log(f"transformers model loaded ({getattr(hf.config, '_attn_implementation', '?')} attention)")

    @torch.no_grad()
    def run_hf(batch: int) -> float:
        ids = torch.tensor(prompts[batch], device=args.device)
        sync()
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                          do_sample=False, pad_token_id=1, eos_token_id=None)
        sync()
        assert out.shape[1] == P + N
        return time.perf_counter() - t

    contenders.append(("hf", "full", run_hf))

    def ours(runtime, sched):
        def run(batch: int) -> float:
            t = time.perf_counter()
            result = runtime.generate(prompts[batch], N, sched, eos_token_id=None)
            seconds = time.perf_counter() - t
            assert all(len(r) == N for r in result.tokens)
            return seconds
        return run

    runtimes = {}
    if cuda:
        runtimes["torch-graphs"] = skipdeploy.load(export_dir, backend="torch", device="cuda", check_files=False)
        log("torch backend loaded (cuda, fp16, CUDA graphs)")
    else:  # the same static-cache decode path, without capture
        runtimes["torch-static"] = skipdeploy.load(export_dir, backend="torch", static_cache=True, check_files=False)
    main_backend = next(iter(runtimes))
    for name, s in schedules.items():
        contenders.append((main_backend, name, ours(runtimes[main_backend], s)))
    runtimes["torch-eager"] = skipdeploy.load(export_dir, backend="torch", device=args.device, cuda_graphs=False,
                                              static_cache=False, check_files=False)
    contenders.append(("torch-eager", "full", ours(runtimes["torch-eager"], schedules["full"])))
    try:
        name = "ort-cuda" if cuda else "ort-cpu"
        runtimes[name] = skipdeploy.load(export_dir, device=args.device, check_files=False)
        log(f"onnxruntime backend loaded ({args.device})")
        for sched_name, s in schedules.items():
            contenders.append((name, sched_name, ours(runtimes[name], s)))
    except skipdeploy.SkipDeployError as exc:
        log(f"onnxruntime {args.device}: skipped ({exc})")
    try:
        import tensorrt  # noqa: F401

        if not cuda:
            log("TensorRT: skipped on cpu")
        elif time.perf_counter() - START < args.budget / 3:
            from skipdeploy.engines.tensorrt_build import build_engines

            build_engines(export_dir, max_batch=max(batches), max_length=P + N + 8, max_prompt=P,
                          opt_batch=min(8, max(batches)), log=log)
            runtimes["tensorrt"] = skipdeploy.load(export_dir, backend="tensorrt", check_files=False)
            for name, s in schedules.items():
                contenders.append(("tensorrt", name, ours(runtimes["tensorrt"], s)))
        else:
            log("TensorRT: skipped (not enough of the time budget left to build engines)")
    except ImportError:
        log("TensorRT: not installed, skipped")
    except skipdeploy.SkipDeployError as exc:
        log(f"TensorRT: skipped ({exc})")

    # Correctness on the GPU, at this shape: first-token logits of every backend against
    # transformers (the prefill), then the decode path (CUDA-graph replay) against the eager
    # backend step by step while their tokens agree. A failure makes the exit status 1.
    failed = []
    with torch.no_grad():
        ids = torch.tensor(prompts[batches[0]], device=args.device)
        want = hf(ids).logits[:, -1].float().cpu().numpy()
    for backend, rt in runtimes.items():
        got = rt.generate(prompts[batches[0]], 1, schedules["full"], output_logits=True, eos_token_id=None).logits[0]
        scale = max(1.0, float(np.abs(want).max()))
        error = float(np.abs(got - want).max()) / scale
        log(f"check {backend}: first-token logits vs transformers {dtype}: max error {error:.3e} of scale {scale:.2f}, "
            f"argmax agree {float(np.mean(got.argmax(-1) == want.argmax(-1))):.2f}")
        if error > CHECK_TOLERANCE:
            failed.append(f"{backend} prefill")
    if main_backend != "torch-eager":
        steps = min(16, N)
        a = runtimes[main_backend].generate(prompts[batches[0]], steps, schedules["full"], output_logits=True,
                                            eos_token_id=None)
        b = runtimes["torch-eager"].generate(prompts[batches[0]], steps, schedules["full"], output_logits=True,
                                             eos_token_id=None)
        worst, compared = 0.0, 0
        for step in range(steps):
            same_so_far = all(ra[:step] == rb[:step] for ra, rb in zip(a.tokens, b.tokens))
            if not same_so_far:
                break
            scale = max(1.0, float(np.abs(b.logits[step]).max()))
            worst, compared = max(worst, float(np.abs(a.logits[step] - b.logits[step]).max()) / scale), step + 1
        log(f"check {main_backend} decode vs torch-eager: max logits error {worst:.3e} over {compared} steps")
        if worst > CHECK_TOLERANCE:
            failed.append(f"{main_backend} decode")

    # Warm-up (captures CUDA graphs), then alternate contenders within each repeat.
    times: dict[tuple[str, str, int], list[float]] = {}
    for batch in batches:
        for backend, sched, fn in contenders:
            fn(batch)
        log(f"warm-up done at batch {batch}")
    for rep in range(args.repeats):
        if rep > 0 and time.perf_counter() - START > args.budget:
            log(f"time budget reached: medians over {rep} repeat(s)")
            break
        for batch in batches:
            for backend, sched, fn in contenders:
                times.setdefault((backend, sched, batch), []).append(fn(batch))
        log(f"repeat {rep + 1}/{args.repeats} done")

    rows = []
    for batch in batches:
        hf_ms = 1e3 * statistics.median(times[("hf", "full", batch)]) / N
        full_ms = {}
        for (backend, sched, b), ts in times.items():
            if b == batch and sched == "full":
                full_ms[backend] = 1e3 * statistics.median(ts) / N
        for (backend, sched, b), ts in times.items():
            if b != batch:
                continue
            ms = 1e3 * statistics.median(ts) / N
            layers = L if sched == "full" else schedules[sched].mean_layers(N - 1)
            rows.append({"batch": batch, "backend": backend, "schedule": sched, "layers_per_token": round(layers, 2),
                         "ms_per_token": round(ms, 3), "tokens_per_s": round(batch * 1e3 / ms, 1),
                         "vs_hf": round(hf_ms / ms, 2), "vs_own_full": round(full_ms.get(backend, ms) / ms, 2),
                         "repeats": len(ts)})
    print()
    repeats = min(len(ts) for ts in times.values())
    print(f"## {args.shape} (random weights), {dtype}, {gpu}: prompt {P}, {N} new tokens, "
          f"ms/token = generate wall time / {N}, median of {repeats}")
    print()
    header = "| batch | backend | schedule | layers/token | ms/token | tokens/s | vs HF | vs own full |"
    print(header)
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['backend']} | {r['schedule']} | {r['layers_per_token']} | {r['ms_per_token']:.2f} "
              f"| {r['tokens_per_s']:.0f} | {r['vs_hf']:.2f}x | {r['vs_own_full']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "shape": args.shape, "prompt": P, "new_tokens": N,
                                         "rows": rows}, indent=2))
    if failed:
        log(f"FAILED correctness checks (error above {CHECK_TOLERANCE:g} of the logits' scale): {', '.join(failed)}")
        return 1
    log("done")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
