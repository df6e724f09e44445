"""Blocks of layers (``engines.layer_blocks``): the onnxruntime engine stitches consecutive layer
graphs into one session, each layer behind an ``If`` on its own flag.

The reference is the same engine with every layer a block of its own (``block_layers=1``: one
``If`` per session, the per-layer sessions' nodes), which the rest of the suite holds against
transformers. Blocks run the same kernels in the same order, so results are equal bit for bit,
whatever the schedule skips. Torch-free: random numpy exports (``numpy_export``).
"""

from __future__ import annotations

import numpy as np
import pytest

import skipdeploy
from skipdeploy.engines.layer_blocks import Block, plan_blocks, read_block
from skipdeploy.errors import InputError
from skipdeploy.exporter import writer
from skipdeploy.schedule import Schedule

from . import numpy_export

PROMPTS = [[2, 45, 67, 89, 101, 7], [2, 300], [2, 11, 12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    made = {}

    def get(shape, scheme="float32"):
        if (shape, scheme) not in made:
            if scheme == "float32":
                made[shape, scheme] = numpy_export.random_export(root / shape, shape, seed=4).directory
            else:
                made[shape, scheme] = skipdeploy.quantize(get(shape), root / f"{shape}-{scheme}", weights=scheme,
                                                          progress=False, log=lambda m: None).directory
        return made[shape, scheme]
    return get


def test_plan_blocks_cuts_runs_of_layers():
    assert plan_blocks(5, 2) == [Block(0, 1), Block(2, 3), Block(4, 4)]
    assert plan_blocks(3, 1) == [Block(0, 0), Block(1, 1), Block(2, 2)]
    assert plan_blocks(3) == plan_blocks(3, 7) == [Block(0, 2)]


def _generate(runtime, num_layers):
    schedule = Schedule(num_layers, num_layers - 1, 1, decay_tokens=5, warmup_layers=1)  # skips from step 0
    return runtime.generate(PROMPTS, 8, schedule, output_logits=True, eos_token_id=None)


@pytest.mark.parametrize("shape,scheme", [("tiny", "float32"), ("tiny-llama", "float32"), ("tiny-llama", "int4"),
                                          ("tiny", "int8")])
@pytest.mark.parametrize("block_layers", [None, 2])
def test_blocks_decode_as_one_session_per_layer(export, shape, scheme, block_layers):
    directory = export(shape, scheme)
    stitched, alone = skipdeploy.load(directory, block_layers=block_layers), skipdeploy.load(directory, block_layers=1)
    layers = stitched.spec.num_layers
    assert len(stitched.engine.blocks) == (1 if block_layers is None else -(-layers // 2))
    assert len(alone.engine.blocks) == layers
    got, want = _generate(stitched, layers), _generate(alone, layers)
    assert min(got.layers_per_step) < layers  # the schedule did skip layers inside a block
    assert got.tokens == want.tokens
    assert all(np.array_equal(a, b) for a, b in zip(got.logits, want.logits))


def test_a_block_refers_to_the_layer_files_weights(export):
    """A block's graph holds the layers' nodes and names their weights' bytes in the layer files:
    no weight is copied (onnxruntime maps the files, as it would load each layer)."""
    manifest = skipdeploy.load(export("tiny-llama")).manifest
    paths = [manifest.layer_path(i) for i in range(manifest.model.num_layers)]
    io = {"inputs": manifest.graphs["layers"][0]["inputs"], "outputs": ["hidden_out", "key", "value"]}
    [block] = plan_blocks(len(paths))
    graph = read_block(block, paths, io, (manifest.model.kv_heads, manifest.model.head_dim))
    weights = sum(path.stat().st_size for path in paths)
    assert len(graph) < weights / 4
    assert b"layer_00.onnx" in graph and b"location" in graph


@pytest.mark.parametrize("shape,scheme", [("tiny-llama", "float32"), ("tiny", "float32"), ("tiny-llama", "int4")])
def test_a_block_computes_what_the_layer_graphs_compute_alone(export, shape, scheme):
    """Against the export's own layer files, each in a plain onnxruntime session: the block's
    hidden states and cache entries are the same bits, for a prefill and a decode step over the
    layers a schedule would run (the block also moves the work the layers share, the mask and
    RoPE, to its outer graph: the same operators on the same values)."""
    import onnxruntime as ort

    from skipdeploy.engines.onnxruntime_engine import session_options

    runtime = skipdeploy.load(export(shape, scheme), threads=2)
    engine, spec = runtime.engine, runtime.spec
    ran = [0, spec.num_layers - 2, spec.num_layers - 1]
    alone = {i: ort.InferenceSession(str(runtime.manifest.layer_path(i)), session_options(2),
                                     providers=["CPUExecutionProvider"]) for i in ran}
    B, T = 2, 3
    cache = engine.allocate([T + 1] * spec.num_layers, B)
    bias = np.zeros((B, T + 1), np.float32)
    bias[1, 0] = -1e9  # row 1 is left-padded by one position
    steps = [(np.array([[2, 40, 41], [0, 50, 51]]), np.array([[0, 1, 2], [-1, 0, 1]]), 0),
             (np.array([[7], [8]]), np.array([[3], [2]]), T)]
    past_k = {i: np.zeros((0, B, spec.kv_heads, spec.head_dim), np.float32) for i in ran}
    past_v = dict(past_k)
    for ids, positions, past in steps:
        new = ids.shape[1]
        step_bias = np.ascontiguousarray(bias[:, :past + new])
        hidden = np.array(engine.embed(ids, positions))
        got = np.array(engine.layers(ran, engine.from_numpy(hidden), cache, past, step_bias, positions))
        want = hidden
        for i in ran:
            feeds = {"hidden": want, "past_key": past_k[i], "past_value": past_v[i], "attention_bias": step_bias,
                     "position_ids": positions}
            names = [x.name for x in alone[i].get_inputs()]
            want, key, value = alone[i].run(["hidden_out", "key", "value"], {n: feeds[n] for n in names})
            assert np.array_equal(cache.keys[i][past:past + new], key)
            assert np.array_equal(cache.values[i][past:past + new], value)
            past_k[i], past_v[i] = np.concatenate([past_k[i], key]), np.concatenate([past_v[i], value])
        assert np.array_equal(got, want)


def test_a_skipped_layer_s_cache_is_not_touched(export):
    runtime = skipdeploy.load(export("tiny-llama"))
    engine, spec = runtime.engine, runtime.spec
    alone = skipdeploy.load(export("tiny-llama"), block_layers=1).engine
    B, T = 2, 3
    ids, positions = np.array([[2, 40, 41], [2, 50, 51]]), np.tile(np.arange(T), (B, 1))
    bias = np.zeros((B, T), np.float32)
    ran = [0, spec.num_layers - 1]
    caches = []
    for e in (engine, alone):
        cache = e.allocate([T + 1] * spec.num_layers, B)
        for buf in cache.keys + cache.values:
            buf.fill(np.nan)
        hidden = np.array(e.layers(ran, e.embed(ids, positions), cache, 0, bias, positions))
        caches.append((hidden, cache))
    (hidden, cache), (want, reference) = caches
    assert np.array_equal(hidden, want)
    for i in range(spec.num_layers):
        if i in ran:
            assert np.array_equal(cache.keys[i][:T], reference.keys[i][:T]) and np.isfinite(cache.keys[i][:T]).all()
            assert np.array_equal(cache.values[i][:T], reference.values[i][:T])
            assert np.isnan(cache.keys[i][T:]).all()
        else:
            assert np.isnan(cache.keys[i]).all() and np.isnan(cache.values[i]).all()


def test_layers_must_be_ascending(export):
    runtime = skipdeploy.load(export("tiny"))
    engine = runtime.engine
    cache = engine.allocate([4] * runtime.spec.num_layers, 1)
    hidden = engine.embed(np.array([[2, 5]]), np.array([[0, 1]]))
    with pytest.raises(skipdeploy.SkipDeployError, match="ascending"):
        engine.layers([2, 1], hidden, cache, 0, np.zeros((1, 2), np.float32))


def test_blocks_read_weights_kept_outside_the_graph_files(export, tmp_path, monkeypatch):
    """A graph over ``EXTERNAL_DATA_BYTES`` keeps its weights in a ``.data`` file beside it; a block is
    loaded from bytes, and still finds them in the export's directory."""
    monkeypatch.setattr(writer, "EXTERNAL_DATA_BYTES", 1)
    directory = numpy_export.random_export(tmp_path / "external", "tiny-llama", seed=4).directory
    assert list(directory.glob("layer_*.onnx.data"))
    monkeypatch.undo()
    layers = skipdeploy.load(directory).spec.num_layers
    got = _generate(skipdeploy.load(directory), layers)
    want = _generate(skipdeploy.load(export("tiny-llama")), layers)  # the same weights, inside the graphs
    assert got.tokens == want.tokens
    assert all(np.array_equal(a, b) for a, b in zip(got.logits, want.logits))


@pytest.mark.parametrize("value", [0, -1, 1.5, "big", True])
def test_a_bad_block_size_is_one_line(export, value):
    with pytest.raises(InputError, match="block_layers"):
        skipdeploy.load(export("tiny"), block_layers=value)
