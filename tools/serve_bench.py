"""Load benchmark of `skipdeploy serve`: N closed-loop clients against the real server, side by side
with the same requests one at a time and with static batches through ``Runtime.generate``.

    python tools/serve_bench.py /tmp/opt125-sd --clients 16 --requests 32 --rounds 3 --json serve.json --plot serve.png

For each schedule (the full one and a 2x SkipDecode schedule) and each admission policy, a server
is started on a free local port (``skipdeploy serve EXPORT --policy P`` with the schedule as its
default) and ``--clients`` threads (started evenly over ``--ramp`` seconds) replay the request
list through streaming completions, each sending its next request when the previous one has
finished. Every contender runs once per round, in an order that rotates; throughput is the
median over rounds and every ratio is taken within a round (then the median), so that the
drift of a shared machine falls on all contenders alike. Reported per contender: output
tokens/s over the whole run, time to first token and time per output token (p50, p99, from the
stream's arrival times), and the layers run per iteration (from the server's /metrics). The
baselines run in the same invocation: (a) the server with one client (unloaded latency), (b)
static batches of ``--clients`` requests through ``Runtime.generate`` in this process (each batch
runs until its longest request ends). Requests are random token ids (no EOS stop): prompts of
``--prompt-tokens LO,HI`` tokens, ``--max-tokens LO,HI`` new tokens, drawn once from ``--seed``.
Every loop is bounded by the request count and a per-request timeout; every server started is
stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stream_completion(url: str, prompt: list[int], max_tokens: int, timeout: float) -> dict:
    """One streaming completion; the arrival time of every token."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    times: list[float] = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            ids = (chunk.get("choices") or [{}])[0].get("skipdecode", {}).get("token_ids")
            times.extend([time.perf_counter()] * (len(ids) if ids is not None else 1))
    return {"start": start, "times": times}


def closed_loop(url: str, jobs: list[tuple[list[int], int]], clients: int, timeout: float, ramp: float = 0.0) -> dict:
    results: list[dict] = []
    order = list(range(len(jobs)))
    lock = threading.Lock()

    def client(delay: float) -> None:
        time.sleep(delay)
        while True:
            with lock:
                if not order:
                    return
                i = order.pop(0)
            results.append(stream_completion(url, *jobs[i], timeout))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(ramp * i / clients,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def summarize(runs: list[tuple[list[dict], float]]) -> dict:
    """Rounds of one contender: tokens/s per round (and their median); TTFT and TPOT
    percentiles over every request of every round."""
    results = [r for rs, _ in runs for r in rs]
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    tpot = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    per_round = [sum(len(r["times"]) for r in rs) / wall for rs, wall in runs]

    def pct(values, q):
        return 1e3 * float(np.percentile(values, q)) if values else None

    return {"requests": len(results), "rounds": len(runs), "tokens_per_s": float(np.median(per_round)),
            "tokens_per_s_rounds": per_round, "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
            "tpot_ms": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)}}


def static_batches(runtime, jobs: list[tuple[list[int], int]], batch: int, schedule):
    """The same requests through Runtime.generate, ``batch`` at a time, in arrival order."""
    results = []
    start = time.perf_counter()
    for i in range(0, len(jobs), batch):
        group = jobs[i:i + batch]
        t0 = time.perf_counter()
        marks: list[float] = []
        for _ in runtime.stream([p for p, _ in group], max(n for _, n in group), schedule, eos_token_id=None):
            marks.append(time.perf_counter())
        for _, n in group:  # a row's useful tokens are its own max_tokens; the batch ran to the longest
            results.append({"start": t0, "times": marks[:n]})
    return results, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="Requests per contender and round (loaded runs).")
    parser.add_argument("--single-requests", type=int, default=6, help="Requests of the one-at-a-time baseline.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; every contender runs once per round.")
    parser.add_argument("--prompt-tokens", default="8,64", help="LO,HI prompt tokens (uniform).")
    parser.add_argument("--max-tokens", default="16,112", help="LO,HI new tokens (uniform).")
    parser.add_argument("--target-speedup", type=float, default=2.0, help="The SkipDecode schedule measured.")
    parser.add_argument("--decay-tokens", type=int, default=64)
    parser.add_argument("--policies", default="continuous,aligned,drain")
    parser.add_argument("--ramp", type=float, default=2.0,
                        help="Seconds over which the clients start, evenly (0: all at once).")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300, help="Seconds per request at most.")
    parser.add_argument("--workdir", default="/tmp/serve-bench")
    parser.add_argument("--json", help="Write the results as JSON.")
    parser.add_argument("--plot", help="Write a PNG: tokens/s and TTFT per contender.")
    args = parser.parse_args()

    import skipdeploy
    from skipdeploy import Schedule
    from skipdeploy.serving.process import ServerProcess

    manifest = skipdeploy.manifest.read_manifest(args.export, verify=False)
    L = manifest.model.num_layers
    rng = np.random.default_rng(args.seed)
    lo, hi = map(int, args.prompt_tokens.split(","))
    mlo, mhi = map(int, args.max_tokens.split(","))
    vocab = min(manifest.model.vocab_size, 50_000)
    jobs = [(rng.integers(4, vocab, int(rng.integers(lo, hi + 1))).tolist(), int(rng.integers(mlo, mhi + 1)))
            for _ in range(args.requests)]
    schedules = {"full": (Schedule.full(L), ["--full"]),
                 f"{args.target_speedup:g}x": (Schedule.target_speedup(L, args.target_speedup,
                                                                      decay_tokens=args.decay_tokens),
                                              ["--target-speedup", str(args.target_speedup),
                                               "--decay-tokens", str(args.decay_tokens)])}
    common = ["--model-name", "bench", "--max-batch", str(args.max_batch), "--prefill-chunk", str(args.prefill_chunk),
              *(["--threads", str(args.threads)] if args.threads else [])]
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    runtime = skipdeploy.load(args.export, check_files=False, **({"threads": args.threads} if args.threads else {}))
    contenders, servers = {}, []   # (schedule, contender) -> run(); run() -> (results, wall, layers/iteration)
    try:
        for name, (schedule, flags) in schedules.items():
            for policy in args.policies.split(","):
                server = ServerProcess(args.export, [*common, "--policy", policy, *flags],
                                Path(args.workdir) / f"server-{name}-{policy}.log")
                servers.append(server)
                stream_completion(server.url, jobs[0][0], 4, args.timeout)  # warm-up
                contenders[name, f"server {policy}, {args.clients} clients"] = \
                    lambda server=server: loaded_run(server, jobs, args)
                if policy == "continuous":
                    contenders[name, "server, one at a time"] = lambda server=server: (
                        *closed_loop(server.url, jobs[:args.single_requests], 1, args.timeout), None)
            runtime.generate([jobs[0][0]], 2, schedule, eos_token_id=None)  # warm-up
            contenders[name, f"static batches of {args.clients}"] = lambda schedule=schedule: (
                *static_batches(runtime, jobs, args.clients, schedule), None)
        # Rounds: every contender once per round, in an order that rotates, so that the drift of a
        # shared machine falls on all of them alike; ratios are taken within a round.
        runs: dict = {key: [] for key in contenders}
        keys = list(contenders)
        for r in range(args.rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                runs[key].append(contenders[key]())
                print(f"round {r + 1}/{args.rounds}: {key[0]} {key[1]}", file=sys.stderr, flush=True)
    finally:
        for server in servers:
            server.stop()
    rows = []
    for (name, contender), rounds in runs.items():
        layers = [x[2] for x in rounds if x[2] is not None]
        rows.append({"schedule": name, "contender": contender, **summarize([(x[0], x[1]) for x in rounds]),
                     "layers_per_iteration": float(np.median(layers)) if layers else None})
    ratios = paired_ratios(rows, list(schedules), args.clients)
    print_rows(rows)
    for label, value in ratios.items():
        print(f"{label}: {value:.2f}x (median of per-round ratios)")
    results = {"export": args.export, "config": vars(args), "cores": os.cpu_count(), "rows": rows, "ratios": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


def loaded_run(server, jobs, args):
    before = server.metrics()
    results, wall = closed_loop(server.url, jobs, args.clients, args.timeout, args.ramp)
    after = server.metrics()
    calls = "skipdeploy_layers_per_iteration"
    n = after.get(f"{calls}_count", 0) - before.get(f"{calls}_count", 0)
    layers = (after.get(f"{calls}_sum", 0) - before.get(f"{calls}_sum", 0)) / n if n else None
    return results, wall, layers


def paired_ratios(rows: list[dict], schedules: list[str], clients: int) -> dict:
    """Throughput ratios within each round, then their median."""
    by = {(r["schedule"], r["contender"]): r["tokens_per_s_rounds"] for r in rows}
    loaded, single, static = f"server continuous, {clients} clients", "server, one at a time", \
        f"static batches of {clients}"

    def ratio(a, b):
        return float(np.median([x / y for x, y in zip(by[a], by[b])]))

    out = {}
    for name in schedules:
        out[f"{name}: continuous / one at a time"] = ratio((name, loaded), (name, single))
        out[f"{name}: continuous / static batches"] = ratio((name, loaded), (name, static))
    skip, full = schedules[1], schedules[0]
    out[f"{skip} / {full}, continuous"] = ratio((skip, loaded), (full, loaded))
    out[f"{skip} / {full}, static batches"] = ratio((skip, static), (full, static))
    return out


def print_rows(rows: list[dict]) -> None:
    print(f"{'schedule':<8} {'contender':<34} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} {'TPOT p50':>9} {'p99':>7} "
          f"{'layers/iter':>11}")
    for r in rows:
        lpi = r.get("layers_per_iteration")
        print(f"{r['schedule']:<8} {r['contender']:<34} {r['tokens_per_s']:>7.1f} {r['ttft_ms']['p50']:>9.0f} "
              f"{r['ttft_ms']['p99']:>7.0f} {r['tpot_ms']['p50']:>9.1f} {r['tpot_ms']['p99']:>7.1f} "
              f"{'-' if lpi is None else f'{lpi:.1f}':>11}")
    sys.stdout.flush()


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['schedule']}\n{r['contender']}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    xs = range(len(rows))
    left.bar(xs, [r["tokens_per_s"] for r in rows], color=["C0" if r["schedule"] == "full" else "C1" for r in rows])
    left.set(xticks=list(xs), ylabel="output tokens/s", title="throughput")
    left.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    right.bar(xs, [r["ttft_ms"]["p50"] for r in rows], label="p50")
    right.scatter(xs, [r["ttft_ms"]["p99"] for r in rows], color="black", marker="_", s=200, label="p99", zorder=3)
    right.set(xticks=list(xs), ylabel="ms", title="time to first token", yscale="log")
    right.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
