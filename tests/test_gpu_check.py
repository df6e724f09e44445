"""tools/gpu_check.sh and tools/gpu_bench.py, the one prepared script a lent GPU machine runs.

A device call is cut at its time limit, so what these tests hold the scripts to is: the budget is
split so that every phase fits (``--plan`` runs the script's own arithmetic), and the benchmark's
results file is valid JSON holding everything measured so far after every step. The benchmark's
CPU smoke path runs the same code as the GPU run, on a tiny shape.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import needs_torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_bench_report", ROOT / "tools" / "gpu_bench_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(*args: str, **env: str) -> tuple[dict[str, int | None], int]:
    """``gpu_check.sh --plan``: each phase's limit in seconds (None: skipped), and the total."""
    result = subprocess.run(["bash", str(SCRIPT), "--plan", *args], capture_output=True, text=True, timeout=30,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    limits, total = {}, None
    for line in result.stdout.splitlines():
        if m := re.fullmatch(r"plan: total (\d+)", line):
            total = int(m.group(1))
        elif m := re.fullmatch(r"plan: (.+?): skipped \(.*\)", line):
            limits[m.group(1)] = None
        elif m := re.fullmatch(r"plan: (.+) (\d+)", line):
            limits[m.group(1)] = int(m.group(2))
    return limits, total


@pytest.mark.slow  # spawns processes
def test_gpu_check_script_parses_and_its_budget_fits():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    for budget in (300, 540, 900):
        limits, total = _plan("--budget", str(budget), SHAPES="opt-125m smollm2-135m", BIG_SHAPE="opt-1.3b")
        # Every phase at its limit still leaves the reserve for the summary.
        assert total == sum(v for v in limits.values() if v) <= budget - 10
        assert limits["environment"] and limits["gpu tests"] >= 30
        # The small shapes always get their minimum, before the big one and the rest of the suite.
        assert limits["bench opt-125m"] >= 60 and limits["bench smollm2-135m"] >= 60
        assert list(limits)[2:4] == ["bench opt-125m", "bench smollm2-135m"]
    # The big shape is measured only when time remains for it: not in the worst case of 540 s,
    # where every earlier phase takes its whole limit, but with a larger budget.
    assert _plan("--budget", "540")[0]["bench opt-1.3b"] is None
    assert _plan("--budget", "900")[0]["bench opt-1.3b"] >= 150
    assert _plan("--budget", "540", BIG_SHAPE="")[0].keys() == {"environment", "gpu tests", "bench opt-125m",
                                                               "bench smollm2-135m", "rest of the suite"}
    limits, total = _plan()  # the default fits one device call of 540 s, the kill grace included
    default = int(re.search(r"budget of (\d+) s", subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True,
                                                                 text=True, timeout=30).stdout).group(1))
    assert default <= 530 and total <= default - 10
    bad = subprocess.run(["bash", str(SCRIPT), "--budget", "ten"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "whole number of seconds" in bad.stderr


def test_results_file_is_whole_after_every_step_and_keeps_other_runs(tmp_path):
    report = _report_module()
    path = tmp_path / "bench.json"
    other = {"shape": "opt-125m", "dtype": "float16", "device": "cuda", "status": "done", "rows": []}
    path.write_text(json.dumps({"runs": [other]}))
    results = report.Results(path, lambda msg: None, shape="tiny", dtype="float32", device="cpu", gpu="CPU",
                             prompt=4, new_tokens=2)
    results.layers = {"full": 4, "2x": 2.0}
    seen = []
    with results.phase("checkpoint"):
        pass
    for backend, schedule, seconds in [("hf", "full", 0.4), ("torch-static", "full", 0.2),
                                       ("torch-static", "2x", 0.1), ("hf", "full", 0.6)]:
        results.record(backend, schedule, 1, seconds)
        runs = json.loads(path.read_text())["runs"]  # a reader at any moment gets whole JSON
        assert runs[0] == other
        seen.append({(r["backend"], r["schedule"]): r for r in runs[1]["rows"]})
    assert [len(rows) for rows in seen] == [1, 2, 3, 3]
    assert seen[1][("torch-static", "full")]["vs_hf"] == 2.0  # 200 ms/token against 100
    assert seen[3][("hf", "full")]["repeats"] == 2 and seen[3][("hf", "full")]["ms_per_token"] == 250.0
    assert seen[3][("torch-static", "2x")]["vs_own_full"] == 2.0
    results.set(status="done")
    run = json.loads(path.read_text())["runs"][1]
    assert run["status"] == "done" and list(run["phases"]) == ["checkpoint"]
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left behind
    assert "| 1 | torch-static | 2x | 2.0 |" in report.table(run)


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("shape", ["tiny", "tiny-llama"])
@needs_torch
def test_gpu_bench_cpu_smoke_path(tmp_path, shape):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_bench.py"), "--device", "cpu", "--shape", shape, "--batches",
         "1,2", "--new-tokens", "6", "--prompt", "4", "--repeats", "1", "--workdir", str(tmp_path / "work"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["status"] == "done" and run["shape"] == shape and run["device"] == "cpu" and not run["errors"]
    contenders = {(r["batch"], r["backend"], r["schedule"]) for r in run["rows"]}
    for batch in (1, 2):
        assert {(batch, "hf", "full"), (batch, "torch-static", "full"), (batch, "torch-static", "2x")} <= contenders
    assert all(r["ms_per_token"] > 0 for r in run["rows"])
    assert all(c["passed"] for c in run["checks"]) and len(run["checks"]) >= 3
    assert {"checkpoint", "export", "load hf", "warm-up torch-static", "rounds"} <= set(run["phases"])
    # TensorRT is absent here (or cannot run on a CPU): one line, and the others still measured.
    assert any(s.startswith("tensorrt: ") for s in run["skipped"])


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("argv, message", [(["--shape", "no-such-shape", "--device", "cpu"], "unknown shape"),
                                           (["--shape", "tiny", "--device", "cuda"], "no CUDA GPU")])
@needs_torch
def test_gpu_bench_refusals_are_one_line(argv, message):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("checks the refusal when there is no GPU; this machine has one")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_bench.py"), *argv], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


@needs_torch
def test_random_checkpoint_built_directly_in_float16(tmp_path):
    import torch
    from safetensors.torch import load_file

    from skipdeploy.random_checkpoint import make_checkpoint

    path = make_checkpoint(tmp_path / "ckpt", "tiny-llama", tokenizer=False, dtype="float16", device="cpu")
    weights = load_file(path / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert torch.get_default_dtype() == torch.float32  # restored for whatever runs next
    with pytest.raises(ValueError, match="unsupported checkpoint dtype"):
        make_checkpoint(tmp_path / "bad", "tiny", tokenizer=False, dtype="int8")
    assert torch.get_default_dtype() == torch.float32
