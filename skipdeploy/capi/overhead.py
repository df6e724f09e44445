"""What a call through the C API costs over the same call from Python (a benchmark, not a test).

    python -m skipdeploy.capi.overhead EXPORT [--calls 200] [--tokens 32] [--block 10] [--threads 1]

Builds the library into a temporary directory (or uses ``--lib DIR`` from ``skipdeploy capi``),
compiles a C program that times ``sd_generate`` calls one after another (run under ``env -i``),
and times the equivalent calls from Python on a ServingEngine with the same options: the same
engine path, so the difference is the C API's own cost (entering the embedded interpreter,
reading the arguments, writing the ids back). Blocks of calls alternate between the two (both
processes stay up). Then the same in one process: the library loaded here with ctypes against
direct calls on the engine it made, which takes the difference between two processes (and a busy
machine's scheduling of them) out. Prints the medians and ratios; ``measure`` returns them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <skipdeploy.h>

/* bench EXPORT OPTIONS_JSON PARAMS_JSON ID...: reads a count per line on stdin, makes that many
 * sd_generate calls and prints one line per call (seconds, ids made), then "done". A line
 * "info N" times N sd_runtime_info calls instead (the fixed cost of a call) and prints
 * "SECONDS_PER_CALL 0" before "done". */
int main(int argc, char **argv)
{
    if (argc < 5) { fprintf(stderr, "usage: bench EXPORT OPTIONS PARAMS ID...\n"); return 2; }
    size_t n_prompt = (size_t)(argc - 4), n = 0;
    int64_t prompt[256], out[4096];
    int calls;
    char word[16];
    char info[4096];
    for (size_t i = 0; i < n_prompt && i < 256; i++) prompt[i] = atoll(argv[4 + i]);
    sd_runtime *rt = NULL;
    sd_status s = sd_load(argv[1], argv[2], &rt);
    if (s != SD_OK) { fprintf(stderr, "sd_load: %s\n", sd_last_error()); return 1; }
    for (int i = 0; i < 5; i++)  /* warm-up */
        sd_generate(rt, prompt, n_prompt, argv[3], out, 4096, &n);
    while (scanf("%15s", word) == 1) {
        if (word[0] == 'i' && scanf("%d", &calls) == 1) {
            struct timespec a, b;
            clock_gettime(CLOCK_MONOTONIC, &a);
            for (int i = 0; i < calls; i++)
                sd_runtime_info(rt, info, sizeof info, &n);
            clock_gettime(CLOCK_MONOTONIC, &b);
            printf("%.9f 0\ndone\n", ((double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec)) / calls);
            fflush(stdout);
            continue;
        }
        calls = atoi(word);
        for (int i = 0; i < calls; i++) {
            struct timespec a, b;
            clock_gettime(CLOCK_MONOTONIC, &a);
            s = sd_generate(rt, prompt, n_prompt, argv[3], out, 4096, &n);
            clock_gettime(CLOCK_MONOTONIC, &b);
            if (s != SD_OK) { fprintf(stderr, "sd_generate: %s\n", sd_last_error()); return 1; }
            printf("%.9f %zu\n", (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec), n);
        }
        printf("done\n");
        fflush(stdout);
    }
    sd_free(rt);
    return 0;
}
"""

PROMPT = [2, 100, 200]


def compile_bench(lib_dir: Path, out: Path) -> Path:
    pc = lib_dir / "lib" / "pkgconfig"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "skipdeploy"], env={"PKG_CONFIG_PATH": str(pc),
                           "PATH": "/usr/bin:/bin"}, check=True, capture_output=True, text=True).stdout.split()
    source = out / "bench.c"
    source.write_text(BENCH_C)
    binary = out / "bench"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(source), *flags], check=True)
    return binary


def _alternate(calls: int, block: int, c_block, py_call) -> tuple[list[float], list[float]]:
    """``calls`` timings of each side, in alternating blocks of ``block``."""
    c_times, py_times = [], []
    while len(py_times) < calls:
        k = min(block, calls - len(py_times))
        c_times += c_block(k)
        for _ in range(k):
            start = time.perf_counter()
            py_call()
            py_times.append(time.perf_counter() - start)
    return c_times, py_times


def _summary(c_times: list[float], py_times: list[float]) -> dict:
    c, py = statistics.median(c_times), statistics.median(py_times)
    return {"c_median_ms": c * 1e3, "python_median_ms": py * 1e3, "ratio": c / py,
            "overhead_percent": (c / py - 1) * 100}


def measure(export: str | Path, calls: int = 200, tokens: int = 32, block: int = 10, threads: int = 1,
            lib_dir: str | Path | None = None) -> dict:
    """Median seconds per ``tokens``-token call, ``calls`` of each, in alternating blocks of
    ``block`` calls (so that load from other processes falls on both alike):

    - ``processes``: a C program (under ``env -i``) against a ServingEngine in this process;
    - ``one_process``: the library loaded into this process (ctypes) against direct calls on the
      very engine it made: the C API's cost with everything else equal;
    - ``fixed_us``: ``sd_runtime_info`` from the C program against ``Bridge.info`` in Python,
      the cost of crossing the boundary.
    """
    from ..serving import ServingEngine
    from .bridge import Bridge, parse_params

    options = json.dumps({"threads": threads})
    params = json.dumps({"max_new_tokens": tokens, "ignore_eos": True})
    result: dict = {"calls": calls, "tokens": tokens, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="skipdeploy-overhead-") as tmp:
        tmp = Path(tmp)
        if lib_dir is None:
            from .build import build

            lib_dir = build(tmp / "capi").library.parent.parent
        binary = compile_bench(Path(lib_dir), tmp)
        engine = ServingEngine(export, threads=threads)
        bench = subprocess.Popen([str(binary), str(export), options, params, *map(str, PROMPT)], env={},
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def c_block(k: int, word: str = "") -> list[float]:
            bench.stdin.write(f"{word}{k}\n")
            bench.stdin.flush()
            times = []
            for line in iter(bench.stdout.readline, "done\n"):
                if not line:
                    raise RuntimeError(f"the C benchmark stopped (exit status {bench.wait()})")
                seconds, made = line.split()
                if not word and int(made) != tokens:
                    raise RuntimeError(f"a C call made {made} ids, not {tokens}")
                times.append(float(seconds))
            return times

        try:
            parsed = parse_params(params, engine.spec.num_layers, engine.schedule)
            for _ in range(5):
                parsed.submit(engine, PROMPT).result()
            # What the bridge does per call, minus the C side: parse (cached there), submit, wait.
            result["processes"] = _summary(*_alternate(calls, block, c_block,
                                                       lambda: list(parsed.submit(engine, PROMPT).result().tokens)))
            bridge = Bridge(engine_factory=lambda directory, **kwargs: engine)
            handle = bridge.load(str(export), options)
            info = _alternate(5, 1, lambda k: c_block(500, "info "), lambda: [bridge.info(handle) for _ in range(500)])
            result["fixed_us"] = {"c": statistics.median(info[0]) * 1e6,
                                  "python": statistics.median(info[1]) / 500 * 1e6}
        finally:
            bench.stdin.close()
            bench.wait(60)
            engine.shutdown()

        # In a fresh interpreter: cffi cannot start the library in a process where (say) torch was
        # imported first (see docs/c-api.md).
        run = subprocess.run([sys.executable, "-m", "skipdeploy.capi.overhead", "--one-process", str(export),
                              "--lib", str(lib_dir), "--calls", str(calls), "--tokens", str(tokens), "--block",
                              str(block), "--threads", str(threads)], check=True, capture_output=True, text=True)
        result["one_process"] = json.loads(run.stdout.splitlines()[-1])
    return result


def one_process(export: str | Path, lib_dir: str | Path, calls: int, tokens: int, block: int, threads: int) -> dict:
    """The library loaded into this process with ctypes against direct calls on the engine it
    made (the same engine, the same interpreter): the C API's own cost and nothing else."""
    import ctypes

    lib = ctypes.CDLL(str(Path(lib_dir) / "lib" / "libskipdeploy.so"))
    lib.sd_last_error.restype = ctypes.c_char_p
    rt = ctypes.c_void_p()
    if lib.sd_load(str(export).encode(), json.dumps({"threads": threads}).encode(), ctypes.byref(rt)) != 0:
        raise RuntimeError(f"sd_load failed in this process: {lib.sd_last_error().decode()}")
    from .bridge import BRIDGE, parse_params

    try:
        engine = BRIDGE.handle(rt.value).serving  # the engine the library made, in this interpreter
        params = json.dumps({"max_new_tokens": tokens, "ignore_eos": True})
        ids, out, n = (ctypes.c_int64 * len(PROMPT))(*PROMPT), (ctypes.c_int64 * 4096)(), ctypes.c_size_t()
        raw = params.encode()

        def c_calls(k: int) -> list[float]:
            times = []
            for _ in range(k):
                start = time.perf_counter()
                if lib.sd_generate(rt, ids, len(PROMPT), raw, out, 4096, ctypes.byref(n)) != 0:
                    raise RuntimeError(f"sd_generate failed: {lib.sd_last_error().decode()}")
                times.append(time.perf_counter() - start)
            return times

        parsed = parse_params(params, engine.spec.num_layers, engine.schedule)
        c_calls(5)
        for _ in range(5):
            parsed.submit(engine, PROMPT).result()
        return _summary(*_alternate(calls, block, c_calls, lambda: list(parsed.submit(engine, PROMPT).result().tokens)))
    finally:
        lib.sd_free(rt)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--block", type=int, default=10, help="calls per alternating block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lib", default=None, help="a `skipdeploy capi --out` directory (default: build one)")
    parser.add_argument("--one-process", action="store_true", help=argparse.SUPPRESS)  # measure()'s helper
    args = parser.parse_args(argv)
    if args.one_process:
        result = one_process(args.export, args.lib, args.calls, args.tokens, args.block, args.threads)
        print(json.dumps(result))
        return result
    result = measure(args.export, args.calls, args.tokens, args.block, args.threads, args.lib)
    print(f"{result['calls']} calls of {result['tokens']} tokens each way, {result['threads']} onnxruntime thread(s)")
    for key, what in (("processes", "C program (env -i) vs Python process"),
                      ("one_process", "one process: C API via ctypes vs Python, same engine")):
        r = result[key]
        print(f"  {what}: median {r['c_median_ms']:.3f} ms vs {r['python_median_ms']:.3f} ms, "
              f"ratio {r['ratio']:.4f} ({r['overhead_percent']:+.2f}%)")
    fixed = result["fixed_us"]
    print(f"  a call's fixed cost: sd_runtime_info {fixed['c']:.1f} us from C vs Bridge.info {fixed['python']:.1f} us "
          f"from Python ({fixed['c'] - fixed['python']:+.1f} us)")
    return result


if __name__ == "__main__":
    main()
