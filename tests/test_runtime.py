"""The runtime against Hugging Face generate (full schedule) and against the torch backend (skips)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from skipdeploy import Schedule, TableSchedule
from skipdeploy.errors import CapacityError, InputError
from skipdeploy.runtime import plan_capacities

from .conftest import HAS_TORCH, PROMPTS, VARIANTS, comparable_prefix, hf_generate, skip_without, torch


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_schedule_reproduces_transformers_generate(runtimes, hf_models, variant, backend):
    steps = 12
    want_tokens, want_logits = hf_generate(hf_models[variant], PROMPTS, steps)
    got = runtimes[variant, backend].generate(PROMPTS, steps, Schedule.full(4), output_logits=True)
    assert got.layers_per_step == [4] * (steps - 1) or got.finish_reasons.count("eos") == len(PROMPTS)
    for row in range(len(PROMPTS)):
        n = min(comparable_prefix(want_logits, row), len(want_tokens[row]))
        assert n >= 4, "reference has near-ties too early for a meaningful comparison"
        assert got.tokens[row][:n] == want_tokens[row][:n]
        for step in range(n):
            assert np.abs(got.logits[step][row] - want_logits[step][row]).max() < 1e-4


SKIP_SCHEDULES = [
    Schedule(4, max_layers=3, min_layers=1, decay_tokens=5, warmup_layers=1),
    Schedule(4, max_layers=3, min_layers=1, decay_tokens=3, warmup_layers=0),
    Schedule(4, max_layers=2, min_layers=1, decay_tokens=4, warmup_layers=2, prompt="schedule"),
    Schedule(4, max_layers=4, min_layers=2, decay_tokens=6, warmup_layers=1),
    TableSchedule(4, [4, 3, 3, 1], warmup_layers=0),
]


@pytest.mark.parametrize("schedule", SKIP_SCHEDULES, ids=lambda s: repr(s.to_dict()))
@pytest.mark.parametrize("variant", VARIANTS)
def test_skip_schedules_agree_with_torch_backend(runtimes, variant, schedule):
    steps = 10
    ort_out = runtimes[variant, "onnxruntime"].generate(PROMPTS, steps, schedule, output_logits=True,
                                                        eos_token_id=None)
    ref = runtimes[variant, "torch"].generate(PROMPTS, steps, schedule, output_logits=True, eos_token_id=None)
    assert ort_out.tokens == ref.tokens
    for a, b in zip(ort_out.logits, ref.logits):
        assert np.abs(a - b).max() < 1e-4
    assert ort_out.layers_per_step == [len(schedule.layers(s)) for s in range(steps - 1)]
    assert ort_out.prompt_layers == len(schedule.prompt_layers())


def test_skipping_changes_the_computation(runtimes):
    """Guards the test above: a skip schedule must not silently run the full model."""
    rt = runtimes["tiny", "onnxruntime"]
    full = rt.generate(PROMPTS, 6, Schedule.full(4), output_logits=True, eos_token_id=None)
    skip = rt.generate(PROMPTS, 6, SKIP_SCHEDULES[0], output_logits=True, eos_token_id=None)
    assert np.abs(full.logits[0] - skip.logits[0]).max() < 1e-6  # token 0 comes from the full prefill
    assert np.abs(full.logits[-1] - skip.logits[-1]).max() > 1e-3


def test_eos_ends_a_row_and_others_continue(runtimes):
    rt = runtimes["tiny", "onnxruntime"]
    free = rt.generate(PROMPTS, 8, eos_token_id=None)
    eos = free.tokens[1][2]  # make the third token of row 1 the EOS
    out = rt.generate(PROMPTS, 8, eos_token_id=eos)
    cut = free.tokens[1].index(eos) + 1
    assert out.tokens[1] == free.tokens[1][:cut] and out.finish_reasons[1] == "eos"
    for row in (0, 2):
        want = free.tokens[row]
        expected = want[:want.index(eos) + 1] if eos in want else want
        assert out.tokens[row] == expected


def test_batch_rows_match_single_prompt_runs(runtimes):
    """Left padding must not change a row's result (optimum #775)."""
    rt = runtimes["tiny", "onnxruntime"]
    sched = SKIP_SCHEDULES[0]
    batch = rt.generate(PROMPTS, 8, sched, output_logits=True, eos_token_id=None)
    for row, prompt in enumerate(PROMPTS):
        alone = rt.generate([prompt], 8, sched, output_logits=True, eos_token_id=None)
        assert alone.tokens[0] == batch.tokens[row]
        assert np.abs(alone.logits[-1][0] - batch.logits[-1][row]).max() < 1e-4


@torch.no_grad()
def test_cache_buffers_are_written_in_place(runtimes, hf_models):
    """Keys land in the preallocated buffer's positions, nowhere else, and the buffer is not replaced."""
    from skipdeploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    rt = runtimes["tiny", "onnxruntime"]
    engine: OnnxRuntimeEngine = rt.engine
    hf = hf_models["tiny"]
    B, T, H, D = 2, 3, 4, 16
    cache = engine.allocate([T + 2] * 4, B)
    for buf in cache.keys + cache.values:
        buf.fill(np.nan)
    pointer = cache.keys[0].ctypes.data
    assert np.shares_memory(cache.keys[0], cache.storage[0][0])  # a view of the flat buffer the engine reuses
    ids = np.array([[2, 40, 41], [2, 50, 51]])
    pos = np.tile(np.arange(T), (B, 1))
    hidden = engine.embed(ids, pos)
    bias = np.zeros((B, T), np.float32)
    engine.layer(0, hidden, cache, 0, bias)
    layer = hf.model.decoder.layers[0]
    x = torch.from_numpy(np.array(hidden))
    want = layer.self_attn.k_proj(layer.self_attn_layer_norm(x)).view(B, T, H, D).transpose(0, 1)
    assert cache.keys[0].ctypes.data == pointer
    assert np.abs(cache.keys[0][:T] - want.numpy()).max() < 1e-5
    assert np.isnan(cache.keys[0][T:]).all() and np.isnan(cache.keys[1]).all()
    # One decode position lands at position T.
    step = engine.embed(np.array([[7], [8]]), np.full((B, 1), T))
    engine.layer(0, step, cache, T, np.zeros((B, T + 1), np.float32))
    assert np.isfinite(cache.keys[0][T]).all() and np.isnan(cache.keys[0][T + 1:]).all()


def test_public_iobinding_fallback_gives_the_same_results(exports):
    """The pointer binding calls onnxruntime's C-level binding; where those internals are missing it
    uses the public IOBinding API, with identical results."""
    import skipdeploy

    runtime = skipdeploy.load(exports["tiny"])
    bindings = [runtime.engine._embed_io, *runtime.engine._block_io, runtime.engine._head_io]
    assert all(b._fast for b in bindings)  # onnxruntime 1.32 has them
    sched = Schedule(4, 3, 1, decay_tokens=5, warmup_layers=1)
    fast = runtime.generate(PROMPTS, 6, sched, output_logits=True, eos_token_id=None)
    for b in bindings:
        b._fast = False
    public = runtime.generate(PROMPTS, 6, sched, output_logits=True, eos_token_id=None)
    assert public.tokens == fast.tokens
    assert all(np.array_equal(a, b) for a, b in zip(public.logits, fast.logits))


def test_capacities_follow_the_schedule():
    s = Schedule(4, max_layers=2, min_layers=1, decay_tokens=2, warmup_layers=1)
    # top = 2, 2 (2 - 1/2 rounds half up), 1, 1: steps 0..3 run {0,2,3} twice, then {0,3};
    # five new tokens mean four decode steps (the last token is never fed back).
    assert plan_capacities(s, prompt_len=6, max_new_tokens=5) == [10, 6, 8, 10]
    s = Schedule(4, max_layers=2, min_layers=1, decay_tokens=2, warmup_layers=0, prompt="schedule")
    assert plan_capacities(s, prompt_len=6, max_new_tokens=4) == [0, 0, 8, 9]


@pytest.mark.parametrize("bad, error, match", [
    ([], InputError, "non-empty list"),
    ([[]], InputError, "prompt 0 is empty"),
    ([[2, 600]], InputError, "token id 600, outside the vocabulary"),
    ([[2, -1]], InputError, "outside the vocabulary"),
    ([2, 3], InputError, "flat list"),
    ([[2] * 127], CapacityError, "needs 130 positions; this export allows 128"),
])
def test_bad_input_is_refused(runtimes, bad, error, match):
    with pytest.raises(error, match=match):
        runtimes["tiny", "onnxruntime"].generate(bad, 4)


def test_batch_larger_than_export_limit(runtimes):
    with pytest.raises(CapacityError, match="exceeds the 64 rows"):
        runtimes["tiny", "onnxruntime"].generate([[2, 3]] * 65, 2)


def test_text_round_trip(runtimes):
    out = runtimes["tiny", "onnxruntime"].generate_text(["def greet(name):", "for i in"], 5)
    assert len(out.text) == 2 and all(isinstance(t, str) for t in out.text)


@pytest.mark.slow
def test_runtime_core_never_imports_torch_or_transformers(exports):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import skipdeploy
        rt = skipdeploy.load({str(exports["tiny"])!r})
        out = rt.generate_text(["def greet"], 4, schedule=skipdeploy.Schedule(4, 2, 1, 2))
        assert len(out.tokens[0]) == 4
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("options, match", [
    (dict(memory_limit=-5), "memory_limit must be a number of bytes >= 1"),
    (dict(threads=0), "threads must be an integer >= 1"),
])
def test_bad_load_options_are_input_errors(exports, options, match):
    import skipdeploy

    with pytest.raises(skipdeploy.InputError, match=match):
        skipdeploy.load(exports["tiny"], **options)


def test_load_verify_keyword_still_works_with_a_warning(exports):
    import skipdeploy

    with pytest.warns(DeprecationWarning, match="check_files"):
        assert skipdeploy.load(exports["tiny"], verify=False).generate([[2, 5]], 2).tokens


def test_threads_above_the_machine_s_cores_are_refused_at_every_door(exports, tmp_path):
    """--threads 100000 grew memory by 60 MB/s: the core refuses more threads than cores, in one
    line naming the limit, whichever door the option comes through."""
    import os

    import skipdeploy
    from skipdeploy.capi.bridge import Bridge
    from skipdeploy.serving import ServingEngine

    from .conftest import run_cli

    cores, too_many = os.cpu_count(), os.cpu_count() + 1
    message = f"threads must be at most {cores}, the CPU cores this machine has"
    with pytest.raises(InputError, match=message):
        skipdeploy.load(exports["tiny"], threads=too_many)
    with pytest.raises(InputError, match=message):
        ServingEngine(exports["tiny"], threads=too_many, max_batch=1)
    with pytest.raises(InputError, match=message):
        Bridge().load(str(exports["tiny"]), f'{{"threads": {too_many}}}')
    out = run_cli("generate", exports["tiny"], "--input-ids", "2,5", "--max-new-tokens", 2, "--threads", too_many)
    assert out.exit_code == 1 and message in out.output and len(out.output.strip().splitlines()) == 1
    assert skipdeploy.load(exports["tiny"], threads=cores).generate([[2, 5]], 2).tokens


def test_backend_options_are_checked_once_for_both_paths(exports):
    """An option the backend does not take is one line naming the ones it does (not a TypeError),
    for skipdeploy.load and ServingEngine alike."""
    import skipdeploy
    from skipdeploy.serving import ServingEngine

    with pytest.raises(InputError, match="the onnxruntime backend takes no option 'dtype'; its options: "
                                         "block_layers, device, providers, threads"):
        skipdeploy.load(exports["tiny"], dtype="float16")
    with pytest.raises(InputError, match="for in-flight batching takes no option 'providers'"):
        ServingEngine(exports["tiny"], providers=["CPUExecutionProvider"])
    with pytest.raises(skipdeploy.BackendError, match="in-flight batching runs on the onnxruntime and torch "
                                                     "backends on the CPU"):
        ServingEngine(exports["tiny"], device="cuda")
    skip_without("torch")
    with pytest.raises(InputError, match="for in-flight batching takes no option 'static_cache'"):
        ServingEngine(exports["tiny"], backend="torch", static_cache=True)
    # threads sizes onnxruntime's pool; the torch backend takes it without using it, at every door.
    assert skipdeploy.load(exports["tiny"], backend="torch", threads=1).generate([[2, 5]], 2).tokens


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_create_engine_inflight_means_the_same_for_every_backend(exports, backend):
    """inflight=False gives a StaticEngine, inflight=True an InflightEngine, and no engine class is
    both (so none disables a method of its parent); each path refuses the other's engine."""
    import skipdeploy
    from skipdeploy.engines import InflightEngine, StaticEngine, create_engine
    from skipdeploy.manifest import read_manifest
    from skipdeploy.runtime import Runtime

    skip_without(backend)
    manifest = read_manifest(exports["tiny"], verify=False)
    static, inflight = create_engine(backend, manifest), create_engine(backend, manifest, inflight=True)
    assert isinstance(static, StaticEngine) and not isinstance(static, InflightEngine) and not static.inflight
    assert isinstance(inflight, InflightEngine) and not isinstance(inflight, StaticEngine) and inflight.inflight
    with pytest.raises(skipdeploy.BackendError, match="serves in-flight batching"):
        Runtime(manifest, inflight)


def test_abstract_engine_methods_are_implemented_not_disabled():
    """Every concrete engine class implements its interface's methods; none raises to opt out."""
    import ast
    import importlib
    import inspect
    from pathlib import Path

    import skipdeploy.engines

    for path in sorted(Path(skipdeploy.engines.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and len(node.body) <= 2:
                body = [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
                assert not (len(body) == 1 and isinstance(body[0], ast.Raise)), f"{path.name}: {node.name} only raises"
    classes = [("onnxruntime_engine", "OnnxRuntimeEngine"), ("onnxruntime_inflight", "InflightOnnxRuntimeEngine")]
    if HAS_TORCH:
        classes += [("torch_engine", "TorchEngine"), ("torch_inflight", "TorchInflightEngine")]
    for module, name in classes:
        cls = getattr(importlib.import_module(f"skipdeploy.engines.{module}"), name)
        assert not inspect.isabstract(cls), cls


def test_layer_weights_have_one_reader_for_torch_and_the_inflight_graphs(exports):
    """The torch backend's tensors are exactly what families.weights reads (the family's names),
    which the in-flight graphs are built from."""
    from skipdeploy.families import for_model_type
    from skipdeploy.families.weights import read_graph_weights, read_layer_weights
    from skipdeploy.manifest import read_manifest

    manifest = read_manifest(exports["tiny"], verify=False)
    family = for_model_type(manifest.model.model_type)
    layers = [read_layer_weights(manifest.layer_path(i), manifest.model) for i in range(manifest.model.num_layers)]
    for weights in layers:
        assert set(weights) <= set(family.LAYER_WEIGHTS) and set(family.REQUIRED_WEIGHTS) <= set(weights)
    head = read_graph_weights(manifest.path("head"), manifest.model, "head")
    embed = read_graph_weights(manifest.path("embed"), manifest.model, "embed")
    assert "lm_head.weight" in head and set(head) <= set(family.HEAD_WEIGHTS)
    assert "embed_tokens.weight" in embed and set(embed) <= set(family.EMBED_WEIGHTS)
    skip_without("torch")
    from skipdeploy.engines.torch_engine import TorchEngine

    engine = TorchEngine(manifest)
    for tensors, weights in zip(engine.layer_w, layers):
        assert set(tensors) == set(weights) and all(np.array_equal(tensors[k].numpy(), weights[k]) for k in weights)
    assert set(engine.head_w) == set(head) and set(engine.embed_w) == set(embed)
