"""int4 exports (MatMulNBits): made by the API and both commands, their graph format and manifest,
decoding on the static onnxruntime path, `inspect`, `verify` and the refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import skipdeploy
from skipdeploy.errors import BackendError, ExportError
from skipdeploy.exporter.int4 import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, dequantize_int4
from skipdeploy.manifest import read_manifest
from skipdeploy.verify import INT4_GRAPH_TOLERANCE, INT4_LOGITS_TOLERANCE

from .conftest import PROMPTS, needs_torch, run_cli, skip_without

LAYERS = {f"layer_{i:02d}.onnx" for i in range(4)}
# Teacher-forced greedy agreement with float32 (3 prompts x 16 steps): measured 31/48 on the tiny
# export and 34/48 on tiny-post-ln (their torch-free stand-ins: 46/48 and 39/48). int4 moves a
# graph's outputs by ~10% of their scale on these random 64-wide models, so a third of the
# steps flipping is their nature; under half agreeing would mean a broken export.
MIN_AGREEMENT = 0.5


@pytest.fixture(scope="module")
def int4_export(exports, tmp_path_factory):
    return skipdeploy.quantize(exports["tiny"], tmp_path_factory.mktemp("int4") / "tiny-int4", weights="int4",
                               progress=False, log=lambda m: None).directory


def _graph(path):
    return onnx.load(str(path))


def test_manifest_records_method_block_size_accuracy_level_and_errors(exports, int4_export):
    m = read_manifest(int4_export)
    q = m.quantization
    assert q["weights"] == "int4" and "MatMulNBits" in q["method"] and m.dtype == "float32"
    assert (q["block_size"], q["accuracy_level"], q["symmetric"]) == (DEFAULT_BLOCK_SIZE, DEFAULT_ACCURACY_LEVEL, True)
    assert set(q["graphs"]) == LAYERS | {"head.onnx"} == set(q["max_error_vs_float"])
    # Really int4 (int8 is ~1e-2 here), yet within what verify accepts.
    assert all(2e-2 < e < INT4_GRAPH_TOLERANCE for e in q["max_error_vs_float"].values()), q["max_error_vs_float"]
    assert q["weight_bytes"]["int4"] * 4 < q["weight_bytes"]["float32"]
    assert q["source"] == str(exports["tiny"])
    assert "data" not in m.graphs["head"] and m.graphs["embed"]["data"] == ["embeddings.bin"]


def test_graph_format_matmulnbits_for_every_matrix_and_the_head(exports, int4_export):
    spec = read_manifest(exports["tiny"]).model
    head = _graph(int4_export / "head.onnx")
    [node] = [n for n in head.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft" and list(node.input[1:3]) == ["lm_head.weight_Q4", "lm_head.weight_scales"]
    assert attrs == {"K": spec.hidden_size, "N": spec.vocab_size, "bits": 4, "block_size": DEFAULT_BLOCK_SIZE,
                     "accuracy_level": DEFAULT_ACCURACY_LEVEL}
    inits = {i.name: numpy_helper.to_array(i) for i in head.graph.initializer}
    assert "lm_head.weight" not in inits and not any(n.op_type == "Gemm" for n in head.graph.node)
    tied = numpy_helper.to_array(next(i for i in _graph(exports["tiny"] / "head.onnx").graph.initializer
                                      if i.name == "lm_head.weight"))
    w = dequantize_int4(inits["lm_head.weight_Q4"], inits["lm_head.weight_scales"], None, spec.hidden_size)
    # Symmetric: a block's largest |weight| maps to -8 and one step is it / 8; values of the other
    # sign clip at +7, so a weight may be off by up to one step (by half a step elsewhere).
    step = np.abs(tied).max() / 8
    assert w.shape == tied.T.shape and np.abs(w - tied.T).max() <= step * (1 + 1e-6)
    layer = _graph(int4_export / "layer_01.onnx")
    quantized = [n for n in layer.graph.node if n.op_type == "MatMulNBits"]
    assert [n.input[1] for n in quantized] == [f"{w}.weight_Q4" for w in ("qkv", "out_proj", "fc1", "fc2")]
    assert [n.input[5] for n in quantized] == [f"{w}.bias" for w in ("qkv", "out_proj", "fc1", "fc2")]
    names = {i.name for i in layer.graph.initializer}
    assert not names & {"qkv.weight", "out_proj.weight", "fc1.weight", "fc2.weight"}
    assert not any(n.op_type == "Gemm" for n in layer.graph.node)


def test_decoding_agrees_with_float32_on_most_tokens(exports, int4_export):
    float_rt, int4_rt = skipdeploy.load(exports["tiny"]), skipdeploy.load(int4_export)
    steps = 16
    got = int4_rt.generate(PROMPTS, steps, eos_token_id=None, output_logits=True)
    first = float_rt.generate(PROMPTS, 1, eos_token_id=None, output_logits=True)
    scale = max(1.0, float(np.abs(first.logits[0]).max()))
    assert np.abs(got.logits[0] - first.logits[0]).max() / scale < INT4_LOGITS_TOLERANCE  # the same prefill
    agree = 0
    for step in range(steps):  # float32's choice after int4's own prefix
        want = float_rt.generate([p + t[:step] for p, t in zip(PROMPTS, got.tokens)], 1, eos_token_id=None)
        agree += sum(w[0] == g[step] for w, g in zip(want.tokens, got.tokens))
    assert agree >= MIN_AGREEMENT * steps * len(PROMPTS), agree


def test_quantize_command_and_inspect(exports, tmp_path):
    out = tmp_path / "int4"
    result = run_cli("quantize", exports["tiny"], "--out", out, "--weights", "int4")
    assert result.exit_code == 0, result.output
    assert "int4 weights" in result.output and read_manifest(out).quantization["weights"] == "int4"
    shown = run_cli("inspect", out).output
    assert (f"int4 in 5 graphs (blocks of {DEFAULT_BLOCK_SIZE}, symmetric, accuracy_level {DEFAULT_ACCURACY_LEVEL}); "
            "max error vs float32") in shown
    assert "in the quantized layer and head graphs; float32:" in shown
    assert "vs float32, per graph: layer_00 " in shown and ", head " in shown
    assert json.loads(run_cli("inspect", out, "--json").stdout)["quantization"]["block_size"] == DEFAULT_BLOCK_SIZE
    again = run_cli("quantize", out, "--out", tmp_path / "again", "--weights", "int4")
    assert again.exit_code == 1 and "already quantized (int4)" in again.output
    for bad, says in ((["--weights", "int3"], "Invalid value for '--weights'"),
                      (["--weights", "int4", "--per-tensor"], "--per-tensor is for int8 weights")):
        refused = run_cli("quantize", exports["tiny"], "--out", tmp_path / "bad", *bad)
        assert refused.exit_code in (1, 2) and says in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "bad").exists()


def test_api_refusals(exports, int4_export, tmp_path):
    with pytest.raises(ExportError, match="already quantized"):
        skipdeploy.quantize(int4_export, tmp_path / "again", weights="int4", progress=False, log=lambda m: None)
    with pytest.raises(ExportError, match="weights must be one of int8, int4"):
        skipdeploy.quantize(exports["tiny"], tmp_path / "x", weights="int3")
    with pytest.raises(ExportError, match="block size must be one of"):
        skipdeploy.quantize(exports["tiny"], tmp_path / "x", weights="int4", block_size=48)
    with pytest.raises(ExportError, match="are int4 options"):
        skipdeploy.quantize(exports["tiny"], tmp_path / "x", weights="int8", block_size=32)
    assert not (tmp_path / "x").exists()


def test_torch_backend_and_tensorrt_build_refuse_int4(int4_export):
    from skipdeploy.engines.tensorrt_build import build_engines

    with pytest.raises(BackendError, match=r"is a quantized export \(int4 weights for the CPU\)"):
        build_engines(int4_export)
    skip_without("torch")
    with pytest.raises(BackendError, match="has int4 weights; the torch backend runs float exports"):
        skipdeploy.load(int4_export, backend="torch")


@needs_torch
def test_export_weights_int4_and_its_alias(checkpoints, exports, tmp_path):
    for option in ("--weights", "--quantize"):
        out = tmp_path / option.strip("-")
        result = run_cli("export", checkpoints["tiny"], "--out", out, option, "int4")
        assert result.exit_code == 0, result.output
        assert "int4 weights" in result.output
        q = read_manifest(out).quantization
        assert q["weights"] == "int4" and q["source"] is None and q["block_size"] == DEFAULT_BLOCK_SIZE
    report = json.loads(run_cli("verify", tmp_path / "weights", "--reference", exports["tiny"], "--json").stdout)
    assert report["ok"], report


@needs_torch
def test_verify_passes_int4_and_fails_a_perturbed_one(int4_export, tmp_path):
    from .conftest import edited_export

    report = json.loads(run_cli("verify", int4_export, "--json").stdout)
    assert report["ok"], report
    assert all(g["tolerance"] == INT4_GRAPH_TOLERANCE for g in report["graphs"])
    assert all(d["tolerance"] == INT4_LOGITS_TOLERANCE and d["reference"] == "torch backend"
               for d in report["decode"])
    assert all(g["error"] > 1e-2 for g in report["graphs"][1:])  # int4 rounding, not float32 noise
    # Twice the scales of one matrix: weights a plausible export could hold, but wrong.
    broken = edited_export(int4_export, tmp_path / "broken", "layer_02.onnx", "fc2.weight_scales", lambda s: s * 2)
    result = run_cli("verify", broken)
    assert result.exit_code == 1 and "verification failed beyond tolerance: layer_02.onnx" in result.output


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_llama_rope_permutation_stays_exact(tmp_path, weights):
    """Only the family's weights are quantized: RoPE's rotate-half MatMul by a constant signed
    permutation would lose its exactness (int4 clips its +1s to 7/8)."""
    from .numpy_export import random_export

    source = random_export(tmp_path / "llama", "tiny-llama", seed=0).directory
    out = skipdeploy.quantize(source, tmp_path / weights, weights=weights, progress=False, log=lambda m: None)
    layer = _graph(out.directory / "layer_00.onnx")
    [rope] = [n for n in layer.graph.node if "rope.rotate_half" in n.input]
    assert rope.op_type == "MatMul"
    quantized = {"int4": "MatMulNBits", "int8": "MatMulInteger"}[weights]
    assert sum(n.op_type == quantized for n in layer.graph.node) >= 3  # qkv, out_proj, the MLP
    rt = skipdeploy.load(out.directory)
    assert len(rt.generate([[1, 5, 6, 7]], 4, eos_token_id=None).tokens[0]) == 4
