"""Weight quantization: the MatMulNBits exports (int8 and int4) made by the API and both commands,
their graph format and manifest, decoding on the static onnxruntime path, `inspect`, `verify` and
the refusals; int8-dynamic (DynamicQuantizeLinear + MatMulInteger) and int8 manifests written before
it had its name."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import skipdeploy
from skipdeploy.errors import BackendError, ExportError
from skipdeploy.exporter.nbits import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, dequantize, pack
from skipdeploy.manifest import read_manifest
from skipdeploy.verify import GRAPH_TOLERANCES, LOGITS_TOLERANCES

from .conftest import PROMPTS, needs_torch, run_cli, skip_without

LAYERS = {f"layer_{i:02d}.onnx" for i in range(4)}
BITS = {"int8": 8, "int4": 4}
# Teacher-forced greedy agreement with float32 (3 prompts x 16 steps). int4: measured 31/48 on the
# tiny export and 34/48 on tiny-post-ln (their torch-free stand-ins: 46/48 and 39/48); int4 moves a
# graph's outputs by ~10% of their scale on these random 64-wide models, so a third of the steps
# flipping is their nature; under half agreeing would mean a broken export. int8 (~1%): 48/48.
MIN_AGREEMENT = {"int4": 0.5, "int8": 0.9}
# Per-graph error against float32 as the manifest records it: (above, below). int8 measured
# 0.010-0.014 on the tiny exports, int4 0.08-0.18: int8 is an order of magnitude tighter.
GRAPH_ERRORS = {"int8": (1e-4, 2e-2), "int4": (2e-2, GRAPH_TOLERANCES["int4"])}


@pytest.fixture(scope="module")
def nbits_exports(exports, tmp_path_factory):
    root, made = tmp_path_factory.mktemp("nbits"), {}

    def get(scheme):
        if scheme not in made:
            made[scheme] = skipdeploy.quantize(exports["tiny"], root / f"tiny-{scheme}", weights=scheme,
                                               progress=False, log=lambda m: None).directory
        return made[scheme]
    return get


def _graph(path):
    return onnx.load(str(path))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_manifest_records_method_bits_block_size_accuracy_level_and_errors(exports, nbits_exports, scheme):
    m = read_manifest(nbits_exports(scheme))
    q = m.quantization
    assert q["weights"] == scheme and "MatMulNBits" in q["method"] and m.dtype == "float32"
    assert (q["bits"], q["block_size"], q["accuracy_level"], q["symmetric"]) == \
        (BITS[scheme], DEFAULT_BLOCK_SIZE, DEFAULT_ACCURACY_LEVEL, True)
    assert set(q["graphs"]) == LAYERS | {"head.onnx"} == set(q["max_error_vs_float"])
    low, high = GRAPH_ERRORS[scheme]
    assert all(low < e < high for e in q["max_error_vs_float"].values()), q["max_error_vs_float"]
    assert high <= GRAPH_TOLERANCES[scheme]  # within what verify accepts
    # int8: 1 + 4/32 bytes a weight with its scale, 3.6x fewer than float32; int4: 0.625, 6.4x
    assert q["weight_bytes"][scheme] * {"int8": 3, "int4": 4}[scheme] < q["weight_bytes"]["float32"]
    assert q["source"] == str(exports["tiny"])
    assert "data" not in m.graphs["head"] and m.graphs["embed"]["data"] == ["embeddings.bin"]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_graph_format_matmulnbits_for_every_matrix_and_the_head(exports, nbits_exports, scheme):
    spec, bits = read_manifest(exports["tiny"]).model, BITS[scheme]
    out, tag = nbits_exports(scheme), f"_Q{BITS[scheme]}"
    head = _graph(out / "head.onnx")
    [node] = [n for n in head.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft" and list(node.input[1:3]) == [f"lm_head.weight{tag}", "lm_head.weight_scales"]
    assert attrs == {"K": spec.hidden_size, "N": spec.vocab_size, "bits": bits, "block_size": DEFAULT_BLOCK_SIZE,
                     "accuracy_level": DEFAULT_ACCURACY_LEVEL}
    inits = {i.name: numpy_helper.to_array(i) for i in head.graph.initializer}
    packed = inits[f"lm_head.weight{tag}"]
    assert packed.shape == (spec.vocab_size, spec.hidden_size // DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE * bits // 8)
    assert "lm_head.weight" not in inits and not any(n.op_type == "Gemm" for n in head.graph.node)
    tied = numpy_helper.to_array(next(i for i in _graph(exports["tiny"] / "head.onnx").graph.initializer
                                      if i.name == "lm_head.weight"))
    w = dequantize(packed, inits["lm_head.weight_scales"], None, spec.hidden_size, bits)
    # Symmetric: a block's largest |weight| maps to the lowest value (-8, -128) and one step is it /
    # 8 or / 128; values of the other sign clip at +7 / +127, so a weight may be off by up to one
    # step (by half a step elsewhere).
    step = np.abs(tied).max() / 2 ** (bits - 1)
    assert w.shape == tied.T.shape and np.abs(w - tied.T).max() <= step * (1 + 1e-6)
    layer = _graph(out / "layer_01.onnx")
    quantized = [n for n in layer.graph.node if n.op_type == "MatMulNBits"]
    assert [n.input[1] for n in quantized] == [f"{w}.weight{tag}" for w in ("qkv", "out_proj", "fc1", "fc2")]
    assert [n.input[5] for n in quantized] == [f"{w}.bias" for w in ("qkv", "out_proj", "fc1", "fc2")]
    names = {i.name for i in layer.graph.initializer}
    assert not names & {"qkv.weight", "out_proj.weight", "fc1.weight", "fc2.weight"}
    assert not any(n.op_type in ("Gemm", "MatMulInteger") for n in layer.graph.node)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_is_what_onnxruntime_multiplies_by(bits, symmetric):
    """``dequantize`` of ``pack``'s tensors equals onnxruntime's own MatMulNBits with float compute,
    K not a whole number of blocks included (the padding)."""
    rng = np.random.default_rng(bits)
    K, N, bs = 80, 24, 32
    w = rng.standard_normal((K, N)).astype(np.float32)
    packed, scales, zero_points = pack(w, bits, bs, symmetric)
    assert packed.shape == (N, 3, bs * bits // 8) and scales.shape == (N, 3)
    deq = dequantize(packed, scales, None if symmetric else zero_points, K, bits)
    assert np.abs(deq - w).max() <= np.abs(scales).max() * (1 + 1e-6)  # at most one step off
    tensors = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    if not symmetric:
        tensors.append(numpy_helper.from_array(zero_points, "Z"))
    node = helper.make_node("MatMulNBits", ["A", "B", "S"] + ([] if symmetric else ["Z"]), ["Y"],
                            domain="com.microsoft", K=K, N=N, bits=bits, block_size=bs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [None, N])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((3, K)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"A": a})[0], a @ deq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decoding_agrees_with_float32(exports, nbits_exports, scheme):
    float_rt, q_rt = skipdeploy.load(exports["tiny"]), skipdeploy.load(nbits_exports(scheme))
    steps = 16
    got = q_rt.generate(PROMPTS, steps, eos_token_id=None, output_logits=True)
    first = float_rt.generate(PROMPTS, 1, eos_token_id=None, output_logits=True)
    scale = max(1.0, float(np.abs(first.logits[0]).max()))
    assert np.abs(got.logits[0] - first.logits[0]).max() / scale < LOGITS_TOLERANCES[scheme]  # the same prefill
    agree = 0
    for step in range(steps):  # float32's choice after the quantized export's own prefix
        want = float_rt.generate([p + t[:step] for p, t in zip(PROMPTS, got.tokens)], 1, eos_token_id=None)
        agree += sum(w[0] == g[step] for w, g in zip(want.tokens, got.tokens))
    assert agree >= MIN_AGREEMENT[scheme] * steps * len(PROMPTS), agree


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_command_and_inspect(exports, tmp_path, scheme):
    out = tmp_path / scheme
    result = run_cli("quantize", exports["tiny"], "--out", out, "--weights", scheme)
    assert result.exit_code == 0, result.output
    assert f"{scheme} weights" in result.output and read_manifest(out).quantization["weights"] == scheme
    shown = run_cli("inspect", out).output
    assert (f"{scheme} in 5 graphs (blocks of {DEFAULT_BLOCK_SIZE}, symmetric, accuracy_level "
            f"{DEFAULT_ACCURACY_LEVEL}); max error vs float32") in shown
    assert "in the quantized layer and head graphs; float32:" in shown
    assert "vs float32, per graph: layer_00 " in shown and ", head " in shown
    assert json.loads(run_cli("inspect", out, "--json").stdout)["quantization"]["bits"] == BITS[scheme]
    again = run_cli("quantize", out, "--out", tmp_path / "again", "--weights", scheme)
    assert again.exit_code == 1 and f"already quantized ({scheme})" in again.output
    refused = run_cli("quantize", exports["tiny"], "--out", tmp_path / "bad", "--weights", scheme, "--per-tensor")
    assert refused.exit_code == 1 and "--per-tensor is for int8-dynamic weights" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "bad").exists()


def test_int8_dynamic_command_inspect_and_per_tensor(exports, tmp_path):
    for flags, how in (([], "per channel"), (["--per-tensor"], "per tensor")):
        out = tmp_path / f"dynamic{len(flags)}"
        result = run_cli("quantize", exports["tiny"], "--out", out, "--weights", "int8-dynamic", *flags)
        assert result.exit_code == 0, result.output
        q = read_manifest(out).quantization
        assert q["weights"] == "int8-dynamic" and "DynamicQuantizeLinear" in q["method"] and "bits" not in q
        assert q["per_channel"] == (how == "per channel")
        assert f"int8-dynamic in 5 graphs ({how}, activations per call)" in run_cli("inspect", out).output
        ops = {n.op_type for n in _graph(out / "layer_01.onnx").graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "MatMulNBits" not in ops
    refused = run_cli("quantize", exports["tiny"], "--out", tmp_path / "bad", "--weights", "int3")
    assert refused.exit_code == 2 and "Invalid value for '--weights'" in refused.output


def test_api_refusals(exports, nbits_exports, tmp_path):
    with pytest.raises(ExportError, match="already quantized"):
        skipdeploy.quantize(nbits_exports("int4"), tmp_path / "again", weights="int4", progress=False,
                            log=lambda m: None)
    with pytest.raises(ExportError, match="weights must be one of int8, int4, int8-dynamic"):
        skipdeploy.quantize(exports["tiny"], tmp_path / "x", weights="int3")
    for scheme in ("int8", "int4"):
        with pytest.raises(ExportError, match=f"int{BITS[scheme]} block size must be one of"):
            skipdeploy.quantize(exports["tiny"], tmp_path / "x", weights=scheme, block_size=48)
        with pytest.raises(ExportError, match=f"per-tensor scales are an int8-dynamic option; {scheme} weights"):
            skipdeploy.quantize(exports["tiny"], tmp_path / "x", weights=scheme, per_channel=False)
    with pytest.raises(ExportError, match="are int8/int4 options"):
        skipdeploy.quantize(exports["tiny"], tmp_path / "x", weights="int8-dynamic", block_size=32)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_torch_backend_and_tensorrt_build_refuse_nbits(nbits_exports, scheme):
    from skipdeploy.engines.tensorrt_build import build_engines

    with pytest.raises(BackendError, match=rf"is a quantized export \({scheme} weights for the CPU\)"):
        build_engines(nbits_exports(scheme))
    skip_without("torch")
    with pytest.raises(BackendError, match=f"has {scheme} weights; the torch backend runs float exports"):
        skipdeploy.load(nbits_exports(scheme), backend="torch")


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
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_verify_passes_and_fails_a_perturbed_one(nbits_exports, tmp_path, scheme):
    from .conftest import edited_export

    export = nbits_exports(scheme)
    report = json.loads(run_cli("verify", export, "--json").stdout)
    assert report["ok"], report
    assert all(g["tolerance"] == GRAPH_TOLERANCES[scheme] for g in report["graphs"])
    assert all(d["tolerance"] == LOGITS_TOLERANCES[scheme] and d["reference"] == "torch backend"
               for d in report["decode"])
    low = {"int8": 1e-3, "int4": 1e-2}[scheme]  # the weights' rounding, not float32 noise
    assert all(g["error"] > low for g in report["graphs"][1:])
    # Twice the scales of one matrix: weights a plausible export could hold, but wrong.
    broken = edited_export(export, tmp_path / "broken", "layer_02.onnx", "fc2.weight_scales", lambda s: s * 2)
    result = run_cli("verify", broken)
    assert result.exit_code == 1 and "verification failed beyond tolerance: layer_02.onnx" in result.output


@needs_torch
def test_an_int8_manifest_from_before_int8_dynamic_is_int8_dynamic(exports, tmp_path):
    """An export written when "int8" meant dynamic quantization keeps its meaning: inspect names it
    int8-dynamic and verify applies int8-dynamic's tolerances."""
    out = skipdeploy.quantize(exports["tiny"], tmp_path / "old", weights="int8-dynamic", progress=False,
                              log=lambda m: None).directory
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["quantization"]["weights"] = "int8"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert "int8-dynamic in 5 graphs (per channel, activations per call)" in run_cli("inspect", out).output
    report = json.loads(run_cli("verify", out, "--json").stdout)
    assert report["ok"], report
    assert all(g["tolerance"] == GRAPH_TOLERANCES["int8-dynamic"] for g in report["graphs"])


@pytest.mark.parametrize("weights", ["int4", "int8", "int8-dynamic"])
def test_llama_rope_permutation_stays_exact(tmp_path, weights):
    """Only the family's weights are quantized: RoPE's rotate-half MatMul by a constant signed
    permutation would lose its exactness (int4 clips its +1s to 7/8)."""
    from .numpy_export import random_export

    source = random_export(tmp_path / "llama", "tiny-llama", seed=0).directory
    out = skipdeploy.quantize(source, tmp_path / weights, weights=weights, progress=False, log=lambda m: None)
    layer = _graph(out.directory / "layer_00.onnx")
    [rope] = [n for n in layer.graph.node if "rope.rotate_half" in n.input]
    assert rope.op_type == "MatMul"
    quantized = {"int4": "MatMulNBits", "int8": "MatMulNBits", "int8-dynamic": "MatMulInteger"}[weights]
    assert sum(n.op_type == quantized for n in layer.graph.node) >= 3  # qkv, out_proj, the MLP
    rt = skipdeploy.load(out.directory)
    assert len(rt.generate([[1, 5, 6, 7]], 4, eos_token_id=None).tokens[0]) == 4
