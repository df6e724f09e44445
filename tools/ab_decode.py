"""A/B decode speed and peak memory of two skipdeploy trees (e.g. before and after a change).

Each side is a worker process with its own PYTHONPATH (a skipdeploy source tree, e.g. one made
with ``git archive REV | tar -x -C DIR``) and export directory; the workers load once, then take
turns generating, round by round, so that machine drift hits both alike. Prints the median
ms/token of each side, the median of the per-round ratios, and each worker's peak resident
memory (VmHWM) after loading and after generating.

    python tools/ab_decode.py --a /tmp/base:/tmp/opt125-base --b .:/tmp/opt125-sd --batch 1 --rounds 7

``--env-b NAME=VALUE`` (repeatable) sets environment variables for side b only, to A/B a knob
with one tree: ``--a .:X --b .:X --env-b GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; ``--load-b
NAME=VALUE`` (repeatable, VALUE an integer or a string) passes an option to side b's
``skipdeploy.load``: ``--a .:X --b .:X --load-a block_bytes=0`` (a session per layer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import numpy as np
import skipdeploy
from skipdeploy import Schedule

def hwm(field="VmHWM:"):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0

directory, batch, prompt, new, threads, layers = sys.argv[1:7]
batch, prompt, new, threads, layers = int(batch), int(prompt), int(new), int(threads), int(layers)
rt = skipdeploy.load(directory, "onnxruntime", False, threads=threads, **json.loads(sys.argv[7]))  # positional: old trees call it verify
L = rt.spec.num_layers
sched = Schedule.full(L) if layers >= L else Schedule(L, layers, layers, decay_tokens=1, warmup_layers=0)
prompts = np.random.default_rng(batch).integers(4, min(50000, rt.spec.vocab_size), (batch, prompt)).tolist()
loaded = hwm()
print(json.dumps({"ready": True, "loaded_hwm": loaded, "module": skipdeploy.__file__}), flush=True)
for line in sys.stdin:
    if line.strip() != "go":
        break
    marks = []
    steps = rt.stream(prompts, new, sched, eos_token_id=None)
    for _ in steps:
        marks.append(time.perf_counter())
    print(json.dumps({"ms_per_token": 1e3 * (marks[-1] - marks[0]) / (len(marks) - 1), "hwm": hwm(), "rss": hwm("VmRSS:")}), flush=True)
"""


def load_options(pairs: list[str]) -> str:
    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        options[name] = int(value) if value.lstrip("-").isdigit() else value
    return json.dumps(options)


def start(spec: str, args, extra_env: list[str], load: list[str]) -> subprocess.Popen:
    path, _, directory = spec.partition(":")
    path = os.path.abspath(path)
    env = {**os.environ, "PYTHONPATH": path, **dict(item.split("=", 1) for item in extra_env)}
    # cwd = the tree: `python -c` puts the working directory first on sys.path.
    proc = subprocess.Popen([sys.executable, "-c", WORKER, os.path.abspath(directory), str(args.batch),
                             str(args.prompt_length), str(args.new_tokens), str(args.threads), str(args.layers),
                             load_options(load)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=path)
    proc.ready = json.loads(proc.stdout.readline())
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, metavar="PYTHONPATH:EXPORT")
    parser.add_argument("--b", required=True, metavar="PYTHONPATH:EXPORT")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--layers", type=int, default=1 << 30, help="run this many top layers (default: all)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--env-a", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--env-b", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--load-a", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--load-b", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    workers = {"a": start(args.a, args, args.env_a, args.load_a), "b": start(args.b, args, args.env_b, args.load_b)}
    times: dict[str, list[float]] = {"a": [], "b": []}
    hwm, rss = {}, {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for side in (("a", "b") if r % 2 else ("b", "a")):
            proc = workers[side]
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = json.loads(proc.stdout.readline())
            hwm[side] = result["hwm"]
            rss[side] = result["rss"]
            if r:
                times[side].append(result["ms_per_token"])
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    ratios = [a / b for a, b in zip(times["a"], times["b"])]
    for side in ("a", "b"):
        print(f"{side}: {statistics.median(times[side]):7.2f} ms/token (median of {args.rounds}); peak RSS "
              f"{workers[side].ready['loaded_hwm'] / 1e6:.0f} MB loaded, {hwm[side] / 1e6:.0f} MB after generating, resident "
              f"{rss[side] / 1e6:.0f} MB "
              f"({workers[side].ready['module']})")
    print(f"a/b time ratio, median of rounds: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); batch {args.batch}, layers {min(args.layers, 10**6)}")


if __name__ == "__main__":
    main()
