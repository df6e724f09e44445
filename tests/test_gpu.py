"""GPU backends: torch on CUDA (fp16, static cache, CUDA graphs), onnxruntime with device OrtValues
(CUDA execution provider), TensorRT engines per graph.

The CPU tests run the new code paths themselves wherever they can run without a GPU: the
static-cache decode math and its deferred (graph-ready) steps, the OrtValue engine with OrtValues
in host memory and with the masked past slot that the GPU backends use, the engine cache lookup,
the profiles, and the one-line errors when a library or a GPU is missing. The GPU tests are
skipped, with the reason, unless the library and a GPU are really there; nothing stands in for
CUDA, onnxruntime-gpu or TensorRT.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the GPU tests need a torch build (pip install 'skipdeploy[export]')")
from click.testing import CliRunner

import skipdeploy
from skipdeploy import Schedule, TableSchedule
from skipdeploy.cli import main
from skipdeploy.engines import create_engine
from skipdeploy.engines.onnxruntime_engine import OnnxRuntimeEngine
from skipdeploy.engines.ortvalue_engine import OrtValueEngine, cuda_provider_usable
from skipdeploy.engines.tensorrt_build import (ENGINES_DIR, METADATA, PAST_PAD, Profile, engine_key, graph_digest,
                                               find_engines)
from skipdeploy.engines.torch_engine import TorchEngine
from skipdeploy.errors import BackendError, NumericalError
from skipdeploy.manifest import describe_file, read_manifest
from skipdeploy.runtime import Runtime

from .conftest import PROMPTS, VARIANTS, comparable_prefix, edited_export, with_nan_column

HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_CUDA = "needs an NVIDIA GPU and a CUDA build of torch (torch.cuda.is_available() is False here)"
NO_TENSORRT = "needs TensorRT (not installed here: its pip packages download libraries at install time)"

SCHEDULES = [Schedule.full(4), Schedule(4, max_layers=3, min_layers=1, decay_tokens=5, warmup_layers=1),
             Schedule(4, max_layers=2, min_layers=1, decay_tokens=4, warmup_layers=2, prompt="schedule"),
             TableSchedule(4, [4, 3, 3, 1], warmup_layers=0)]
STEPS = 10


def _runtime(exports, variant, engine_cls, **options):
    manifest = read_manifest(exports[variant], verify=False)
    return Runtime(manifest, engine_cls(manifest, **options))


def _generate(runtime, schedule, prompts=PROMPTS, steps=STEPS):
    return runtime.generate(prompts, steps, schedule, output_logits=True, eos_token_id=None)


def _assert_same(got, want, tol):
    assert got.tokens == want.tokens
    assert got.layers_per_step == want.layers_per_step
    for a, b in zip(got.logits, want.logits):
        assert np.abs(a - b).max() < tol


def _decode_layer_sets(schedule, batch, steps=STEPS):
    return {(batch, tuple(schedule.layers(s))) for s in range(steps - 1)}


class _Counts:
    """What a torch engine does with its deferred steps, counted by wrapping two of its methods on
    one instance: (batch, layer set) of every static step, CUDA graph captures and replays."""

    def __init__(self, engine) -> None:
        self.layer_sets, self.captures, self.replays = set(), 0, 0
        run_pending, capture = engine._run_pending, engine._capture

        def counted_run(step, eager_hidden=False):
            if step.layers:
                self.layer_sets.add((step.ids.shape[0], step.layers))
                self.replays += int(engine.cuda_graphs and not eager_hidden)
            return run_pending(step, eager_hidden)

        def counted_capture(pool, layers):
            self.captures += 1
            return capture(pool, layers)

        engine._run_pending, engine._capture = counted_run, counted_capture


def _free_pool(engine, batch):
    """The released static-cache storage of ``batch`` rows the engine keeps for reuse."""
    return next(pool for pool in engine._free if pool.batch == batch)


@pytest.fixture(scope="module")
def fp16_export(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "tiny16"
    return skipdeploy.export(checkpoints["tiny"], out, dtype="float16", progress=False, log=lambda m: None).directory


def _assert_fp16_close(got, want):
    """fp16 against an fp32 reference: tokens up to the first reference near-tie (gap 1e-2), logits
    within 2e-2 of their scale."""
    for row in range(len(PROMPTS)):
        n = comparable_prefix(want.logits, row, min_gap=1e-2)
        assert got.tokens[row][:n] == want.tokens[row][:n]
        for step in range(n):
            scale = max(1.0, float(np.abs(want.logits[step][row]).max()))
            assert np.abs(got.logits[step][row] - want.logits[step][row]).max() / scale < 2e-2


# -- torch: the static-cache decode path (what CUDA graphs capture), on the CPU ---------------------------
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: repr(s.to_dict()))
@pytest.mark.parametrize("variant", VARIANTS)
def test_static_cache_decode_matches_onnxruntime_and_torch(runtimes, exports, variant, schedule):
    rt = _runtime(exports, variant, TorchEngine, static_cache=True)
    counts = _Counts(rt.engine)
    got = _generate(rt, schedule)
    _assert_same(got, _generate(runtimes[variant, "onnxruntime"], schedule), 1e-4)
    _assert_same(got, _generate(runtimes[variant, "torch"], schedule), 1e-5)
    # Every decode step went through the fixed-shape path, keyed by its layer set: at most L sets.
    assert counts.layer_sets == _decode_layer_sets(schedule, len(PROMPTS))
    assert len(counts.layer_sets) <= 4


def test_static_cache_buffers_are_reused_and_stale_slots_masked(runtimes, exports):
    """Pooled buffers keep earlier requests' keys beyond the valid length: they must not leak in."""
    rt = _runtime(exports, "tiny", TorchEngine, static_cache=True)
    ref = runtimes["tiny", "onnxruntime"]
    sched = SCHEDULES[1]
    long = [[2, *range(40, 70)], [2, 9, 8]]
    _assert_same(_generate(rt, sched, long, 30), _generate(ref, sched, long, 30), 1e-4)
    pool = _free_pool(rt.engine, 2)
    pointers = [k.data_ptr() for k in pool.keys]
    assert all(k.abs().sum() > 0 for k in pool.keys)  # stale data is there
    for prompts, steps in (([[2, 7], [2, 5, 6, 7]], 6), ([[2, 300], [2]], 12)):
        _assert_same(_generate(rt, sched, prompts, steps), _generate(ref, sched, prompts, steps), 1e-4)
    assert [k.data_ptr() for k in _free_pool(rt.engine, 2).keys] == pointers  # smaller requests reuse them
    cache = rt.engine.allocate([5, 4, 3, 2], 2)
    assert cache.keys[0].data_ptr() == pointers[0] and cache.keys[0].shape[0] == 5


def test_static_cache_reused_after_a_nan_request_is_clean(runtimes, exports):
    """A request that overflowed leaves NaN in the pooled buffers; the static step reads a layer's
    whole buffer (zero weight beyond the write position, and 0 x NaN is NaN): the next request
    must not see it."""
    rt = _runtime(exports, "tiny", TorchEngine, static_cache=True)
    ref = runtimes["tiny", "onnxruntime"]
    sched = SCHEDULES[1]
    _generate(rt, sched, [[2, *range(40, 70)], [2, 9, 8]], 30)
    for t in _free_pool(rt.engine, 2).keys + _free_pool(rt.engine, 2).values:
        t.fill_(float("nan"))
    prompts = [[2, 7], [2, 5, 6, 7]]
    _assert_same(_generate(rt, sched, prompts, 6), _generate(ref, sched, prompts, 6), 1e-4)


def test_ortvalue_masked_slot_is_reset_when_a_buffer_changes_batch(runtimes, exports):
    """The masked position in front of a cache is read (with zero weight) and never written. A
    buffer reused for another batch size has it where the last cache kept real positions, and
    those may hold NaN."""
    rt = _runtime(exports, "tiny", OrtValueEngine, device="cpu", pad_past=True)
    ref = runtimes["tiny", "onnxruntime"]
    sched = SCHEDULES[1]
    _generate(rt, sched, [[2, *range(40, 70)], [2, 9, 8]], 12)
    H, D = rt.spec.kv_heads, rt.spec.head_dim
    keys, values, _ = rt.engine._free._free[-1]
    for value in keys + values:  # NaN everywhere a batch-2 cache writes: all but its masked position
        host = value.numpy().copy()
        host[2 * H * D:] = np.nan
        value.update_inplace(host)
    for prompts in ([[2, 7], [2, 5, 6, 7], [2, 11]], [[2, 7], [2, 5, 6, 7]]):  # batch 3, then 2 again
        _assert_same(_generate(rt, sched, prompts, 6), _generate(ref, sched, prompts, 6), 1e-4)


def test_caches_are_allocated_and_released_under_the_engine_lock(exports):
    """Runtime may be shared between threads: a cache allocation in one thread while another
    thread's forward captures a CUDA graph would invalidate the capture, and the engine's pool of
    released caches is shared state. Checked single-threaded: the lock is held exactly when the
    engine allocates or releases."""
    rt = _runtime(exports, "tiny", TorchEngine, static_cache=True)
    held = []
    allocate, release = rt.engine.allocate, rt.engine.release

    def held_elsewhere() -> bool:  # whether another thread finds the lock taken
        took = []

        def try_lock():
            took.append(rt.engine_lock.acquire(blocking=False))
            if took[0]:
                rt.engine_lock.release()

        thread = threading.Thread(target=try_lock)
        thread.start()
        thread.join()
        return not took[0]

    def checked_allocate(*args):
        held.append(("allocate", held_elsewhere()))
        return allocate(*args)

    def checked_release(cache):
        held.append(("release", held_elsewhere()))
        return release(cache)

    rt.engine.allocate, rt.engine.release = checked_allocate, checked_release
    _generate(rt, SCHEDULES[1], steps=3)
    assert held == [("allocate", True), ("release", True)]


def test_cache_is_sized_by_the_dtype_that_runs(exports):
    """A float32 export run by torch in float16 needs half the cache bytes: a memory limit
    between the two admits it there and refuses it on the float32 engine."""
    manifest = read_manifest(exports["tiny"])
    L, H, D = manifest.model.num_layers, manifest.model.kv_heads, manifest.model.head_dim
    capacities, batch = [64] * L, 2
    fp16_bytes = 2 * sum(capacities) * batch * H * D * 2
    fp16 = Runtime(manifest, TorchEngine(manifest, dtype="float16", static_cache=True), memory_limit=fp16_bytes)
    assert fp16.engine.cache_itemsize == 2
    fp16.release_cache(fp16.allocate_cache(capacities, batch))
    fp32 = Runtime(manifest, TorchEngine(manifest), memory_limit=fp16_bytes)
    with pytest.raises(skipdeploy.CapacityError, match="KV cache needs"):
        fp32.allocate_cache(capacities, batch)


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    """A tiny Llama (GQA, RoPE): the family whose layers take positions, on the static path."""
    from skipdeploy.random_checkpoint import make_checkpoint

    root = tmp_path_factory.mktemp("gpu-llama")
    checkpoint = make_checkpoint(root / "ckpt", "tiny-llama", seed=3, weight_scale=3.0)
    return skipdeploy.export(checkpoint, root / "export", progress=False, log=lambda m: None).directory


LLAMA_PROMPTS = [[1, 45, 67, 89, 101, 7], [1, 300], [1, 11, 12, 13]]


@pytest.mark.parametrize("schedule", SCHEDULES[:3], ids=lambda s: repr(s.to_dict()))
def test_static_cache_decode_runs_llama_family(llama_export, schedule):
    manifest = read_manifest(llama_export)
    rt = Runtime(manifest, TorchEngine(manifest, static_cache=True))
    counts = _Counts(rt.engine)
    want = _generate(Runtime(manifest, OnnxRuntimeEngine(manifest)), schedule, LLAMA_PROMPTS)
    _assert_same(_generate(rt, schedule, LLAMA_PROMPTS), want, 1e-4)
    assert counts.layer_sets == _decode_layer_sets(schedule, len(LLAMA_PROMPTS))


def test_static_cache_single_token_prompts(runtimes, exports):
    """A one-token prompt makes the prefill itself a fixed-shape step (past 0)."""
    rt = _runtime(exports, "tiny-post-ln", TorchEngine, static_cache=True)
    prompts = [[2], [7]]
    _assert_same(_generate(rt, SCHEDULES[3], prompts), _generate(runtimes["tiny-post-ln", "onnxruntime"],
                                                                  SCHEDULES[3], prompts), 1e-4)


def test_static_cache_fp16_on_cpu(fp16_export):
    manifest = read_manifest(fp16_export)
    ref = Runtime(manifest, OnnxRuntimeEngine(manifest))
    rt = Runtime(manifest, TorchEngine(manifest, static_cache=True))
    assert rt.engine.dtype == torch.float16
    for sched in SCHEDULES[:2]:
        got, want = _generate(rt, sched), _generate(ref, sched)
        _assert_fp16_close(got, want)


def test_deferred_steps_still_name_the_first_non_finite_layer(exports, tmp_path):
    copy = edited_export(exports["tiny"], tmp_path / "nan", "layer_02.onnx", "fc1.weight", with_nan_column)
    manifest = read_manifest(copy)
    for engine in (TorchEngine(manifest, static_cache=True), OrtValueEngine(manifest, device="cpu", pad_past=True)):
        with pytest.raises(NumericalError, match="generated token 0: first produced by decoder layer 2"):
            Runtime(manifest, engine).generate([[2], [5]], 4)  # one-token prompts: a deferred prefill


# -- onnxruntime with OrtValues (the CUDA provider's code path), on the CPU -------------------------------
@pytest.mark.parametrize("pad_past", [False, True], ids=["empty-past", "masked-slot"])
@pytest.mark.parametrize("schedule", SCHEDULES[1:3], ids=lambda s: repr(s.to_dict()))
@pytest.mark.parametrize("variant", VARIANTS)
def test_ortvalue_engine_matches_numpy_engine(runtimes, exports, variant, schedule, pad_past):
    rt = _runtime(exports, variant, OrtValueEngine, device="cpu", pad_past=pad_past)
    _assert_same(_generate(rt, schedule), _generate(runtimes[variant, "onnxruntime"], schedule), 1e-5)


def test_ortvalue_engine_fp16(fp16_export):
    manifest = read_manifest(fp16_export)
    ref = Runtime(manifest, OnnxRuntimeEngine(manifest))
    rt = Runtime(manifest, OrtValueEngine(manifest, device="cpu", pad_past=True))
    _assert_same(_generate(rt, SCHEDULES[1]), _generate(ref, SCHEDULES[1]), 1e-3)


def test_ortvalue_cache_is_written_in_place(exports, runtimes):
    """New keys land in the slot after the valid prefix of the preallocated OrtValue; the masked
    slot in front stays zero, and the buffer is the same OrtValue after the call."""
    manifest = read_manifest(exports["tiny"], verify=False)
    engine = OrtValueEngine(manifest, device="cpu", pad_past=True)
    ref = runtimes["tiny", "torch"].engine
    B, T = 2, 3
    cache, ref_cache = engine.allocate([T + 2] * 4, B), ref.allocate([T + 2] * 4, B)
    buffer = cache.keys[0].value
    ids = np.array([[2, 40, 41], [2, 50, 51]])
    pos = np.tile(np.arange(T), (B, 1))
    bias = np.zeros((B, T), np.float32)
    engine.layer(0, engine.embed(ids, pos), cache, 0, bias)
    ref.layer(0, ref.embed(ids, pos), ref_cache, 0, bias)
    assert cache.keys[0].value is buffer
    assert np.abs(np.asarray(cache.keys[0])[:T] - ref_cache.keys[0][:T].numpy()).max() < 1e-5
    flat = buffer.numpy()
    assert not flat[:B * 4 * 16].any()  # the masked slot (PAST_PAD = 1) is untouched
    step = engine.embed(np.array([[7], [8]]), np.full((B, 1), T))
    engine.layer(0, step, cache, T, np.zeros((B, T + 1), np.float32))
    ref.layer(0, ref.embed(np.array([[7], [8]]), np.full((B, 1), T)), ref_cache, T, np.zeros((B, T + 1), np.float32))
    assert np.abs(np.asarray(cache.keys[0])[:T + 1] - ref_cache.keys[0][:T + 1].numpy()).max() < 1e-5
    assert np.abs(np.asarray(cache.values[0])[:T + 1] - ref_cache.values[0][:T + 1].numpy()).max() < 1e-5


def test_ortvalue_engine_passes_verify_graph_checks(exports, runtimes):
    """Per graph (padding rows included) the masked-slot layout equals the reference's."""
    from skipdeploy.verify import _graphs_against_reference

    manifest = read_manifest(exports["tiny-post-ln"], verify=False)
    engine = OrtValueEngine(manifest, device="cpu", pad_past=True)
    checks = _graphs_against_reference(engine, runtimes["tiny-post-ln", "torch"].engine, manifest, 1e-4, 0)
    assert all(c.ok for c in checks), [(c.name, c.error) for c in checks]


# -- TensorRT engine cache and profiles (no TensorRT needed) -----------------------------------------------
def test_profiles_never_take_an_empty_past(exports):
    manifest = read_manifest(exports["tiny"], verify=False)
    profile = Profile.for_manifest(manifest, max_batch=16, max_length=100, max_prompt=40)
    decode, prefill = profile.shapes("layer", manifest.model)
    for shapes in (decode, prefill):
        for corner in range(3):
            past = shapes["past_key"][corner][0]
            new = shapes["hidden"][corner][1]
            assert past >= PAST_PAD >= 1
            assert shapes["attention_bias"][corner] == (shapes["hidden"][corner][0], past + new)
        for lo, opt, hi in shapes.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    assert decode["hidden"][2][1] == 1 and decode["past_key"][2][0] == 100 - 1 + PAST_PAD
    assert prefill["hidden"][2][1] == 40
    with pytest.raises(BackendError, match="max prompt <= max length"):
        Profile.for_manifest(manifest, max_length=10, max_prompt=20)


def _fake_entry(manifest, identity, trt_version, profile):
    """Engine-cache metadata as build_engines writes it; the plan files are placeholders that the
    lookup only hashes (nothing here deserializes them)."""
    key = engine_key(identity, trt_version, manifest.dtype, profile)
    entry = manifest.directory / ENGINES_DIR / key
    entry.mkdir(parents=True)
    plans = {}
    names = [("embed", "embed.onnx")] + [(f"layer_{i:02d}", f"layer_{i:02d}.onnx") for i in range(4)]
    for name, onnx_file in names + [("head", "head.onnx")]:
        (entry / f"{name}.plan").write_bytes(name.encode())
        plans[name] = {"file": f"{name}.plan", "onnx": onnx_file,
                       "onnx_sha256": graph_digest(manifest, manifest.directory / onnx_file), **describe_file(entry / f"{name}.plan")}
    meta = {"format": 1, **identity, "tensorrt": trt_version, "dtype": manifest.dtype,
            "profile": profile.__dict__, "plans": plans, "created": "2026-01-01T00:00:00+00:00"}
    (entry / METADATA).write_text(json.dumps(meta))
    return entry


def test_engine_cache_is_keyed_by_gpu_and_tensorrt_version(exports, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(exports["tiny"], copy)
    manifest = read_manifest(copy)
    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    with pytest.raises(BackendError, match=r"has no TensorRT engines: .*skipdeploy build-engines"):
        find_engines(manifest, h100, "10.8.0")
    entry = _fake_entry(manifest, h100, "10.8.0", Profile.for_manifest(manifest))
    assert "nvidia-h100-80gb-hbm3_sm90_trt10.8.0_float32_" in entry.name
    assert find_engines(manifest, h100, "10.8.0").directory == entry
    with pytest.raises(BackendError, match=r"built for NVIDIA H100 80GB HBM3 \(sm90\), TensorRT 10.8.0, float32, "
                                           r"not for this machine's NVIDIA A100.*rebuild them with `skipdeploy "
                                           r"build-engines"):
        find_engines(manifest, {"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, "10.8.0")
    with pytest.raises(BackendError, match="TensorRT 11.1.0"):
        find_engines(manifest, h100, "11.1.0")
    meta = json.loads((entry / METADATA).read_text())
    meta["plans"]["layer_02"]["onnx_sha256"] = "0" * 64
    (entry / METADATA).write_text(json.dumps(meta))
    with pytest.raises(BackendError, match=r"other ONNX graphs \(layer_02.onnx differs\).*--force"):
        find_engines(manifest, h100, "10.8.0")


def test_engine_cache_notices_new_weights_in_shared_data_files(exports, tmp_path):
    """The embed and head graphs keep their weights in embeddings.bin: a manifest whose data file
    changed (a re-export with other weights) must not reuse engines built from the old one."""
    copy = tmp_path / "export"
    shutil.copytree(exports["tiny"], copy)
    manifest = read_manifest(copy)
    assert manifest.graphs["head"].get("data"), "the export should share its embedding in a data file"
    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    _fake_entry(manifest, h100, "10.8.0", Profile.for_manifest(manifest))
    find_engines(manifest, h100, "10.8.0")
    data_file = manifest.graphs["head"]["data"][0]
    manifest.files[data_file] = {**manifest.files[data_file], "sha256": "f" * 64}
    with pytest.raises(BackendError, match=r"other ONNX graphs \((embed|head).onnx or embeddings.bin differs\)"):
        find_engines(manifest, h100, "10.8.0")


# -- one-line errors when a library or a GPU is missing ------------------------------------------------------
def _one_line_failure(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.output


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the error when TensorRT is absent; it is installed here")
def test_tensorrt_missing_is_one_line(exports, checkpoints, tmp_path):
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        skipdeploy.load(exports["tiny"], backend="tensorrt")
    runner = CliRunner()
    _one_line_failure(runner.invoke(main, ["generate", str(exports["tiny"]), "--input-ids", "2,3",
                                           "--backend", "tensorrt"]), "TensorRT is not installed")
    _one_line_failure(runner.invoke(main, ["build-engines", str(exports["tiny"])]), "TensorRT is not installed")
    out = tmp_path / "never"
    _one_line_failure(runner.invoke(main, ["export", str(checkpoints["tiny"]), "--out", str(out), "--tensorrt"]),
                      "--tensorrt", "build-engines")
    assert not out.exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks the error when CUDA is absent; this machine has a GPU")
def test_torch_cuda_missing_is_one_line(exports):
    with pytest.raises(BackendError, match="needs an NVIDIA GPU and a CUDA build of torch"):
        skipdeploy.load(exports["tiny"], backend="torch", device="cuda")
    _one_line_failure(CliRunner().invoke(main, ["generate", str(exports["tiny"]), "--input-ids", "2,3",
                                                "--backend", "torch", "--device", "cuda"]), "CUDA")


def test_onnxruntime_cuda_unusable_is_one_line(exports):
    usable, why = cuda_provider_usable(read_manifest(exports["tiny"], verify=False).path("embed"))
    if usable:
        pytest.skip("checks the error when the CUDA execution provider is unusable; it works here")
    with pytest.raises(BackendError, match="onnxruntime backend on cuda is not usable here"):
        skipdeploy.load(exports["tiny"], device="cuda")
    _one_line_failure(CliRunner().invoke(main, ["generate", str(exports["tiny"]), "--input-ids", "2,3",
                                                "--device", "cuda"]), "not usable here", why.split(" (")[0])


def test_bad_device_and_backend(exports):
    manifest = read_manifest(exports["tiny"], verify=False)
    with pytest.raises(BackendError, match="unknown device 'tpu'"):
        create_engine("torch", manifest, device="tpu")
    with pytest.raises(BackendError, match="runs on an NVIDIA GPU only"):
        create_engine("tensorrt", manifest, device="cpu")
    with pytest.raises(BackendError, match="unknown backend 'openvino'"):
        create_engine("openvino", manifest)
    with pytest.raises(skipdeploy.InputError, match="takes no option 'max_bach'; its options: build, device, max_batch"):
        create_engine("tensorrt", manifest, device="cuda", max_bach=3)  # a misspelt build option was ignored


@pytest.mark.skipif(HAS_CUDA, reason="checks the error when CUDA is absent; this machine has a GPU")
def test_cli_device_names_a_cuda_device_by_index(exports):
    runner = CliRunner()
    _one_line_failure(runner.invoke(main, ["generate", str(exports["tiny"]), "--input-ids", "2,3", "--backend", "torch",
                                           "--device", "cuda:1"]), "cuda:1", "needs an NVIDIA GPU")
    for bad in ("gpu", "cuda:x", "cpu:0"):
        result = runner.invoke(main, ["generate", str(exports["tiny"]), "--input-ids", "2,3", "--device", bad])
        assert result.exit_code == 2 and "is not a device; use cpu, cuda or cuda:N" in result.output, bad
    result = runner.invoke(main, ["build-engines", str(exports["tiny"]), "--device", "cpu"])
    assert result.exit_code == 2 and "use cuda or cuda:N" in result.output


# -- on a GPU: torch CUDA ------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: repr(s.to_dict()))
@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_cuda_graphs_match_cpu_reference(runtimes, exports, variant, schedule):
    rt = skipdeploy.load(exports[variant], backend="torch", device="cuda", dtype="float32")
    assert rt.engine.cuda_graphs
    counts = _Counts(rt.engine)
    got = _generate(rt, schedule)
    want = _generate(runtimes[variant, "onnxruntime"], schedule)
    for row in range(len(PROMPTS)):
        n = comparable_prefix(want.logits, row)
        assert got.tokens[row][:n] == want.tokens[row][:n]
        for step in range(n):
            assert np.abs(got.logits[step][row] - want.logits[step][row]).max() < 1e-3
    # One captured graph per distinct decode layer set (plus the one-token prefill, not used here).
    assert rt.engine.graph_keys() == _decode_layer_sets(schedule, len(PROMPTS))
    assert counts.captures == len(rt.engine.graph_keys())
    again = _generate(rt, schedule)  # replayed, not recaptured
    assert counts.captures == len(rt.engine.graph_keys())
    assert again.tokens == got.tokens
    assert all(np.array_equal(a, b) for a, b in zip(again.logits, got.logits))


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("schedule", SCHEDULES[:3], ids=lambda s: repr(s.to_dict()))
def test_torch_cuda_graphs_run_llama_family(llama_export, schedule):
    manifest = read_manifest(llama_export)
    want = _generate(Runtime(manifest, OnnxRuntimeEngine(manifest)), schedule, LLAMA_PROMPTS)
    rt = skipdeploy.load(llama_export, backend="torch", device="cuda", dtype="float32")
    got = _generate(rt, schedule, LLAMA_PROMPTS)
    for row in range(len(LLAMA_PROMPTS)):
        n = comparable_prefix(want.logits, row)
        assert got.tokens[row][:n] == want.tokens[row][:n]
    assert rt.engine.graph_keys() == _decode_layer_sets(schedule, len(LLAMA_PROMPTS))


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_torch_cuda_graphs_after_a_nan_request(runtimes, exports):
    rt = skipdeploy.load(exports["tiny"], backend="torch", device="cuda", dtype="float32")
    sched = SCHEDULES[1]
    _generate(rt, sched)
    for t in _free_pool(rt.engine, len(PROMPTS)).keys + _free_pool(rt.engine, len(PROMPTS)).values:
        t.fill_(float("nan"))
    got, want = _generate(rt, sched), _generate(runtimes["tiny", "onnxruntime"], sched)
    assert all(np.isfinite(x).all() for x in got.logits)
    for row in range(len(PROMPTS)):
        n = comparable_prefix(want.logits, row)
        assert got.tokens[row][:n] == want.tokens[row][:n]


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torch_cuda_n_runs_on_device_n(runtimes, exports):
    """cuda:1 puts the weights, the cache and the captured graphs on device 1, whatever device is
    current."""
    rt = skipdeploy.load(exports["tiny"], backend="torch", device="cuda:1", dtype="float32")
    sched = SCHEDULES[1]
    with torch.cuda.device(0):
        got = _generate(rt, sched)
    assert rt.engine.embed_w[next(iter(rt.engine.embed_w))].device == torch.device("cuda", 1)
    assert all(k.device == torch.device("cuda", 1) for k in _free_pool(rt.engine, len(PROMPTS)).keys)
    want = _generate(runtimes["tiny", "onnxruntime"], sched)
    for row in range(len(PROMPTS)):
        n = comparable_prefix(want.logits, row)
        assert got.tokens[row][:n] == want.tokens[row][:n]


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_torch_cuda_graph_replay_equals_eager_static_steps(exports):
    sched = SCHEDULES[1]
    graphs = skipdeploy.load(exports["tiny"], backend="torch", device="cuda")
    eager = skipdeploy.load(exports["tiny"], backend="torch", device="cuda", cuda_graphs=False, static_cache=True)
    counts = _Counts(graphs.engine)
    a, b = _generate(graphs, sched), _generate(eager, sched)
    assert graphs.engine.dtype == torch.float16 and counts.replays == len(a.layers_per_step)
    assert a.tokens == b.tokens
    for x, y in zip(a.logits, b.logits):  # fp16 logits: allow a few fp16 steps, not bit-identity
        assert np.abs(x - y).max() / max(1.0, float(np.abs(y).max())) < 5e-3


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("library", ["torch", "cupy"])
def test_cuda_memory_copies_round_trip(library):
    """The raw device buffers the TensorRT backend binds: upload, download, device copies and the
    strided row gather, with each library that can provide them."""
    if library == "cupy":
        pytest.importorskip("cupy", reason="CuPy is not installed here")
    from skipdeploy.engines.cuda_memory import CudaMemory

    memory = CudaMemory(0, prefer=library)
    a = np.arange(4096, dtype=np.float16).reshape(8, 512)
    buf = memory.alloc(a.nbytes, zero=True)
    memory.upload(buf, a)
    assert np.array_equal(memory.download(np.empty_like(a), buf), a)
    dst = memory.alloc(a.nbytes)
    memory.copy(dst, 0, buf, 0, a.nbytes)
    assert np.array_equal(memory.download(np.empty_like(a), dst), a)
    rows = memory.alloc(32)
    memory.copy_rows(rows, buf, 20, 4, 1024, 8)  # columns 10 and 11 of every row
    memory.synchronize()
    assert np.array_equal(memory.download(np.empty((8, 2), np.float16), rows), a[:, 10:12])


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_cuda_fp16_matches_fp32_reference(runtimes, exports, variant):
    rt = skipdeploy.load(exports[variant], backend="torch", device="cuda")
    for sched in SCHEDULES[:2]:
        got, want = _generate(rt, sched), _generate(runtimes[variant, "onnxruntime"], sched)
        _assert_fp16_close(got, want)


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_torch_cuda_cache_is_preallocated_on_the_device(exports):
    rt = skipdeploy.load(exports["tiny"], backend="torch", device="cuda")
    counts = _Counts(rt.engine)
    _generate(rt, SCHEDULES[0])
    pool = _free_pool(rt.engine, len(PROMPTS))
    assert all(k.is_cuda and k.dtype == torch.float16 for k in pool.keys + pool.values)
    pointers = [k.data_ptr() for k in pool.keys + pool.values]
    captures = counts.captures
    _generate(rt, SCHEDULES[1])
    assert [k.data_ptr() for k in pool.keys + pool.values] == pointers
    assert counts.captures > captures  # new layer sets, same buffers


# -- on a GPU: onnxruntime CUDA execution provider ------------------------------------------------------------
def _cuda_ep(exports):
    return cuda_provider_usable(read_manifest(exports["tiny"], verify=False).path("embed"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnxruntime_cuda_matches_cpu(runtimes, exports, variant):
    usable, why = _cuda_ep(exports)
    if not usable:
        pytest.skip(f"needs onnxruntime's CUDA execution provider: {why}")
    rt = skipdeploy.load(exports[variant], device="cuda")
    assert isinstance(rt.engine, OrtValueEngine) and rt.engine.pad == 1
    assert "CUDAExecutionProvider" in rt.engine.layer_sessions[0].get_providers()
    for sched in SCHEDULES[:3]:
        got, want = _generate(rt, sched), _generate(runtimes[variant, "onnxruntime"], sched)
        for row in range(len(PROMPTS)):
            n = comparable_prefix(want.logits, row, min_gap=1e-2)
            assert got.tokens[row][:n] == want.tokens[row][:n]
            for step in range(n):  # relative: the CUDA provider may use TF32 for float32 matmuls
                scale = max(1.0, float(np.abs(want.logits[step][row]).max()))
                assert np.abs(got.logits[step][row] - want.logits[step][row]).max() / scale < 1e-2


# -- on a GPU: TensorRT ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_export(exports, tmp_path_factory):
    if not HAS_TENSORRT:
        pytest.skip(NO_TENSORRT)
    if not HAS_CUDA:
        pytest.skip(NO_CUDA)
    from skipdeploy.engines.tensorrt_build import build_engines

    copy = tmp_path_factory.mktemp("trt") / "tiny"
    shutil.copytree(exports["tiny"], copy)
    build_engines(copy, max_batch=4, max_length=64, max_prompt=16, log=lambda m: None)
    return copy


def test_tensorrt_engines_match_onnxruntime_per_graph(trt_export):
    from skipdeploy.verify import _engines_against_onnxruntime

    checks = _engines_against_onnxruntime(skipdeploy.load(trt_export, backend="tensorrt").engine, 0, 1e-4)
    assert len(checks) == 1 + 4 + 1
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_tensorrt_decoding_matches_onnxruntime(trt_export, runtimes):
    rt = skipdeploy.load(trt_export, backend="tensorrt")
    for sched in SCHEDULES:
        got, want = _generate(rt, sched), _generate(runtimes["tiny", "onnxruntime"], sched)
        for row in range(len(PROMPTS)):
            n = comparable_prefix(want.logits, row)
            assert got.tokens[row][:n] == want.tokens[row][:n]
            for step in range(n):
                assert np.abs(got.logits[step][row] - want.logits[step][row]).max() < 1e-3


def test_tensorrt_engines_for_another_gpu_are_refused(trt_export, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(trt_export, copy)
    for meta_path in (copy / ENGINES_DIR).glob(f"*/{METADATA}"):
        meta = json.loads(meta_path.read_text())
        meta["gpu"] = "Some Other GPU"
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(BackendError, match=r"built for Some Other GPU.*skipdeploy build-engines"):
        skipdeploy.load(copy, backend="tensorrt")
    result = CliRunner().invoke(main, ["generate", str(copy), "--input-ids", "2,3", "--backend", "tensorrt"])
    _one_line_failure(result, "build-engines")


def test_tensorrt_verify_command(trt_export):
    result = CliRunner().invoke(main, ["verify", str(trt_export), "--backend", "tensorrt"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.output and "FAIL" not in result.output


def test_tensorrt_prompt_beyond_profile_is_one_line(trt_export):
    rt = skipdeploy.load(trt_export, backend="tensorrt")
    with pytest.raises(BackendError, match="does not fit the TensorRT engines' profile.*--max-prompt"):
        rt.generate([[2] * 20], 2)
