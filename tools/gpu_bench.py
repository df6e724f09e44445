"""GPU benchmark: skipdeploy's GPU backends against Hugging Face ``generate`` on the same GPU, same run.

Makes a random checkpoint of a real model's shape (default opt-1.3b; any shape of
skipdeploy/random_checkpoint.py, OPT or Llama-family; no download, no tokenizer) directly in
float16 on the device, exports it in float16 (graph checks skipped: the test suite checks the
graphs), and times, at batch 1 and 32, greedy decoding of N new tokens after a P-token prompt:

- ``hf``: transformers ``AutoModelForCausalLM`` in float16 on the GPU, ``generate`` (full model);
- ``torch-graphs``: skipdeploy's torch backend on CUDA (fp16, static cache, one CUDA graph per
  layer set), with the full schedule and SkipDecode schedules of layer speedup 2x and 3x;
- ``torch-eager``: the same backend without CUDA graphs (dynamic path), full schedule;
- ``ort-cuda`` / ``tensorrt`` (optional): when onnxruntime's CUDA provider / TensorRT are usable
  here, measured after the others, so that they can only add rows; TensorRT's engine build runs
  in a child process bounded by what is left of ``--budget``, or is skipped with a line.

ms/token is the wall time of a whole ``generate`` call (prefill included) divided by N, median
over repeats after a warm-up, contenders alternated within each repeat. EOS is disabled so that
every contender produces exactly N tokens. ``--json FILE`` is rewritten after every step
(tools/gpu_bench_report.py): a run killed at its time limit keeps what it measured. ``--budget``
is this run's soft limit: past it, no new repeat or optional contender starts.

    PYTHONPATH=. python tools/gpu_bench.py [--shape opt-125m] [--new-tokens 64] [--repeats 3] [--json F]
    PYTHONPATH=. python tools/gpu_bench.py --device cpu --shape tiny    # a float32 smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from gpu_bench_report import Results

START = time.perf_counter()
CHECK_TOLERANCE = 5e-2  # relative to max(1, |logits|); fp16 against fp16 transformers measures ~1e-3
OPTIONAL_MIN_S = 30  # an optional contender needs a load, a warm-up and one repeat
TRT_MIN_BUILD_S, TRT_MEASURE_S = 90, 45  # an engine build per graph takes ~1-3 s on an H100 for small shapes


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where to write the checkpoint and export [default: a temp dir]")
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length (random token ids)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; no repeat or optional contender starts "
                    "past it")
    ap.add_argument("--json", type=Path, help="results file, rewritten after every step (shared by runs)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a float32 smoke test of this script (use a small --shape)")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    try:
        import torch
    except ImportError as exc:
        print(f"gpu_bench: torch is not installed here ({exc})", file=sys.stderr)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible to torch; nothing to measure", file=sys.stderr)
        return 1
    from skipdeploy.random_checkpoint import SHAPES

    if args.shape not in SHAPES:
        print(f"gpu_bench: unknown shape {args.shape!r}; known: {', '.join(sorted(SHAPES))}", file=sys.stderr)
        return 1
    cuda = args.device == "cuda"
    results = Results(args.json, log, shape=args.shape, family=SHAPES[args.shape].get("family", "opt"),
                      dtype="float16" if cuda else "float32", device=args.device,
                      gpu=torch.cuda.get_device_name(0) if cuda else "CPU", torch=torch.__version__,
                      prompt=args.prompt, new_tokens=args.new_tokens, budget_s=args.budget)

    def cut(signum, frame):  # `timeout` sends SIGTERM first: say so in the file, then go
        during = f" during {results.current}" if results.current else ""
        results.set(status=f"cut: {signal.Signals(signum).name} at {time.perf_counter() - START:.0f} s{during} "
                           "(the time limit)")
        log("cut off by the time limit; results so far are in the JSON file")
        os._exit(124)

    signal.signal(signal.SIGTERM, cut)
    try:
        return Bench(args, torch, results).run()
    except BaseException as exc:
        results.set(status=f"error: {first_line(exc)}")
        raise


class Bench:
    def __init__(self, args, torch, results: Results):
        self.args, self.torch, self.results = args, torch, results
        self.cuda = args.device == "cuda"
        self.dtype = "float16" if self.cuda else "float32"
        self.N, self.P = args.new_tokens, args.prompt
        self.batches = [int(b) for b in args.batches.split(",")]
        self.failed: list[str] = []

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - START)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    # -- the model ------------------------------------------------------------------------------
    def prepare(self) -> Path:
        import skipdeploy
        from skipdeploy.random_checkpoint import make_checkpoint

        args, torch = self.args, self.torch
        log(f"{self.results.run['gpu']}; torch {torch.__version__}; shape {args.shape}; budget {args.budget:.0f} s")
        work = args.workdir or Path(tempfile.mkdtemp(prefix="skipdeploy-gpu-bench-"))
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / f"checkpoint-{args.shape}"
        with self.results.phase("checkpoint"):
            if not (ckpt / "config.json").is_file():
                # float16 from the start, on the device: an fp32 opt-1.3b built on the CPU took minutes
                try:
                    make_checkpoint(ckpt, args.shape, seed=0, tokenizer=False, dtype="float16", device=args.device)
                except Exception as exc:  # building on the GPU only saves time: never lose the run to it
                    if not self.cuda:
                        raise
                    log(f"building the checkpoint on the GPU failed ({first_line(exc)}); building it on the CPU")
                    make_checkpoint(ckpt, args.shape, seed=0, tokenizer=False, dtype="float16", device="cpu")
                if self.cuda:
                    torch.cuda.empty_cache()
        self.ckpt = ckpt
        export_dir = work / f"export-{args.shape}-{self.dtype}"
        with self.results.phase("export"):
            if not (export_dir / "manifest.json").is_file():
                skipdeploy.export(ckpt, export_dir, dtype=self.dtype, check_graphs=False,
                                  max_length=self.P + self.N + 8, max_batch=max(self.batches), force=True,
                                  progress=False, log=log)
        return export_dir

    def schedules(self, spec) -> dict:
        import skipdeploy
        from skipdeploy import Schedule

        L, N = spec.num_layers, self.N
        schedules = {"full": Schedule.full(L)}
        for k in (2.0, 3.0):
            try:
                schedules[f"{k:g}x"] = Schedule.target_speedup(L, k, decay_tokens=N)
            except skipdeploy.SkipDeployError as exc:
                self.results.skip(f"schedule {k:g}x", str(exc))
        for name, s in schedules.items():
            self.results.layers[name] = L if name == "full" else s.mean_layers(N - 1)
            log(f"schedule {name}: {s.describe()}; layer speedup {s.layer_speedup(N):.2f}x over {N} steps")
        return schedules

    # -- contenders -----------------------------------------------------------------------------
    def run_hf(self, batch: int) -> float:
        torch = self.torch
        ids = torch.tensor(self.prompts[batch], device=self.args.device)
        self.sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.N,
                                   min_new_tokens=self.N, do_sample=False, pad_token_id=self.pad, eos_token_id=None)
        self.sync()
        assert out.shape[1] == self.P + self.N
        return time.perf_counter() - t

    def ours(self, runtime, schedule):
        def run(batch: int) -> float:
            t = time.perf_counter()
            result = runtime.generate(self.prompts[batch], self.N, schedule, eos_token_id=None)
            seconds = time.perf_counter() - t
            assert all(len(r) == self.N for r in result.tokens)
            return seconds
        return run

    def load(self, name: str, export_dir: Path, **options):
        import skipdeploy

        with self.results.phase(f"load {name}"):
            runtime = skipdeploy.load(export_dir, check_files=False, **options)
        log(f"{name} loaded ({options})")
        return runtime

    def build_tensorrt(self, export_dir: Path) -> bool:
        """Engines built in a child process that the budget can stop; False (with a line) when not built."""
        if importlib.util.find_spec("tensorrt") is None:
            self.results.skip("tensorrt", "TensorRT is not installed here")
            return False
        if not self.cuda:
            self.results.skip("tensorrt", "runs on CUDA only")
            return False
        room = self.left() - TRT_MEASURE_S
        if room < TRT_MIN_BUILD_S:
            self.results.skip("tensorrt", f"{max(self.left(), 0):.0f} s left of the budget; building engines and "
                              f"measuring them needs at least {TRT_MIN_BUILD_S + TRT_MEASURE_S} s")
            return False
        options = dict(max_batch=max(self.batches), max_length=self.P + self.N + 8, max_prompt=self.P,
                       opt_batch=min(8, max(self.batches)))
        code = ("import json, sys; from skipdeploy.engines.tensorrt_build import build_engines; "
                "build_engines(sys.argv[1], **json.loads(sys.argv[2]))")
        with self.results.phase("build tensorrt"):
            try:
                proc = subprocess.run([sys.executable, "-c", code, str(export_dir), json.dumps(options)],
                                      capture_output=True, text=True, timeout=room)
            except subprocess.TimeoutExpired:
                self.results.skip("tensorrt", f"engine build cut after {room:.0f} s by the time budget")
                return False
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit status {proc.returncode}"]
            self.results.skip("tensorrt", f"engine build failed: {lines[-1][:300]}")
            return False
        return True

    # -- checks and timing ----------------------------------------------------------------------
    def error(self, what: str, exc: BaseException) -> None:
        """A core contender broke: the run fails, but the other contenders are still measured."""
        traceback.print_exc(file=sys.stdout)  # the log is what comes back from a device run
        self.failed.append(what)
        self.results.set(errors=[*self.results.run["errors"], f"{what}: {first_line(exc)}"])

    def check_prefill(self, runtimes: dict, optional: bool = False) -> None:
        """First-token logits of every backend against transformers (the prefill)."""
        want, full = self.want, self.schedule_set["full"]
        for backend, rt in list(runtimes.items()):
            try:
                got = rt.generate(self.prompts[self.batches[0]], 1, full, output_logits=True,
                                  eos_token_id=None).logits[0]
            except Exception as exc:
                if optional:
                    raise
                self.error(f"{backend} prefill", exc)
                del runtimes[backend]
                continue
            if want is None:
                continue
            scale = max(1.0, float(np.abs(want).max()))
            error = float(np.abs(got - want).max()) / scale
            agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
            log(f"check {backend}: first-token logits vs transformers {self.dtype}: max error {error:.3e} of scale "
                f"{scale:.2f}, argmax agree {agree:.2f}")
            self.results.check(f"{backend} prefill", error, error <= CHECK_TOLERANCE, f"argmax agree {agree:.2f}")
            if error > CHECK_TOLERANCE:
                self.failed.append(f"{backend} prefill")

    def check_decode(self, main_backend: str, runtimes: dict) -> None:
        """The decode path (CUDA-graph replay) against the eager backend, step by step while tokens agree."""
        if main_backend not in runtimes or "torch-eager" not in runtimes:
            return
        steps, full, prompts = min(16, self.N), self.schedule_set["full"], self.prompts[self.batches[0]]
        try:
            a = runtimes[main_backend].generate(prompts, steps, full, output_logits=True, eos_token_id=None)
            b = runtimes["torch-eager"].generate(prompts, steps, full, output_logits=True, eos_token_id=None)
        except Exception as exc:
            self.error(f"{main_backend} decode check", exc)
            return
        worst, compared = 0.0, 0
        for step in range(steps):
            if not all(ra[:step] == rb[:step] for ra, rb in zip(a.tokens, b.tokens)):
                break
            scale = max(1.0, float(np.abs(b.logits[step]).max()))
            worst, compared = max(worst, float(np.abs(a.logits[step] - b.logits[step]).max()) / scale), step + 1
        log(f"check {main_backend} decode vs torch-eager: max logits error {worst:.3e} over {compared} steps")
        self.results.check(f"{main_backend} decode", worst, worst <= CHECK_TOLERANCE, f"{compared} steps compared")
        if worst > CHECK_TOLERANCE:
            self.failed.append(f"{main_backend} decode")

    def measure(self, contenders: list, optional: bool = False) -> None:
        """Warm-up (captures CUDA graphs) of each contender, then repeats that alternate them. A core
        contender that raises is dropped (and fails the run); an optional one's error propagates."""
        live = list(contenders)

        def call(contender, batch: int, phase: str) -> float | None:
            backend, sched, fn = contender
            try:
                with self.results.phase(phase, quiet=True):
                    return fn(batch)
            except Exception as exc:
                if optional:
                    raise
                self.error(f"{backend} {sched} at batch {batch}", exc)
                live.remove(contender)
                return None

        for batch in self.batches:
            for contender in list(live):
                call(contender, batch, f"warm-up {contender[0]}")
        warm = {k: v for k, v in self.results.run["phases"].items() if k.startswith("warm-up")}
        log(f"warm-up (CUDA graph capture included), s so far: {json.dumps(warm)}")
        last = 0.0
        for rep in range(self.args.repeats):
            if rep > 0 and self.left() < last:
                log(f"time budget: {max(self.left(), 0):.0f} s left, a repeat takes {last:.0f} s; "
                    f"medians over {rep} repeat(s)")
                break
            t = time.perf_counter()
            for batch in self.batches:
                for contender in list(live):
                    seconds = call(contender, batch, "rounds")
                    if seconds is not None:
                        self.results.record(contender[0], contender[1], batch, seconds)
            last = time.perf_counter() - t
            log(f"repeat {rep + 1}/{self.args.repeats} done in {last:.1f} s")

    def run(self) -> int:
        torch, args, results = self.torch, self.args, self.results
        export_dir = self.prepare()
        from skipdeploy.errors import SkipDeployError
        from skipdeploy.manifest import read_manifest

        spec = read_manifest(export_dir, verify=False).model  # loading a runtime just for this took 18 s
        self.schedule_set = schedules = self.schedules(spec)
        bos = spec.bos_token_id if spec.bos_token_id is not None else 2
        self.pad = next((t for t in (spec.pad_token_id, spec.eos_token_id) if t is not None), 0)
        rng = np.random.default_rng(0)
        self.prompts = {b: [[bos, *rng.integers(4, spec.vocab_size, self.P - 1).tolist()] for _ in range(b)]
                        for b in self.batches}

        # The core contenders first, measured to the end; one that breaks fails the run but not the others.
        contenders, self.want = [], None
        try:
            from transformers import AutoModelForCausalLM

            with results.phase("load hf"):
                self.hf = AutoModelForCausalLM.from_pretrained(self.ckpt, dtype=getattr(torch, self.dtype))
                self.hf = self.hf.to(args.device).eval()
            log(f"transformers model loaded ({getattr(self.hf.config, '_attn_implementation', '?')} attention)")
            with torch.no_grad():
                ids = torch.tensor(self.prompts[self.batches[0]], device=args.device)
                self.want = self.hf(ids).logits[:, -1].float().cpu().numpy()
            contenders.append(("hf", "full", self.run_hf))
        except Exception as exc:
            self.error("hf", exc)
        main_backend = "torch-graphs" if self.cuda else "torch-static"  # static: the same decode path, no capture
        loads = {main_backend: dict(device="cuda") if self.cuda else dict(static_cache=True),
                 "torch-eager": dict(device=args.device, cuda_graphs=False, static_cache=False)}
        runtimes = {}
        for name, options in loads.items():
            try:
                runtimes[name] = self.load(name, export_dir, backend="torch", **options)
            except Exception as exc:
                self.error(f"load {name}", exc)
        with results.phase("checks"):
            self.check_prefill(runtimes)
            self.check_decode(main_backend, runtimes)
        if main_backend in runtimes:
            contenders += [(main_backend, n, self.ours(runtimes[main_backend], s)) for n, s in schedules.items()]
        if "torch-eager" in runtimes:
            contenders.append(("torch-eager", "full", self.ours(runtimes["torch-eager"], schedules["full"])))
        self.measure(contenders)

        for name in ("ort-cuda" if self.cuda else "ort-cpu", "tensorrt"):
            if self.left() < OPTIONAL_MIN_S:
                results.skip(name, f"{max(self.left(), 0):.0f} s left of the budget")
                continue
            try:
                if name == "tensorrt":
                    if not self.build_tensorrt(export_dir):
                        continue
                    runtime = self.load(name, export_dir, backend="tensorrt")
                else:
                    runtime = self.load(name, export_dir, device=args.device)
                with results.phase("checks"):
                    self.check_prefill({name: runtime}, optional=True)
                self.measure([(name, n, self.ours(runtime, s)) for n, s in schedules.items()], optional=True)
            # RuntimeError: a backstop for libraries that raise it past the backends' own boundary
            except (ImportError, SkipDeployError, RuntimeError) as exc:
                results.skip(name, first_line(exc))
            except Exception as exc:
                self.error(name, exc)

        results.set(status=f"failed: {', '.join(self.failed)}" if self.failed else "done")
        print()
        print(results.table())
        if self.failed:
            log(f"FAILED: {', '.join(self.failed)} (checks fail above {CHECK_TOLERANCE:g} of the logits' scale)")
            return 1
        log("done")
        return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
