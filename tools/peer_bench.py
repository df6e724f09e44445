"""skipdeploy against the engines a user would otherwise pick on a CPU, same checkpoint, same prompts.

Contenders (``--contenders``, comma-separated, in this order by default):

- ``skipdeploy-full``, ``skipdeploy-Kx`` (any K > 1, e.g. ``skipdeploy-2x``): ``skipdeploy.load(EXPORT)``
  with ``Schedule.full(L)`` / ``Schedule.target_speedup(L, K, decay_tokens=N-1)``, driven by the
  benchmark's own runner (``skipdeploy.bench.runners.skipdeploy_runner``);
- ``skipdeploy-int8``: the int8 export (``--int8-export DIR``; made there from EXPORT if it holds none), full schedule;
- ``ct2-fp32``, ``ct2-int8``: CTranslate2 (float32 / int8_float32 conversion of the checkpoint);
- ``ortgenai-fp32``, ``ortgenai-int8``, ``ortgenai-int4``: onnxruntime-genai (model builder, CPU; Llama family, no OPT);
- ``hf``: Hugging Face ``generate`` (the benchmark's runner), float32.

Each contender runs in a process of its own (engines in one process disturb each other: loading a
CTranslate2 int8 model slowed a float32 one in the same process by half), which times its runs and
the CPU that other processes used meanwhile; ``--in-process`` runs them all here instead.
Conversions are cached under ``--work-dir`` (reused while the checkpoint's files are unchanged).
Every contender decodes the same seeded random prompts (ids above the specials, equal lengths),
greedily, EOS ignored, exactly N new tokens, with ``--threads`` threads. Each contender runs
once untimed, then the contenders take turns run by run in an order that rotates every round
(``skipdeploy.bench.run.measure``). Reported per contender and batch: median ms per output token
over every decode step, output tokens/s (median over rounds), time to first token, the speed
ratio to the reference (``skipdeploy-full``, else ``hf``) computed per round then medianed, and
the fraction of token positions equal to the reference's (and to HF's). A contender that cannot
run (library not installed, checkpoint unsupported, conversion failed) is reported as skipped
with the reason, and the rest run.

    python tools/peer_bench.py --checkpoint CKPT --export EXPORT --batch-sizes 1,8 --prompt-length 32 \\
        --max-new-tokens 64 --rounds 5 --threads 2 \\
        --contenders skipdeploy-full,skipdeploy-2x,skipdeploy-3x,ct2-fp32,ct2-int8,ortgenai-fp32,ortgenai-int4,hf \\
        --json OUT.json

Install the peers with ``pip install 'skipdeploy[bench]'`` (ctranslate2, onnxruntime-genai, onnx-ir).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from skipdeploy.errors import SkipDeployError  # noqa: E402

DEFAULT_CONTENDERS = ("skipdeploy-full,skipdeploy-2x,skipdeploy-3x,ct2-fp32,ct2-int8,ortgenai-fp32,"
                      "ortgenai-int4,hf")
SKIP_TARGET = re.compile(r"^skipdeploy-(\d+(?:\.\d+)?)x$")
MIN_METERED_S = 0.25  # runs shorter than this get no "other CPU" figure


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ForeignCpu:
    """CPU time that other processes used while a run was timed, as a fraction of the machine
    (``/proc/stat`` busy time less this process's own): a shared machine's noise, per run."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.cores = os.cpu_count() or 1

    def snapshot(self) -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(fields[:3]) + sum(fields[5:7])  # user nice system (idle iowait) irq softirq
        own = os.times()
        return busy / self.tick, own.user + own.system, time.perf_counter()

    def fraction(self, before, after) -> float | None:
        if before is None or after is None or after[2] - before[2] < MIN_METERED_S:
            return None  # /proc/stat counts in ticks (10 ms): too coarse for a short run
        return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / ((after[2] - before[2]) * self.cores))


def default_work_dir(checkpoint: Path) -> Path:
    tag = hashlib.sha1(str(checkpoint.resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / "skipdeploy-peers" / f"{checkpoint.name}-{tag}"


class Bench:
    """Builds contenders by name (in a worker process, or in this one with ``--in-process``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.threads = args.threads or os.cpu_count() or 1
        self.new_tokens = args.max_new_tokens
        self.runtime = None
        self._manifest = None

    def manifest(self):
        if self._manifest is None:
            if not self.args.export:
                raise SkipDeployError("no --export given")
            from skipdeploy.manifest import read_manifest

            self._manifest = read_manifest(self.args.export, verify=False)
        return self._manifest

    def skipdeploy_runtime(self):
        if self.runtime is None:
            import skipdeploy

            self.manifest()
            self.runtime = skipdeploy.load(self.args.export, threads=self.threads)
        return self.runtime

    def checkpoint(self) -> Path:
        if self.args.checkpoint:
            return Path(self.args.checkpoint)
        source = self.manifest().source if self.args.export else None
        if source and Path(source).is_dir():
            return Path(source)
        raise SkipDeployError("no local checkpoint (pass --checkpoint DIR)")

    def vocab_size(self) -> int:
        if self.args.export:
            return int(self.manifest().model.vocab_size)
        from skipdeploy.bench.peers import checkpoint_config

        return int(checkpoint_config(self.checkpoint())["vocab_size"])

    def make(self, name: str) -> tuple[str, Callable]:
        """(kind, run) of a contender name; raises SkipDeployError/ImportError when it cannot run."""
        from skipdeploy.bench.runners import hf_runner, skipdeploy_runner
        from skipdeploy.schedule import Schedule

        N = self.new_tokens
        if name == "skipdeploy-full" or SKIP_TARGET.match(name):
            runtime = self.skipdeploy_runtime()
            L = runtime.spec.num_layers
            match = SKIP_TARGET.match(name)
            schedule = (Schedule.target_speedup(L, float(match.group(1)), decay_tokens=max(1, N - 1)) if match
                        else Schedule.full(L))
            return "skipdeploy", skipdeploy_runner(runtime, schedule, N)
        if name == "skipdeploy-int8":
            if not self.args.int8_export:
                raise SkipDeployError("pass --int8-export DIR (an int8 export, or where to make one)")
            import skipdeploy
            from skipdeploy.bench.run import int8_export_of

            directory, _ = int8_export_of(self.manifest(), self.args.int8_export, log)
            runtime = skipdeploy.load(directory, threads=self.threads)
            return "skipdeploy", skipdeploy_runner(runtime, Schedule.full(runtime.spec.num_layers), N)
        if name == "hf":
            model = self.hf_model()
            config = model.config
            pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
            if isinstance(pad, list):
                pad = pad[0]
            return "hf", hf_runner(model, N, pad if pad is not None else 0)
        from skipdeploy.bench.peers import PEERS, peer

        if name in PEERS:
            runner = peer(name, self.checkpoint(), self.args.work_dir or default_work_dir(self.checkpoint()),
                          threads=self.threads, log=log)
            return "peer", runner.runner(N)
        raise SkipDeployError(f"unknown contender {name!r}")

    def hf_model(self):
        from skipdeploy.bench.runners import load_hf

        reasons: list[str] = []
        model = load_hf(str(self.checkpoint()), None, self.threads, reasons.append)
        if model is None:
            raise SkipDeployError(reasons[-1] if reasons else "cannot load the checkpoint")
        return model


CANNOT_RUN = Exception  # whatever stops a contender from being built: it is skipped with the reason


def reason_of(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, SkipDeployError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


def serve(args: argparse.Namespace) -> int:
    """Worker mode (``--worker NAME``): build one contender, then time runs for the parent. The
    protocol (pickles) goes over the original stdout; everything printed goes to stderr."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(message) -> None:
        pickle.dump(message, out)
        out.flush()

    start = time.perf_counter()
    try:
        kind, run = Bench(args).make(args.worker)
    except CANNOT_RUN as exc:
        send(("skip", reason_of(exc)))
        return 0
    send(("ready", kind, {"prepare_s": time.perf_counter() - start, "worker_rss_mb": rss_bytes() / 1e6}))
    meter = ForeignCpu()
    while True:
        try:
            prompts = pickle.load(sys.stdin.buffer)
        except EOFError:
            return 0
        try:
            before = meter.snapshot()
            result = run(prompts)
            send(("ok", result, meter.fraction(before, meter.snapshot())))
        except Exception as exc:  # reported by the parent, which stops the benchmark
            send(("error", f"{type(exc).__name__}: {reason_of(exc)}"))


class Worker:
    """A contender in its own process (``python tools/peer_bench.py ... --worker NAME``): engines
    in one process disturb each other (loading a CTranslate2 int8 model slowed a float32 one in
    the same process by half), so each one gets a process of its own; timing is done there."""

    def __init__(self, argv: list[str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def receive(self):
        try:
            return pickle.load(self.proc.stdout)
        except EOFError:
            self.proc.wait()
            return ("error", f"the worker exited with code {self.proc.returncode}")

    def run(self, prompts: list[list[int]], foreign: list) -> Any:
        pickle.dump(prompts, self.proc.stdin)
        self.proc.stdin.flush()
        message = self.receive()
        if message[0] != "ok":
            raise SkipDeployError(f"{self.name}: {message[1]}")
        foreign.append(message[2])
        return message[1]

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Contenders:
    """The contenders that can run, in order, each built in a worker (or here), and the skipped ones."""

    def __init__(self, args: argparse.Namespace, argv: list[str], names: list[str]) -> None:
        from skipdeploy.bench.runners import Contender

        self.items: list[Contender] = []
        self.skipped: list[dict[str, str]] = []
        self.prepared: dict[str, dict[str, Any]] = {}
        self.foreign: dict[str, dict[int, list]] = {}  # contender -> batch -> per run (warm-up first)
        self.workers: list[Worker] = []
        bench = Bench(args) if args.in_process else None
        meter = ForeignCpu()
        for name in names:
            samples = self.foreign.setdefault(name, {})
            start, before = time.perf_counter(), rss_bytes()
            if bench is not None:
                try:
                    kind, run = bench.make(name)
                except CANNOT_RUN as exc:
                    self.skip(name, reason_of(exc))
                    continue
                self.prepared[name] = {"prepare_s": time.perf_counter() - start,
                                       "rss_growth_mb": (rss_bytes() - before) / 1e6}

                def timed(prompts, run=run, samples=samples):
                    snap = meter.snapshot()
                    result = run(prompts)
                    samples.setdefault(len(prompts), []).append(meter.fraction(snap, meter.snapshot()))
                    return result
            else:
                worker = Worker(argv, name)
                message = worker.receive()
                if message[0] != "ready":
                    worker.close()
                    self.skip(name, message[1])
                    continue
                self.workers.append(worker)
                kind = message[1]
                self.prepared[name] = message[2]

                def timed(prompts, worker=worker, samples=samples):
                    return worker.run(prompts, samples.setdefault(len(prompts), []))
            self.items.append(Contender(name, kind, timed))

    def skip(self, name: str, reason: str) -> None:
        log(f"{name}: skipped ({reason})")
        self.skipped.append({"contender": name, "reason": reason})

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def results_of(contenders, batch_sizes: list[int],
               foreign: dict[str, dict[int, list]] | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    from skipdeploy.bench.rows import agreement, paired_median, percentile

    labels = [c.label for c in contenders]
    reference = next((r for r in ("skipdeploy-full", "hf") if r in labels), labels[0] if labels else None)
    ref = next((c for c in contenders if c.label == reference), None)
    hf = next((c for c in contenders if c.label == "hf"), None)
    rows = []
    for batch in batch_sizes:
        for c in contenders:
            runs = c.runs[batch]
            times = [t for run in runs for t in run.token_times]
            last = runs[-1].tokens
            busy = ((foreign or {}).get(c.label, {}).get(batch) or [])[-len(runs):]  # the timed runs
            busy_known = [b for b in busy if b is not None]
            rows.append({
                "batch": batch, "contender": c.label, "kind": c.kind,
                "ms_per_token": {"median": 1e3 * statistics.median(times), "p90": 1e3 * percentile(times, 90),
                                 "mean": 1e3 * float(np.mean(times))},
                "tokens_per_s": statistics.median(run.tokens_per_s(batch) for run in runs),
                "ttft_ms": 1e3 * statistics.median(run.ttft for run in runs),
                "reference": reference,
                "speed_vs_reference": paired_median(runs, ref.runs[batch], batch) if ref is not None else None,
                "ms_per_token_vs_reference": (statistics.median(
                    (x.decode_seconds / len(x.token_times)) / (y.decode_seconds / len(y.token_times))
                    for x, y in zip(runs, ref.runs[batch])) if ref is not None else None),
                "agreement_vs_reference": agreement(ref.runs[batch][-1].tokens, last) if ref is not None else None,
                "agreement_vs_hf": agreement(hf.runs[batch][-1].tokens, last) if hf is not None else None,
                "tokens_per_row": sorted({len(t) for t in last}),
                "foreign_cpu": statistics.median(busy_known) if busy_known else None,
                "runs": [{"ttft_ms": 1e3 * run.ttft, "decode_ms": 1e3 * run.decode_seconds,
                          "tokens_per_s": run.tokens_per_s(batch),
                          "foreign_cpu": busy[i] if i < len(busy) else None} for i, run in enumerate(runs)],
            })
    return reference, rows


def table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    ref = results["reference"]
    env = results["environment"]
    load = [env.get("load_average_before"), env.get("load_average_after")]
    lines = [f"prompt {cfg['prompt_length']} tokens, {cfg['max_new_tokens']} new tokens, {cfg['threads']} threads, "
             f"{cfg['rounds']} alternated rounds after {cfg['warmup']} warm-up; checkpoint {cfg['checkpoint']}; "
             f"load average {' -> '.join('?' if x is None else f'{x:.2f}' for x in load)} on {env.get('cores')} cores",
             "",
             f"| batch | contender | ms/token | tok/s | TTFT ms | speed vs {ref} | tokens = {ref} |"
             + (" tokens = hf |" if ref != "hf" else "") + " other CPU |",
             "|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if ref != "hf" else "") + "---:|"]

    def pct(a):
        return f"{100 * a['positions_equal']:.0f}%" if a else "-"

    for row in results["rows"]:
        speed = row["speed_vs_reference"]
        lines.append(f"| {row['batch']} | {row['contender']} | {row['ms_per_token']['median']:.2f} | "
                     f"{row['tokens_per_s']:.1f} | {row['ttft_ms']:.1f} | "
                     f"{'-' if speed is None else f'{speed:.2f}x'} | {pct(row['agreement_vs_reference'])} |"
                     + (f" {pct(row['agreement_vs_hf'])} |" if ref != "hf" else "")
                     + (" - |" if row.get("foreign_cpu") is None else f" {100 * row['foreign_cpu']:.0f}% |"))
    if results["skipped"]:
        lines.append("")
    for s in results["skipped"]:
        lines.append(f"skipped {s['contender']}: {s['reason']}")
    lines.append("")
    lines.append("ms/token: median over every decode step of every timed run; tok/s: batch x decode steps / decode "
                 "time, median over rounds; speed: tokens/s ratio per round, medianed (> 1 is faster); tokens =: "
                 "fraction of token positions equal (last run); other CPU: the machine's CPU used by other "
                 "processes during the timed runs (median; above ~10% the timings are not to be trusted).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="Hugging Face checkpoint directory (peers, hf) [default: the export's source]")
    ap.add_argument("--export", help="skipdeploy export directory (skipdeploy-* contenders)")
    ap.add_argument("--int8-export", help="int8 export for skipdeploy-int8 (made here from --export if absent)")
    ap.add_argument("--contenders", default=DEFAULT_CONTENDERS)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-length", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="[default: all cores]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", help="where conversions are cached [default: a folder under the temp dir]")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--in-process", action="store_true",
                    help="run every contender in this process (they disturb each other; for debugging)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.max_new_tokens < 2 or args.rounds < 1 or args.prompt_length < 1:
        ap.error("--max-new-tokens must be >= 2, --rounds and --prompt-length >= 1")
    if not args.checkpoint and not args.export:
        ap.error("pass --checkpoint and/or --export")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    from skipdeploy.bench.peers import PEERS

    unknown = [n for n in names if not (n in PEERS or n in ("skipdeploy-full", "skipdeploy-int8", "hf")
                                        or SKIP_TARGET.match(n))]
    if unknown or not names:
        ap.error(f"unknown contenders {', '.join(unknown) or '(none given)'} (known: skipdeploy-full, skipdeploy-Kx "
                 f"for K > 1, skipdeploy-int8, {', '.join(PEERS)}, hf)")

    if args.worker:
        return serve(args)
    from skipdeploy.bench.peers import peer_versions
    from skipdeploy.bench.probes import environment, load_average
    from skipdeploy.bench.run import measure

    vocab = Bench(args).vocab_size()
    contenders = Contenders(args, list(sys.argv[1:] if argv is None else argv), names)
    try:
        if not contenders.items:
            log("no contender can run")
            return 1
        load_before = load_average()
        start = time.perf_counter()
        measure(contenders.items, batch_sizes, args.prompt_length, args.max_new_tokens, vocab, args.rounds,
                args.warmup, args.seed, None if not args.no_progress else False)
        elapsed = time.perf_counter() - start
    finally:
        contenders.close()
    reference, rows = results_of(contenders.items, batch_sizes, contenders.foreign)
    threads = args.threads or os.cpu_count() or 1
    results = {
        "config": {"checkpoint": args.checkpoint, "export": args.export, "int8_export": args.int8_export,
                   "contenders": names, "batch_sizes": batch_sizes, "prompt_length": args.prompt_length,
                   "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "warmup": args.warmup,
                   "threads": threads, "seed": args.seed, "vocab_size": vocab,
                   "isolation": "in-process" if args.in_process else "one process per contender"},
        "environment": {**environment(threads), **peer_versions(("torch", "transformers")),
                        "load_average_before": load_before,
                        "load_average_after": load_average(), "measure_s": elapsed},
        "reference": reference,
        "prepared": contenders.prepared,
        "skipped": contenders.skipped,
        "rows": rows,
    }
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
