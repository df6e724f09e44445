"""Triton's hop: the same load on the engine directly and through Triton, side by side.

    python -m skipdeploy.triton.bench EXPORT [--clients 16] [--tokens 32] [--rounds 5] [--max-batch 16]

Each round, ``clients`` threads send one request each at once (token ids, greedy, EOS ignored,
so that every request generates exactly ``tokens`` tokens); the round ends when all have
finished. The paths take turns round by round, after one warm-up round each:

* ``engine``: ``ServingEngine.submit`` in this process, each client woken once, by the engine's
  ``on_finish`` (the first token's time from the engine's timestamps): the engine's own cost;
* ``engine-result``: the same, blocking in ``Request.result()`` (woken at every token);
* ``serve``: ``skipdeploy serve`` (the OpenAI server, another process), POST /v1/completions;
* ``triton-http``: POST /v2/models/NAME/generate (one response per request);
* ``triton-grpc``: tritonclient's gRPC stream (one response per token).

Reported: medians over all requests of the latency (send to last token) and of the time to the
first token, the median over rounds of the throughput (generated tokens per second of wall
time), and the ratios to ``engine``: per round (adjacent in time, so that load from other work
on the machine falls on both), then their median. The server is the nvidia-pytriton wheel's
(``server.TritonServer``); the clients run on the same machine, as beside a sidecar.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def _prompts(clients: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[2] + [int(t) for t in rng.integers(4, vocab, length - 1)] for _ in range(clients)]


class _Path:
    """One way to send a request: ``send(prompt) -> (ttft or None, latency, tokens)``."""

    def __init__(self, name: str, send) -> None:
        self.name, self.send = name, send
        self.latencies: list = []
        self.ttfts: list = []
        self.throughputs: list = []

    def round(self, prompts: list[list[int]], record: bool = True) -> None:
        results: list = [None] * len(prompts)
        barrier = threading.Barrier(len(prompts) + 1)

        def client(i: int) -> None:
            barrier.wait()
            results[i] = self.send(prompts[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        if record:
            self.latencies.append([r[1] for r in results])
            self.ttfts += [r[0] for r in results if r[0] is not None]
            self.throughputs.append(sum(r[2] for r in results) / wall)

    def summary(self, base: "_Path") -> dict:
        """Medians, and the ratios to ``base`` round by round (the rounds of two paths are next to
        each other in time, so a slow spell of the machine falls on both), then their median."""
        lat = sorted(x for round_ in self.latencies for x in round_)
        latency_ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(self.latencies, base.latencies)]
        throughput_ratios = [a / b for a, b in zip(self.throughputs, base.throughputs)]
        return {"latency_ms": 1e3 * statistics.median(lat), "latency_p90_ms": 1e3 * lat[int(0.9 * (len(lat) - 1))],
                "ttft_ms": 1e3 * statistics.median(self.ttfts) if self.ttfts else None,
                "tokens_per_s": statistics.median(self.throughputs), "requests": len(lat),
                "rounds": len(self.throughputs), "latency_ratio": statistics.median(latency_ratios),
                "throughput_ratio": statistics.median(throughput_ratios),
                "latency_ratios": latency_ratios, "throughput_ratios": throughput_ratios}


def engine_paths(engine, observer, tokens) -> list[_Path]:
    """In-process clients: ``engine`` waits for the engine's ``on_finish`` (one wake-up per
    request: the engine's own cost); ``engine-result`` blocks in ``Request.result()``, which wakes
    at every token (with many client threads, their GIL hand-offs slow the engine's thread)."""
    counter = iter(range(10**9))

    def send_event(prompt):
        request_id = f"bench-{next(counter)}"
        event = observer.events[request_id] = threading.Event()
        start = time.perf_counter()
        request = engine.submit(prompt, tokens, eos_token_id=None, temperature=0.0, request_id=request_id)
        event.wait(300)
        end = time.perf_counter()
        del observer.events[request_id]
        return request.token_times[0] - start, end - start, len(request.tokens)

    def send_result(prompt):
        start = time.perf_counter()
        request = engine.submit(prompt, tokens, eos_token_id=None, temperature=0.0)
        request.result(timeout=300)
        return request.token_times[0] - start, time.perf_counter() - start, len(request.tokens)

    return [_Path("engine", send_event), _Path("engine-result", send_result)]


class _Finished:
    def __init__(self) -> None:
        self.events: dict = {}

    def on_finish(self, request) -> None:
        event = self.events.get(request.id)
        if event is not None:
            event.set()


def triton_paths(server, tokens) -> list[_Path]:
    import urllib.request

    import numpy as np
    import tritonclient.grpc as grpcclient

    params = json.dumps({"max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    url = f"{server.http_url}/v2/models/bench/generate"

    def send_http(prompt):
        body = json.dumps({"input_ids": prompt, "exclude_input_in_output": True, "sampling_parameters": params}).encode()
        start = time.perf_counter()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            ids = json.loads(response.read())["output_ids"]
        return None, time.perf_counter() - start, len(ids) if isinstance(ids, list) else 1

    clients = threading.local()

    def send_grpc(prompt):
        if not hasattr(clients, "client"):
            clients.client = grpcclient.InferenceServerClient(server.grpc_url)
        done, first, n = threading.Event(), [], [0]

        def callback(result, error):
            now = time.perf_counter()
            if error is not None:
                done.set()
                return
            ids = result.as_numpy("output_ids")
            if ids is not None and ids.size:
                n[0] += int(ids.size)
                if not first:
                    first.append(now)
            if result.get_response().parameters["triton_final_response"].bool_param:
                done.set()

        inputs = [grpcclient.InferInput("input_ids", [len(prompt)], "INT64"),
                  grpcclient.InferInput("stream", [1], "BOOL"),
                  grpcclient.InferInput("sampling_parameters", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array(prompt, dtype=np.int64))
        inputs[1].set_data_from_numpy(np.array([True]))
        inputs[2].set_data_from_numpy(np.array([params.encode()], dtype=np.object_))
        clients.client.start_stream(callback=callback)
        start = time.perf_counter()
        clients.client.async_stream_infer("bench", inputs, enable_empty_final_response=True)
        done.wait(300)
        end = time.perf_counter()
        clients.client.stop_stream()
        return (first[0] - start) if first else None, end - start, n[0]

    return [_Path("triton-http", send_http), _Path("triton-grpc", send_grpc)]


def serve_path(url: str, tokens: int) -> _Path:
    """``skipdeploy serve``'s completions, non-streamed (as ``triton-http``)."""
    import urllib.request

    def send(prompt):
        body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                           "ignore_eos": True}).encode()
        start = time.perf_counter()
        request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            usage = json.loads(response.read())["usage"]
        return None, time.perf_counter() - start, usage["completion_tokens"]

    return _Path("serve", send)


def run(export, *, clients=16, tokens=32, prompt_tokens=16, rounds=5, max_batch=16, threads=None,
        workdir: Path | None = None) -> dict:
    """Every path's summary; the paths take turns round by round (noise from other work on the
    machine falls on all of them alike), after one warm-up round each."""
    from ..manifest import read_manifest
    from ..serving import ServingEngine
    from ..serving.process import ServerProcess
    from .repository import write_repository
    from .server import TritonServer

    manifest = read_manifest(export, verify=False)
    prompts = _prompts(clients, prompt_tokens, manifest.model.vocab_size)
    with tempfile.TemporaryDirectory(prefix="skipdeploy-triton-bench-") as tmp:
        # Without a workdir the server gets its own, whose log outlives a failed start (the error names it).
        server_dir = Path(workdir) / "server" if workdir else None
        workdir = Path(workdir or tmp)
        write_repository(export, workdir / "repo", model_name="bench", max_batch=max_batch, max_queue=clients,
                         threads=threads, force=True)
        observer = _Finished()
        engine = ServingEngine(export, max_batch=max_batch, max_queue=clients, threads=threads, observer=observer)
        serve = ServerProcess(export, ["--model-name", "bench", "--max-batch", str(max_batch), "--max-queue",
                                       str(clients), *(["--threads", str(threads)] if threads else [])],
                              workdir / "serve.log")
        triton = None
        try:
            triton = TritonServer(workdir / "repo", workdir=server_dir)
            with triton as server:
                paths = engine_paths(engine, observer, tokens) + [serve_path(serve.url, tokens)] + \
                    triton_paths(server, tokens)
                for path in paths:
                    path.round(prompts, record=False)
                for r in range(rounds):
                    for path in (paths if r % 2 == 0 else paths[::-1]):  # no path always first
                        path.round(prompts)
            stopped = [line for line in server.log().splitlines() if "[skipdeploy]" in line and "stopped;" in line]
        finally:
            engine.shutdown()
            serve.stop()
            if triton is not None:
                triton.cleanup()
    results = {p.name: p.summary(paths[0]) for p in paths}
    by_name = {p.name: p for p in paths}
    for name in ("triton-http", "triton-grpc"):  # Triton's hop against the OpenAI server's
        versus = by_name[name].summary(by_name["serve"])
        results[name]["vs_serve"] = {"latency_ratio": versus["latency_ratio"],
                                     "throughput_ratio": versus["throughput_ratio"]}
    results["server_log"] = stopped[-1].split("] ", 1)[-1].strip('"') if stopped else None
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skipdeploy.triton.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, help="onnxruntime threads [default: all cores]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = run(args.export, clients=args.clients, tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                  rounds=args.rounds, max_batch=args.max_batch, threads=args.threads)
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}, indent=2))
        return 0
    print(f"{args.clients} clients x {args.tokens} tokens ({args.prompt_tokens}-token prompts), {args.rounds} rounds, "
          f"max_batch {args.max_batch}, export {args.export}")
    print(f"{'path':<14} {'latency p50':>12} {'p90':>10} {'TTFT p50':>9} {'tokens/s':>9} {'latency x':>10} "
          f"{'tput x':>7}   (x: paired per-round ratios to engine, median)")
    log = results.pop("server_log")
    for name, r in results.items():
        ttft = f"{r['ttft_ms']:.1f}" if r["ttft_ms"] is not None else "-"
        versus = r.get("vs_serve")
        print(f"{name:<14} {r['latency_ms']:>10.1f}ms {r['latency_p90_ms']:>8.1f}ms {ttft:>9} "
              f"{r['tokens_per_s']:>9.0f} {r['latency_ratio']:>10.3f} {r['throughput_ratio']:>7.3f}"
              + (f"   vs serve: latency x{versus['latency_ratio']:.3f}, tput x{versus['throughput_ratio']:.3f}"
                 if versus else ""))
    if log:
        print(f"server: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
