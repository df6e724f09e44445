"""Bad input and faults: one clear error each, nothing half-written accepted; concurrency."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner

import skipdeploy
from skipdeploy import Schedule
from skipdeploy.cli import main
from skipdeploy.errors import CapacityError, ExportError, ManifestError, NumericalError

from .conftest import PROMPTS, edited_export, with_nan_column


def _copy(export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    return copy


def test_unknown_format_version(exports, tmp_path):
    copy = _copy(exports["tiny"], tmp_path)
    data = json.loads((copy / "manifest.json").read_text())
    data["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="format_version 99; this skipdeploy reads versions 1, 2"):
        skipdeploy.load(copy)
    result = CliRunner().invoke(main, ["inspect", str(copy)])
    assert result.exit_code == 1 and "format_version 99" in result.output


def test_a_version_1_opt_export_still_loads_and_decodes_the_same(exports, tmp_path):
    """What the previous release wrote: format 1, a model description without the family fields."""
    copy = _copy(exports["tiny"], tmp_path)
    data = json.loads((copy / "manifest.json").read_text())
    data["format_version"] = 1
    for key in ("num_kv_heads", "norm_eps", "rope", "sliding_window"):
        del data["model"][key]
    (copy / "manifest.json").write_text(json.dumps(data))
    old = skipdeploy.load(copy).generate(PROMPTS, 6, eos_token_id=None).tokens
    assert old == skipdeploy.load(exports["tiny"]).generate(PROMPTS, 6, eos_token_id=None).tokens


def test_cache_that_does_not_fit_says_what_it_needs(exports):
    rt = skipdeploy.load(exports["tiny"], memory_limit=10_000)
    # 3 rows x (10 + 7) positions x 4 layers x 2 (K and V) x 64 floats x 4 bytes
    with pytest.raises(CapacityError, match=r"needs 102.0 KiB for this request and only 9.8 KiB is available"):
        rt.generate(PROMPTS, 8, Schedule.full(4))


def test_nan_logits_name_the_step_and_the_first_layer(exports, tmp_path):
    copy = edited_export(exports["tiny"], tmp_path / "nan", "layer_02.onnx", "fc1.weight", with_nan_column)
    rt = skipdeploy.load(copy)
    with pytest.raises(NumericalError, match="generated token 0: first produced by decoder layer 2"):
        rt.generate(PROMPTS, 4)
    # A schedule that skips layer 2 after the prompt still fails at the prefill, which runs it.
    with pytest.raises(NumericalError, match="decoder layer 2"):
        rt.generate(PROMPTS, 4, Schedule(4, 1, 1, decay_tokens=1))


def test_cli_empty_prompt_and_empty_ids(exports):
    for args in (["--prompt", ""], ["--input-ids", ""]):
        result = CliRunner().invoke(main, ["generate", str(exports["tiny"]), *args])
        assert result.exit_code == 1 and "empty" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_killed_export_leaves_nothing_accepted_and_rerun_succeeds(checkpoints, tmp_path):
    out = tmp_path / "killed"
    code = (f"import skipdeploy, time\n"
            f"import skipdeploy.exporter.writer as e\n"
            f"orig = e._save\n"
            f"def slow(proto, path):\n"
            f"    orig(proto, path)\n"
            f"    if path.name == 'layer_01.onnx':\n"
            f"        print('written', flush=True); time.sleep(60)\n"
            f"e._save = slow\n"
            f"skipdeploy.export({str(checkpoints['tiny'])!r}, {str(out)!r}, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    partials = list(tmp_path.glob(".killed.partial-*"))
    assert not out.exists() and len(partials) == 1
    for target in (out, partials[0]):
        with pytest.raises(ManifestError):
            skipdeploy.load(target)
        for command in ("inspect", "generate"):
            args = [command, str(target)] + (["--input-ids", "2,3"] if command == "generate" else [])
            assert CliRunner().invoke(main, args).exit_code == 1
    skipdeploy.export(checkpoints["tiny"], out, progress=False, log=lambda m: None)
    assert skipdeploy.load(out).generate([[2, 3]], 2).tokens
    assert not list(tmp_path.glob(".killed.partial-*")), "the stale partial export was not cleaned up"



def _paused_export(checkpoint, out, pause):
    """A process exporting ``checkpoint`` to ``out`` that prints 'written' once layer_01.onnx is
    staged, then runs ``pause`` (Python source) before going on."""
    code = (f"import sys, time\n"
            f"import skipdeploy\n"
            f"import skipdeploy.exporter.writer as e\n"
            f"orig = e._save\n"
            f"def slow(proto, path):\n"
            f"    orig(proto, path)\n"
            f"    if path.name == 'layer_01.onnx':\n"
            f"        print('written', flush=True); {pause}\n"
            f"e._save = slow\n"
            f"skipdeploy.export({str(checkpoint)!r}, {str(out)!r}, progress=False, log=lambda m: None)\n"
            f"print('exported', flush=True)\n")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_sigterm_during_export_removes_the_partial_directory(checkpoints, tmp_path):
    out = tmp_path / "terminated"
    proc = _paused_export(checkpoints["tiny"], out, "time.sleep(60)")
    try:
        assert proc.stdout.readline().strip() == "written"
        assert len(list(tmp_path.glob(".terminated.partial-*"))) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM  # cleaned up, then exited
    finally:
        _stop(proc)
    assert list(tmp_path.iterdir()) == [], "the export left files behind on SIGTERM"


@pytest.mark.slow
def test_second_export_to_the_same_directory_is_refused(checkpoints, exports, tmp_path):
    """Two exports to one --out: while the first writes it, the second (export, quantize, CLI) is
    refused by name and leaves nothing; the first then completes undisturbed."""
    out = tmp_path / "shared"
    proc = _paused_export(checkpoints["tiny"], out, "sys.stdin.readline()")
    try:
        assert proc.stdout.readline().strip() == "written"
        busy = f"{out} is being written by another export \\(process {proc.pid}\\)"
        with pytest.raises(ExportError, match=busy):
            skipdeploy.export(checkpoints["tiny"], out, progress=False, log=lambda m: None)
        with pytest.raises(ExportError, match=busy):
            skipdeploy.export(checkpoints["tiny"], out, force=True, progress=False, log=lambda m: None)
        with pytest.raises(ExportError, match=busy):
            skipdeploy.quantize(exports["tiny"], out, progress=False, log=lambda m: None)
        result = CliRunner().invoke(main, ["export", str(checkpoints["tiny"]), "--out", str(out)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.strip().splitlines()[-1] == f"Error: {out} is being written by another export " \
            f"(process {proc.pid}); wait for it to finish or write to another directory"
        assert not out.exists() and len(list(tmp_path.glob(".shared.partial-*"))) == 1
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "exported"
        assert proc.wait(timeout=60) == 0
    finally:
        _stop(proc)
    assert skipdeploy.load(out).generate([[2, 3]], 2).tokens
    assert [p.name for p in tmp_path.iterdir()] == ["shared"], "partial or lock files left behind"
    with pytest.raises(ExportError, match="already exists"):
        skipdeploy.export(checkpoints["tiny"], out, progress=False, log=lambda m: None)


@pytest.mark.slow
def test_concurrent_exports_exactly_one_succeeds(checkpoints, tmp_path):
    """Two unsynchronised export processes to one directory: one exports, the other is refused."""
    out = tmp_path / "race"
    code = (f"import skipdeploy\n"
            f"from skipdeploy.errors import ExportError\n"
            f"try:\n"
            f"    skipdeploy.export({str(checkpoints['tiny'])!r}, {str(out)!r}, progress=False, log=lambda m: None)\n"
            f"except ExportError as exc:\n"
            f"    print('refused:', exc); raise SystemExit(3)\n"
            f"print('exported')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            _stop(proc)
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 3], outputs
    refused = next(o for o in outputs if o.startswith("refused:"))
    assert "is being written by another export" in refused or "already exists" in refused
    assert skipdeploy.load(out).generate([[2, 3]], 2).tokens
    assert [p.name for p in tmp_path.iterdir()] == ["race"]


def test_one_runtime_from_four_threads(exports):
    rt = skipdeploy.load(exports["tiny"])
    jobs = [([[2, 7, 8, 9]], Schedule.full(4)), (PROMPTS, Schedule(4, 3, 1, decay_tokens=4)),
            ([[2, 50], [2, 60, 61]], Schedule(4, 2, 1, decay_tokens=2, warmup_layers=0)),
            (PROMPTS[::-1], Schedule(4, 4, 2, decay_tokens=6))]
    alone = [rt.generate(p, 10, s, output_logits=True, eos_token_id=None) for p, s in jobs]
    results: dict[int, list] = {}
    errors = []

    def work(i):
        try:
            results[i] = [rt.generate(jobs[i][0], 10, jobs[i][1], output_logits=True, eos_token_id=None)
                          for _ in range(3)]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for i, runs in results.items():
        for run in runs:
            assert run.tokens == alone[i].tokens
            assert all(np.array_equal(a, b) for a, b in zip(run.logits, alone[i].logits))
