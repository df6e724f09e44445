"""Measurements of the machine next to the timings: memory bandwidth, peak resident memory (in a
fresh process per export and batch size), the environment and the load average."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import SkipDeployError
from ..numerics import itemsize
from ..schedule import Schedule
from .cost import weight_bytes
from .runners import prompts_for

MEMORY_HEADROOM = 300_000_000  # bytes allowed above weights + KV cache for the peak resident memory
PROBE_BYTES = 256 << 20        # weight matrix of the bandwidth probe: well past any last-level cache
PROBE_ROWS = 8192              # K of the probe's [K, N] float32 matrix


# -- bandwidth -------------------------------------------------------------------------------------
def probe_shape(nbytes: int) -> tuple[int, int]:
    """``(K, N)`` of the float32 probe matrix: K = 8192 rows, as many columns as fit in ``nbytes``
    (at least one)."""
    return PROBE_ROWS, max(1, nbytes // (4 * PROBE_ROWS))


def probe_weight(k: int, n: int) -> np.ndarray:
    """The probe's matrix. Random values: pages of one repeated value can be merged by the host
    (KSM) and then read from cache, which made a constant-filled probe report 90 GB/s here."""
    return np.random.default_rng(0).random((k, n), np.float32)


def bytes_per_second(nbytes: int, seconds: Sequence[float]) -> float:
    """The bandwidth of reading ``nbytes`` in the fastest of the timed runs ``seconds``."""
    return nbytes / min(seconds)


class BandwidthProbe:
    """``probe(repeats) -> bytes/s``: the best of ``repeats`` runs of a [1, K] x [K, N] MatMul over a
    float32 matrix of about ``nbytes`` (256 MiB: past any cache) in onnxruntime, with the runtime's
    session settings. ``run_bench`` measures after every round, because the bandwidth a VM gets
    drifts with its neighbours (45 to 71 GB/s within minutes here), and pairs each round with its
    own sample. ``clock`` times the runs (``time.perf_counter``)."""

    def __init__(self, threads: int | None, nbytes: int = PROBE_BYTES,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        from onnx import TensorProto, helper, numpy_helper
        import onnxruntime as ort

        from ..engines.onnxruntime_engine import session_options

        k, n = self.shape = probe_shape(nbytes)
        self.nbytes = 4 * k * n  # the matrix built, which every run reads once
        self.clock = clock
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                                  [numpy_helper.from_array(probe_weight(k, n), "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = min(model.ir_version, 10)
        blob = model.SerializeToString()
        del graph, model  # the session keeps the one copy of the matrix
        self.session = ort.InferenceSession(blob, session_options(threads), providers=["CPUExecutionProvider"])
        del blob
        self._x = np.ones((1, k), np.float32)
        self.multiply(self._x)  # warm-up

    def multiply(self, x: np.ndarray) -> np.ndarray:
        """``x @ probe_weight(K, N)`` for ``x`` of shape [1, K], computed by the probe's session."""
        return self.session.run(None, {"x": np.asarray(x, np.float32)})[0]

    def __call__(self, repeats: int) -> float:
        seconds = []
        for _ in range(repeats):
            start = self.clock()
            self.multiply(self._x)
            seconds.append(self.clock() - start)
        return bytes_per_second(self.nbytes, seconds)


def bandwidth_probe(threads: int | None, nbytes: int = PROBE_BYTES) -> BandwidthProbe | None:
    """A :class:`BandwidthProbe`, or None when onnx (to build it) is missing."""
    if importlib.util.find_spec("onnx") is None:
        return None
    return BandwidthProbe(threads, nbytes)


# -- peak memory -----------------------------------------------------------------------------------
def memory_probe(directory: str, batch: int, prompt_length: int, new_tokens: int, threads: int | None,
                 seed: int) -> dict[str, int]:
    """Peak resident memory of loading ``directory`` and one full-schedule ``generate`` (run this
    in a fresh process: the peak is the process's)."""
    from ..runtime import cache_bytes, load, plan_capacities

    runtime = load(directory, check_files=False, threads=threads)
    spec = runtime.spec
    full = Schedule.full(spec.num_layers)
    runtime.generate(prompts_for(batch, prompt_length, spec.vocab_size, seed), new_tokens, full, eos_token_id=None)
    peak = peak_rss()
    kv = cache_bytes(plan_capacities(full, prompt_length, new_tokens), batch, spec.kv_heads, spec.head_dim,
                     itemsize(runtime.manifest.dtype))
    return {"peak_rss_bytes": int(peak), "weights_bytes": weight_bytes(runtime.manifest), "kv_cache_bytes": int(kv)}


def peak_rss() -> int:
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


def memory_in_subprocess(directory: str | os.PathLike, batch: int, prompt_length: int, new_tokens: int,
                         threads: int | None, seed: int, timeout: float = 1800) -> dict[str, Any]:
    """``memory_probe`` in a fresh Python, plus the budget (weights + KV cache + headroom) and whether
    the peak is within it. Raises SkipDeployError with the probe's last line if it fails."""
    # Absolute: the child runs in the directory above this skipdeploy (so that it imports this
    # one, whatever the caller's directory holds), where a relative export path means nothing.
    args = json.dumps([str(Path(directory).resolve()), batch, prompt_length, new_tokens, threads, seed])
    code = ("import json, sys; from skipdeploy.bench.probes import memory_probe; "
            "print(json.dumps(memory_probe(*json.loads(sys.argv[1]))))")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=timeout,
                              cwd=root, env=env)
    except subprocess.TimeoutExpired:
        raise SkipDeployError(f"memory probe timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SkipDeployError(f"memory probe failed: {tail}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["budget_bytes"] = data["weights_bytes"] + data["kv_cache_bytes"] + MEMORY_HEADROOM
    data["within_budget"] = data["peak_rss_bytes"] <= data["budget_bytes"]
    return data


# -- the machine -----------------------------------------------------------------------------------
def environment(threads: int) -> dict[str, Any]:
    import onnxruntime

    env: dict[str, Any] = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                           "numpy": np.__version__, "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
                           "platform": platform.platform()}
    for name in ("torch", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            env[name] = getattr(module, "__version__", "?")
    return env


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
