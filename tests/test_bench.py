"""`skipdeploy bench`, its cost model, the int8 export and the export layout the runtime's memory
relies on. Fast and free of timing assertions: only structure and arithmetic are checked."""

from __future__ import annotations

import json
import shutil

import click
import numpy as np
import pytest
from click.testing import CliRunner

import skipdeploy
from skipdeploy import Schedule
from skipdeploy.bench import (BenchError, agreement, bandwidth_probe, bytes_per_second, cost_model,
                              cost_model_speedup, format_table, probe_shape, probe_weight, run_bench, step_macs,
                              weight_bytes)
from skipdeploy.cli import main
from skipdeploy.errors import BackendError, ExportError, InputError, SkipDeployError
from skipdeploy.exporter.quantize import quantize_export
from skipdeploy.manifest import ModelSpec, read_manifest
from skipdeploy.verify import LOGITS_TOLERANCES

from .conftest import PROMPTS, run_cli

OPT_125M = ModelSpec(num_layers=12, hidden_size=768, num_heads=12, head_dim=64, ffn_dim=3072, vocab_size=50272,
                     max_positions=2048, word_embed_proj_dim=768, layer_norm="pre", activation="relu",
                     bos_token_id=2, eos_token_id=2, pad_token_id=1)


@pytest.fixture(scope="module")
def int8_export(exports, tmp_path_factory):
    return skipdeploy.quantize(exports["tiny"], tmp_path_factory.mktemp("int8") / "tiny-int8", progress=False,
                              log=lambda m: None).directory


def test_cost_model_of_an_opt_125m_shape():
    c = cost_model(OPT_125M)
    assert c["layer"] == 4 * 768 * 768 + 2 * 768 * 3072 == 7_077_888
    assert c["head"] == 768 * 50272 and c["embed"] == 0
    assert step_macs(OPT_125M, 12, 10) == 12 * (c["layer"] + 10 * 2 * 768) + c["head"]
    assert cost_model_speedup(OPT_125M, Schedule.full(12), 32, 64) == 1.0
    # Half the layers is not half the work: the head is ~5.5 layers' worth.
    half = Schedule(12, 6, 6, decay_tokens=1, warmup_layers=0)
    assert 1.50 < cost_model_speedup(OPT_125M, half, 32, 64) < 1.56
    # project_in/project_out (opt-350m) are counted in embed and head.
    post = ModelSpec(**{**OPT_125M.__dict__, "word_embed_proj_dim": 512})
    assert cost_model(post)["embed"] == 768 * 512 and cost_model(post)["head"] == 512 * 50272 + 768 * 512


def test_agreement_counts_positions_prefixes_and_rows():
    assert agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]) == pytest.approx(
        {"positions_equal": 5 / 6, "prefix_before_first_difference": (1 + 1 / 3) / 2, "rows_equal": 0.5})


@pytest.mark.slow
def test_bench_rows_ratios_and_hf_baseline(exports, checkpoints):
    results = run_bench(exports["tiny"], batch_sizes=[1, 2], target_speedups=[2], prompt_length=4, new_tokens=5,
                        repeats=2, warmup=0, threads=1, checkpoint=str(checkpoints["tiny"]), memory=False,
                        probe_bytes=1 << 20, progress=False, log=lambda m: None)
    json.dumps(results)  # serializable as written by --json
    rows = {(r["batch"], r["contender"]): r for r in results["rows"]}
    assert set(rows) == {(b, c) for b in (1, 2) for c in ("full", "skip 2x", "hf generate")}
    skip_schedule = Schedule.target_speedup(4, 2.0, decay_tokens=4)  # the 4 decode steps of 5 new tokens
    for batch in (1, 2):
        full, skip, hf = rows[batch, "full"], rows[batch, "skip 2x"], rows[batch, "hf generate"]
        for row in (full, skip, hf):
            ms = row["ms_per_token"]
            assert 0 < ms["median"] <= ms["p99"] and ms["p90"] <= ms["p99"]
            assert row["tokens_per_s"] > 0 and row["ttft_ms"] > 0 and len(row["runs"]) == 2
            assert row["vs_hf"] > 0
        assert full["speedup_vs_full"] == 1.0 and full["cost_model_speedup"] == 1.0 and hf["vs_hf"] == 1.0
        assert skip["schedule"] == skip_schedule.to_dict()
        assert skip["layers_per_token"] == pytest.approx(np.mean([skip_schedule.count(s) for s in range(4)]))
        assert skip["cost_model_speedup"] == pytest.approx(cost_model_speedup(read_manifest(exports["tiny"]).model,
                                                                              skip_schedule, 4, 5))
        assert 1 < skip["cost_model_speedup"] < skip["layer_speedup"]
        assert skip["fraction_of_cost_model"] == pytest.approx(skip["speedup_vs_full"] / skip["cost_model_speedup"])
        assert skip["bytes_per_token"] < full["bytes_per_token"]
        assert hf["speedup_vs_full"] is None and hf["bytes_per_token"] is None
        samples = results["bandwidth_bytes_per_s"][str(batch)]  # one probe after each round
        assert len(samples) == 2 and min(samples) > 0
        assert full["memory_floor_ms_per_token"] == pytest.approx(
            1e3 * full["bytes_per_token"] / float(np.median(samples)))
        assert full["fraction_of_floor"] > 0 and hf["fraction_of_floor"] is None
    hf_agreement = [a for a in results["agreement"] if a["contender"] == "hf generate"]
    assert len(hf_agreement) == 2 and all(0 <= a["positions_equal"] <= 1 for a in hf_agreement)
    assert results["config"]["hf_baseline"] and results["cost_model"]["head_in_layers"] > 0
    table = format_table(results)
    assert "hf generate" in table and "skip 2x" in table
    # The load note discounts the benchmark's own threads from the load average after it.
    env = results["environment"]
    for before, after, noted in ((0.2, env["threads"] + 0.1, False), (0.2, env["threads"] + env["cores"], True),
                                 (env["cores"], 0.0, True)):
        env.update(load_average_before=before, load_average_after=after)
        assert ("other work shared the machine" in format_table(results)) is noted


@pytest.mark.slow
def test_bench_cli_with_int8_output_plot_and_memory(exports, int8_export, tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = CliRunner().invoke(main, [
        "bench", str(exports["tiny"]), "--batch-sizes", "2", "--target-speedup", "2", "--prompt-length", "3",
        "--max-new-tokens", "4", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-hf", "--no-bandwidth",
        "--quantize", "int8", "--int8-export", str(int8_export), "--output", str(out_json), "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    assert [r["contender"] for r in data["rows"]] == ["full", "skip 2x", "int8 full", "int8 skip 2x"]
    int8 = data["rows"][2]
    assert int8["export"] == "int8" and int8["speedup_vs_full"] > 0 and int8["cost_model_speedup"] is None
    assert int8["bytes_per_token"] < data["rows"][0]["bytes_per_token"]
    assert [a["contender"] for a in data["agreement"]] == ["int8 full"]
    assert {(m["export"], m["batch"]) for m in data["memory"]} == {("float32", 2), ("int8", 2)}
    for m in data["memory"]:
        assert m["peak_rss_bytes"] > m["weights_bytes"] > 0 and m["kv_cache_bytes"] > 0
        assert m["budget_bytes"] == m["weights_bytes"] + m["kv_cache_bytes"] + 300_000_000
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "int8 full" in result.stdout and "memory float32, batch 2" in result.stdout and data["errors"] == []


def test_bench_quantize_int8_dynamic_and_an_old_int8_export(exports, tmp_path):
    """--quantize takes the three schemes; an export under DIR/int8 written when int8 meant dynamic
    quantization is not reused as int8."""
    results = run_bench(exports["tiny"], batch_sizes=[1], target_speedups=[], prompt_length=3, new_tokens=2,
                        repeats=1, warmup=0, threads=1, quantize="int8-dynamic", quantized_dir=tmp_path, hf=False,
                        memory=False, bandwidth=False, progress=False, log=lambda m: None)
    assert [r["contender"] for r in results["rows"]] == ["full", "int8-dynamic full"]
    assert results["rows"][1]["export"] == "int8-dynamic"
    assert [a["contender"] for a in results["agreement"]] == ["int8-dynamic full"]
    q = read_manifest(tmp_path / "int8-dynamic").quantization
    assert q["weights"] == "int8-dynamic" and "MatMulInteger" in q["method"]
    old = tmp_path / "int8"  # the same export, its manifest as skipdeploy wrote it before int8-dynamic
    shutil.copytree(tmp_path / "int8-dynamic", old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["quantization"]["weights"] = "int8"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"is not an int8 export \(int8-dynamic weights\)"):
        run_bench(exports["tiny"], target_speedups=[], quantize="int8", quantized_dir=tmp_path, hf=False,
                  memory=False, bandwidth=False, progress=False)


def test_bench_refuses_bad_options(exports, int8_export):
    for kwargs in ({"batch_sizes": [0]}, {"new_tokens": 1}, {"target_speedups": [1.0]}, {"quantize": "int3"},
                   {"quantize": ["int8", "int8"]}):
        with pytest.raises(InputError):
            run_bench(exports["tiny"], hf=False, memory=False, bandwidth=False, progress=False, **kwargs)
    with pytest.raises(InputError, match="quantized export"):
        run_bench(int8_export, hf=False, memory=False, bandwidth=False, progress=False)
    with pytest.raises(InputError, match="quantized from another export"):
        run_bench(exports["tiny-post-ln"], target_speedups=[2], quantize="int8", int8_export=int8_export, hf=False,
                  memory=False, bandwidth=False, progress=False)
    result = CliRunner().invoke(main, ["bench", str(exports["tiny"]), "--batch-sizes", "1,x"])
    assert result.exit_code == 1 and "comma-separated" in result.output


def test_bandwidth_probe_arithmetic_and_its_matmul():
    """No timing assertion: the probe's clock is replaced, so bytes/s is exact arithmetic."""
    assert probe_shape(4 << 20) == (8192, 128) and probe_shape(1) == (8192, 1)
    assert bytes_per_second(10, [0.5, 0.25, 1.0]) == 40.0  # the fastest run
    probe = bandwidth_probe(1, nbytes=4 << 20)
    assert probe.shape == (8192, 128) and probe.nbytes == 4 * 8192 * 128
    ticks = iter([10.0, 10.5, 20.0, 20.25, 30.0, 31.0])  # runs of 0.5, 0.25 and 1 s
    probe.clock = lambda: next(ticks)
    assert probe(3) == 4 * 8192 * 128 / 0.25
    # The session really reads the matrix: its product is numpy's with the probe's weight.
    x = np.random.default_rng(1).standard_normal((1, 8192)).astype(np.float32)
    want = x.astype(np.float64) @ probe_weight(8192, 128).astype(np.float64)
    np.testing.assert_allclose(probe.multiply(x), want, rtol=1e-4, atol=1e-3)


QUICK = ["--batch-sizes", "1", "--prompt-length", "2", "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0",
         "--threads", "1", "--no-hf", "--no-bandwidth"]


def test_bench_flags_old_spellings_and_help():
    from skipdeploy.cli.bench import command

    shown = CliRunner().invoke(main, ["bench", "--help"]).output
    assert "--max-new-tokens" in shown and "--target-speedup K,K" in shown and "--output FILE" in shown
    assert "--new-tokens" not in shown and "--target-speedups" not in shown and "--json " in shown
    assert all(p.help for p in command.params if isinstance(p, click.Option))
    assert CliRunner().invoke(main, ["bench", "x", "--threads", "0"]).exit_code == 2


def test_bench_old_flag_spellings_still_parse(exports):
    old = CliRunner().invoke(main, ["bench", str(exports["tiny"]), "--new-tokens", "1"])
    assert old.exit_code == 1 and "new tokens must be >= 2" in old.output
    old = CliRunner().invoke(main, ["bench", str(exports["tiny"]), "--target-speedups", "2,1"])
    assert old.exit_code == 1 and "target speedups must be > 1 (got 1)" in old.output


def test_bench_json_prints_the_results_instead_of_the_table(exports):
    result = CliRunner().invoke(main, ["bench", str(exports["tiny"]), *QUICK, "--target-speedup", "", "--no-memory",
                                       "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["contender"] for r in data["rows"]] == ["full"] and data["errors"] == [] and data["memory"] == []
    assert data["config"]["new_tokens"] == 3 and data["config"]["target_speedups"] == []


def test_a_failed_memory_probe_fails_bench_after_printing_the_table(exports, tmp_path, monkeypatch):
    import skipdeploy.bench.run as bench_run

    def failing_probe(*args, **kwargs):
        raise SkipDeployError("memory probe failed: ManifestError: boom")

    monkeypatch.setattr(bench_run, "memory_in_subprocess", failing_probe)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(exports["tiny"]), *QUICK, "--target-speedup", "2",
                                       "--output", str(out)])
    message = "float32 export, batch 1: memory probe failed: ManifestError: boom"
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1] == f"Error: {message}"
    assert "skip 2x" in result.stdout and f"error: {message}" in result.stdout  # the table, with the error
    data = json.loads(out.read_text())
    assert data["memory"] == [] and data["errors"] == [message] and len(data["rows"]) == 2
    with pytest.raises(BenchError, match="boom") as raised:  # the library raises too, results attached
        run_bench(exports["tiny"], batch_sizes=[1, 2], target_speedups=[], prompt_length=2, new_tokens=2,
                  repeats=1, warmup=0, threads=1, hf=False, bandwidth=False, progress=False)
    assert str(raised.value).endswith("boom (and 1 more)") and len(raised.value.results["rows"]) == 2


@pytest.mark.slow
def test_bench_memory_probe_with_a_relative_export_path(exports, monkeypatch):
    """The probe's process runs in another directory: a relative path must still name the export."""
    monkeypatch.chdir(exports["tiny"].parent)
    result = CliRunner().invoke(main, ["bench", exports["tiny"].name, *QUICK, "--target-speedup", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    [m] = data["memory"]
    assert (m["export"], m["batch"]) == ("float32", 1) and data["errors"] == []
    assert m["weights_bytes"] == weight_bytes(read_manifest(exports["tiny"]))
    assert m["peak_rss_bytes"] > m["weights_bytes"] and m["kv_cache_bytes"] > 0
    assert m["budget_bytes"] == m["weights_bytes"] + m["kv_cache_bytes"] + 300_000_000


def test_int8_export_runs_on_onnxruntime_and_is_recorded(exports, int8_export):
    m = read_manifest(int8_export)
    q = m.quantization
    assert q["weights"] == "int8" and set(q["graphs"]) == {f"layer_{i:02d}.onnx" for i in range(4)} | {"head.onnx"}
    assert max(q["max_error_vs_float"].values()) < 0.05 and m.dtype == "float32"
    assert read_manifest(exports["tiny"]).quantization is None
    float_rt, int8_rt = skipdeploy.load(exports["tiny"]), skipdeploy.load(int8_export)
    want = float_rt.generate(PROMPTS, 4, eos_token_id=None, output_logits=True)
    got = int8_rt.generate(PROMPTS, 4, eos_token_id=None, output_logits=True)
    scale = np.abs(want.logits[0]).max()
    assert np.abs(got.logits[0] - want.logits[0]).max() < 0.1 * scale  # same prefill, int8 weights
    with pytest.raises(BackendError, match="torch backend runs float exports"):
        skipdeploy.load(int8_export, backend="torch")
    with pytest.raises(ExportError, match="already quantized"):
        quantize_export(int8_export, int8_export.parent / "again", progress=False, log=lambda m: None)


def test_quantize_command_inspect_and_verify_against_the_float_export(exports, tmp_path):
    out = tmp_path / "int8"
    result = run_cli("quantize", exports["tiny"], "--out", out)
    assert result.exit_code == 0, result.output
    assert "int8 weights" in result.output and read_manifest(out).quantization["source"] == str(exports["tiny"])
    shown = run_cli("inspect", out).output
    assert "int8 in 5 graphs (blocks of 32, symmetric, accuracy_level 4); max error vs float32" in shown
    assert "before quantization" in shown
    report = json.loads(run_cli("verify", out, "--json").stdout)
    assert report["ok"], report
    errors = [g["error"] for g in report["graphs"][1:]]  # embed.onnx is copied unchanged
    # Really int8 (far above float32 noise), yet within the int8 tolerance; logits likewise.
    assert all(1e-4 < e <= g["tolerance"] for e, g in zip(errors, report["graphs"][1:]))
    assert all(d["reference"] == "torch backend" and d["tolerance"] == LOGITS_TOLERANCES["int8"]
               for d in report["decode"])
    assert run_cli("quantize", exports["tiny"], "--out", out).exit_code == 1  # exists, no --force
    again = run_cli("quantize", out, "--out", tmp_path / "again")
    assert again.exit_code == 1 and "already quantized" in again.output


def test_verify_fails_on_a_perturbed_int8_graph(int8_export, tmp_path):
    from .conftest import edited_export

    broken = edited_export(int8_export, tmp_path / "broken", "layer_02.onnx", "fc2.bias", lambda b: b + 1.0)
    result = run_cli("verify", broken)
    assert result.exit_code == 1 and "verification failed beyond tolerance: layer_02.onnx" in result.output


def test_export_quantize_and_its_reference(checkpoints, exports, tmp_path):
    out = tmp_path / "direct-int8"
    result = run_cli("export", checkpoints["tiny"], "--out", out, "--quantize", "int8")
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    assert m.quantization["weights"] == "int8" and m.quantization["source"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["direct-int8"]  # the float32 staging export is gone
    missing = run_cli("verify", out)
    assert missing.exit_code == 1 and "--reference DIR, or the checkpoint with --model" in missing.output
    assert json.loads(run_cli("verify", out, "--reference", exports["tiny"], "--json").stdout)["ok"]
    assert json.loads(run_cli("verify", out, "--model", checkpoints["tiny"], "--json").stdout)["ok"]
    other = run_cli("verify", out, "--reference", exports["tiny-post-ln"])
    assert other.exit_code == 1 and "was not quantized from" in other.output
    for bad in (["--dtype", "float16"], ["--tensorrt"]):
        refused = run_cli("export", checkpoints["tiny"], "--out", tmp_path / "bad", "--quantize", "int8", *bad)
        assert refused.exit_code == 1 and "Traceback" not in refused.output


def test_tied_embedding_is_stored_once_and_shared(exports):
    """embed.onnx and head.onnx read one embeddings.bin (ONNX external data): the runtime maps it
    once instead of holding the largest matrix twice."""
    m = read_manifest(exports["tiny"])
    assert m.graphs["embed"]["data"] == ["embeddings.bin"] == m.graphs["head"]["data"]
    assert "embeddings.bin" in m.files and "data" not in m.graphs["layers"][0]
    matrix = m.model.vocab_size * m.model.word_embed_proj_dim * 4
    assert m.files["embeddings.bin"]["size"] == matrix and m.files["head.onnx"]["size"] < matrix // 4

