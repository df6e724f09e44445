"""In-flight batching on quantized exports: the in-flight engine cuts ``layer_in``/``layer_out``
out of the export's own layer graphs (``slot_graphs.cut_layer``), so int8, int4 and int8-dynamic
layers run the very nodes the static path runs, and requests get ``Runtime.generate``'s tokens.

How exact depends on the scheme, not on the engine (DESIGN.md section 11):
- int4 with float32 compute (``accuracy_level=0``): as float32, every request equals its solo run,
  greedy and seeded, whatever shares the batch;
- int8 and int4 as exported by default (MatMulNBits, ``accuracy_level=4``: the kernel rounds
  activations to int8 per row and block): no row depends on the others of its call (on the static
  path a row's logits are bit-equal alone and in a batch), but the attention's float rounding
  (onnxruntime's GroupQueryAttention here, standard ops in the static graph) can move an
  activation across an int8 rounding step, so greedy requests are compared with a wider near-tie
  margin and seeded ones are not compared (a seeded tiny-llama int8 request drew another token);
- int8-dynamic (``DynamicQuantizeLinear``: one activation scale per call, over all of the call's
  rows): a row's numbers depend on the rows that share its call, in the static path's batches as
  here; a request running alone (``max_batch=1``) equals its solo run exactly.
The tiny models are a torch-free OPT and Llama export (random numpy weights), quantized here.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import skipdeploy
from skipdeploy.exporter.slot_graphs import cut_layer
from skipdeploy.manifest import read_manifest
from skipdeploy.serving import ServingEngine

from . import numpy_export
from .test_serving_engine import SCHEDULES, _check_against_solo, _requests

SHAPES = ["tiny", "tiny-llama"]
# scheme -> quantize_export options (None: the float32 export itself)
SCHEMES = {"float32": None, "int8": {"weights": "int8"}, "int4": {"weights": "int4"},
           "int4-fp32": {"weights": "int4", "accuracy_level": 0}, "int8-dynamic": {"weights": "int8-dynamic"}}
QUANTIZED_OPS = {"int8": "MatMulNBits", "int4": "MatMulNBits", "int4-fp32": "MatMulNBits",
                 "int8-dynamic": "MatMulInteger"}
# Relative top-2 margin under which one int8 rounding step of MatMulNBits' activations may flip a token.
INT8_ACTIVATIONS_NEAR_TIE = 2e-2


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("inflight-quantized")
    floats = {s: numpy_export.random_export(root / s, s, seed=3).directory for s in SHAPES}
    made = {}

    def get(shape, scheme):
        if (shape, scheme) not in made:
            options = SCHEMES[scheme]
            made[shape, scheme] = floats[shape] if options is None else skipdeploy.quantize(
                floats[shape], root / f"{shape}-{scheme}", progress=False, log=lambda m: None, **options).directory
        return made[shape, scheme]
    return get


def _session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("shape", SHAPES)
def test_the_cut_runs_the_layer_graph_s_own_nodes(quantized, shape, scheme):
    """layer_in's keys and values are bit for bit the static layer graph's, quantized nodes included."""
    manifest = read_manifest(quantized(shape, scheme), verify=False)
    spec, path = manifest.model, manifest.layer_path(1)
    layer = onnx.load(str(path))
    layer_in, layer_out = cut_layer(layer, spec, "float32")
    if scheme in QUANTIZED_OPS:
        ops = {n.op_type for n in layer_in.graph.node} & {n.op_type for n in layer_out.graph.node}
        assert QUANTIZED_OPS[scheme] in ops
    T, H, D = 5, spec.kv_heads, spec.head_dim
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((1, T, spec.hidden_size)).astype(np.float32)
    positions = np.arange(3, 3 + T, dtype=np.int64)[None]
    empty = np.zeros((0, 1, H, D), np.float32)
    feeds = {"hidden": hidden, "past_key": empty, "past_value": empty, "attention_bias": np.zeros((1, T), np.float32)}
    rows = {"hidden": hidden[0]}
    if manifest.layers_take_positions:
        feeds["position_ids"], rows["position_ids"] = positions, positions[0]
    _, key, value = _session(layer).run(None, feeds)
    _, cut_key, cut_value = _session(layer_in).run(None, rows)
    np.testing.assert_array_equal(cut_key, key[:, 0].reshape(T, -1))
    np.testing.assert_array_equal(cut_value, value[:, 0].reshape(T, -1))


def _jobs(shape, n, seed, seeded=True):
    bos = 1 if shape == "tiny-llama" else 2
    jobs = [([bos, *p[1:]], m, s, k) for p, m, s, k in _requests(n, seed)]
    return jobs if seeded else [(p, m, s, {}) for p, m, s, _ in jobs]


def _waves(engine, jobs, waves):
    submitted, size = [], len(jobs) // waves
    for wave in range(waves):  # each wave arrives while the previous ones are decoding
        for prompt, max_new, name, knobs in jobs[wave * size:(wave + 1) * size]:
            submitted.append(engine.submit(prompt, max_new, SCHEDULES[name], **knobs))
        next(submitted[-size].stream(timeout=60))
    return [r.result(timeout=120) for r in submitted]


@pytest.mark.parametrize("scheme", ["int8", "int4-fp32", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_nbits_requests_in_flight_get_their_solo_tokens(quantized, shape, scheme):
    export = quantized(shape, scheme)
    seeded = scheme == "int4-fp32"  # float32 compute; the others round activations (the module's docstring)
    jobs = _jobs(shape, 12, seed=7, seeded=seeded)
    engine = ServingEngine(export, max_batch=4, prefill_chunk=6)
    try:
        results = _waves(engine, jobs, 3)
    finally:
        engine.shutdown()
    _check_against_solo(skipdeploy.load(export), jobs, results,
                        **({} if seeded else {"near_tie": INT8_ACTIVATIONS_NEAR_TIE}))


@pytest.mark.parametrize("shape", SHAPES)
def test_nbits_rows_do_not_depend_on_their_batch_and_dynamic_ones_do(quantized, shape):
    """MatMulNBits rounds activations per row: a prompt's logits alone and batched with others are
    bit-equal; int8-dynamic's one scale per call moves them."""
    bos = 1 if shape == "tiny-llama" else 2
    rng = np.random.default_rng(0)
    prompts = [[bos, *rng.integers(4, 200, 11).tolist()] for _ in range(4)]
    moved = {}
    for scheme in ("int8", "int4", "int8-dynamic"):
        runtime = skipdeploy.load(quantized(shape, scheme), threads=1)
        alone = runtime.generate(prompts[:1], 3, eos_token_id=None, output_logits=True).logits
        batched = runtime.generate(prompts, 3, eos_token_id=None, output_logits=True).logits
        moved[scheme] = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(alone, batched))
    assert moved["int8"] == moved["int4"] == 0.0 and moved["int8-dynamic"] > 1e-3, moved


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_dynamic_requests_running_alone_get_their_solo_tokens(quantized, shape):
    export = quantized(shape, "int8-dynamic")
    jobs = _jobs(shape, 6, seed=8)
    engine = ServingEngine(export, max_batch=1)
    try:
        results = [r.result(timeout=120) for r in [engine.submit(p, m, SCHEDULES[s], **k) for p, m, s, k in jobs]]
    finally:
        engine.shutdown()
    runtime = skipdeploy.load(export)
    for (prompt, max_new, name, knobs), got in zip(jobs, results):
        assert got.tokens == runtime.generate([prompt], max_new, SCHEDULES[name], **knobs).tokens, (name, knobs)


# -- doors: the OpenAI server and the C API's bridge on an int4 export --------------------------------
DOOR_JOBS = [([2, 45, 67, 89], 6, None), ([2, 300, 11, 12, 13, 14, 15], 8, {"target_speedup": 2}),
             ([2, 7], 5, {"table": [4, 3, 2, 1]})]


def _solo(export, prompt, max_new, schedule):
    return skipdeploy.load(export).generate([prompt], max_new, schedule, temperature=0, eos_token_id=None).tokens[0]


@pytest.mark.slow
def test_openai_server_on_an_int4_export(quantized, tmp_path):
    pytest.importorskip("fastapi", reason="serve needs the serve extra (pip install 'skipdeploy[serve]')")
    from .test_serve import Server

    export = quantized("tiny", "int4")
    server = Server(export, "--model-name", "tiny-int4", "--max-batch", "2", log_path=tmp_path / "server.log")
    try:
        for prompt, max_new, schedule in DOOR_JOBS:
            body = {"model": "tiny-int4", "prompt": prompt, "max_tokens": max_new, "temperature": 0,
                    "ignore_eos": True, **({"skipdecode": schedule} if schedule else {})}
            status, _, reply = server.post(body, key=None)
            assert status == 200, reply
            assert reply["choices"][0]["skipdecode"]["token_ids"] == _solo(export, prompt, max_new, schedule)
    finally:
        assert server.stop() == 0, server.log()


def test_c_bridge_on_an_int4_export(quantized):
    import json

    from skipdeploy.capi import bridge

    export = quantized("tiny", "int4")
    b = bridge.Bridge()
    handle = b.load(str(export), '{"threads": 1, "max_batch": 2}')
    try:
        for prompt, max_new, schedule in DOOR_JOBS:
            params = {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True, **(schedule or {})}
            assert b.generate(handle, prompt, json.dumps(params)) == _solo(export, prompt, max_new, schedule)
    finally:
        b.free(handle)


def _without_cut_names(export, out):
    """A copy of ``export`` whose layer graphs name their inner tensors as exports written before
    ``graphs.LAYER_CUT`` did (the manifest's sha256 updated)."""
    import json
    import shutil

    from skipdeploy.exporter.graphs import LAYER_CUT
    from skipdeploy.manifest import describe_file

    shutil.copytree(export, out)
    manifest = json.loads((out / "manifest.json").read_text())
    old = {new: f"tensor_{i}" for i, new in enumerate(LAYER_CUT.values())}
    for entry in manifest["graphs"]["layers"]:
        path = out / entry["file"]
        model = onnx.load(str(path))
        for node in model.graph.node:
            for values in (node.input, node.output):
                values[:] = [old.get(n, n) for n in values]
        onnx.save(model, str(path))
        manifest["files"][entry["file"]] = describe_file(path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_exports_from_before_the_cut_names(quantized, shape, tmp_path):
    """Their float layers are rebuilt from the weights (the same tokens); quantized ones are refused in one line."""
    old = _without_cut_names(quantized(shape, "float32"), tmp_path / "float32")
    prompt, max_new, name, _ = _jobs(shape, 1, seed=9)[0]
    engine = ServingEngine(old, max_batch=1)
    try:
        got = engine.generate(prompt, max_new, SCHEDULES[name]).tokens
    finally:
        engine.shutdown()
    assert got == skipdeploy.load(old).generate([prompt], max_new, SCHEDULES[name]).tokens
    old_int4 = _without_cut_names(quantized(shape, "int4"), tmp_path / "int4")
    with pytest.raises(skipdeploy.BackendError, match="re-export and quantize again"):
        ServingEngine(old_int4, max_batch=1)
