"""The TensorRT backend's boundary: TensorRT's exceptions become one BackendError line, and
``cuda:N`` means CUDA device N (parsing, bad indices, the device made current around TensorRT).

The CPU tests run the real helpers (``trt_call``, ``parse_cuda_device``, ``visible_devices``,
``use_device``, the engine's and builder's device checks) with plain Python callables that raise
as the bindings do; nothing stands in for TensorRT, torch's CUDA or CuPy. Tests of the real
bindings and devices are skipped, with the reason, unless they are really there.
"""

from __future__ import annotations

import importlib.util
import shutil
import traceback

import numpy as np
import pytest

import skipdeploy
from skipdeploy.engines.cuda_memory import (CudaMemory, gpu_identity, no_such_device, parse_cuda_device, use_device,
                                            visible_devices)
from skipdeploy.engines.tensorrt_build import build_engines, require_tensorrt, trt_call
from skipdeploy.errors import BackendError
from skipdeploy.manifest import read_manifest

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUPY = importlib.util.find_spec("cupy") is not None
NO_TENSORRT = "needs TensorRT (not installed here: its pip packages download libraries at install time)"


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


CUDA_COUNT = _cuda_count()
NO_CUDA = "needs an NVIDIA GPU and a CUDA build of torch (none here)"
ONE_GPU = f"needs two CUDA devices ({CUDA_COUNT} here)"


def _one_line(exc: BaseException, *needles: str) -> str:
    """The message a user sees: one line, with ``needles``, and no chained traceback under it."""
    message = str(exc)
    assert "\n" not in message and all(n in message for n in needles), message
    shown = "".join(traceback.format_exception(exc))
    assert "During handling of the above exception" not in shown and "direct cause" not in shown, shown
    return message


# -- trt_call ------------------------------------------------------------------------------------------------
def _raises(exc: BaseException):
    def call(*args, **kwargs):
        raise exc
    return call


def test_trt_call_turns_runtime_error_into_one_line():
    raising = _raises(RuntimeError("Error in set optimization profile async.\n  at IExecutionContext.cpp:123"))
    with pytest.raises(BackendError) as info:
        trt_call("to select profile 1 (prefill) of layer_03.plan on cuda:1", "rebuild the engines with "
                 "`skipdeploy build-engines out --force`", raising, 1, 0)
    message = _one_line(info.value, "TensorRT failed to select profile 1 (prefill) of layer_03.plan on cuda:1",
                        "Error in set optimization profile async", "skipdeploy build-engines out --force")
    assert "IExecutionContext.cpp" not in message  # only TensorRT's first line
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_trt_call_names_an_empty_message_by_its_type():
    with pytest.raises(BackendError, match=r"^TensorRT failed to run x: RuntimeError; see above$"):
        trt_call("to run x", "see above", _raises(RuntimeError()))


def test_trt_call_returns_what_the_call_returns_and_passes_its_arguments():
    assert trt_call("to add", "none", lambda a, b=0: a + b, 2, b=3) == 5
    assert trt_call("to refuse", "none", lambda: False) is False  # returned failures are the caller's to check


@pytest.mark.parametrize("error", [TypeError("incompatible function arguments"), ValueError("bad"),
                                   KeyError("hidden"), ZeroDivisionError("internal bug")])
def test_trt_call_lets_other_exceptions_through(error):
    """A TypeError from a wrong argument or any other bug of ours is not dressed up as TensorRT's."""
    with pytest.raises(type(error)) as info:
        trt_call("to bind hidden", "none", _raises(error))
    assert info.value is error


def test_trt_call_converts_the_extra_types_it_is_told_to():
    # pybind11 factories (trt.Builder, trt.Runtime) raise TypeError when TensorRT returns null.
    with pytest.raises(BackendError) as info:
        trt_call("to create a runtime on cuda:0", "check the NVIDIA driver",
                 _raises(TypeError("pybind11::init(): factory function returned nullptr")),
                 errors=(RuntimeError, TypeError))
    _one_line(info.value, "TensorRT failed to create a runtime on cuda:0", "factory function returned nullptr",
              "check the NVIDIA driver")


def test_trt_call_makes_a_lazy_description_only_on_failure():
    made = []

    def what():
        made.append(1)
        return "to set input hidden to [2, 1, 16]"

    trt_call(what, "none", lambda: True)
    assert made == []
    with pytest.raises(BackendError, match=r"failed to set input hidden to \[2, 1, 16\]: out of range;"):
        trt_call(what, "rebuild", _raises(RuntimeError("out of range")))
    assert made == [1]


# -- cuda:N ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, index", [(None, 0), ("cuda", 0), ("cuda:0", 0), ("cuda:3", 3), (" cuda:12 ", 12),
                                           (2, 2), (np.int64(1), 1)])
def test_parse_cuda_device(device, index):
    assert parse_cuda_device(device) == index


@pytest.mark.parametrize("device", ["cuda:", "cuda:x", "cuda:-1", "cuda:1.0", "cuda:１", "gpu:0", "cpu", "CUDA:1",
                                    "cuda:0:1", -1, True, 1.0])
def test_a_bad_device_is_one_line(device):
    with pytest.raises(BackendError) as info:
        parse_cuda_device(device)
    _one_line(info.value, repr(device) if not isinstance(device, str) else device.strip(), "cuda:")


@pytest.mark.parametrize("device, parsed", [(None, (None, None)), ("cpu", ("cpu", None)), ("cuda", ("cuda", None)),
                                            ("cuda:0", ("cuda", 0)), ("cuda:3", ("cuda", 3))])
def test_every_door_s_device_reads_cuda_n_as_the_gpu_backends_do(device, parsed):
    """create_engine's reading of --device/device= takes its CUDA part from parse_cuda_device."""
    from skipdeploy.engines import parse_device

    assert parse_device(device) == parsed


@pytest.mark.parametrize("device", ["tpu", "cpu:0", "cuda:", "cuda:x", "cuda:-1", "CUDA", 0])
def test_an_unknown_device_names_the_known_ones(device):
    from skipdeploy.engines import parse_device

    with pytest.raises(BackendError, match=r"unknown device .*; choose one of cpu, cuda, cuda:N$"):
        parse_device(device)


def test_a_missing_device_names_the_ones_there(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _one_line(no_such_device(4, 2, "torch 2.11"), "no CUDA device cuda:4", "torch 2.11 sees cuda:0 .. cuda:1")
    _one_line(no_such_device(1, 1, "CuPy 14"), "sees cuda:0;")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    _one_line(no_such_device(1, 1, "nvidia-smi"), "CUDA_VISIBLE_DEVICES=3 numbers the visible ones from 0")


ROWS = [{"index": "0", "uuid": "GPU-aaaa1111", "gpu": "NVIDIA A100", "compute_capability": "8.0"},
        {"index": "1", "uuid": "GPU-bbbb2222", "gpu": "NVIDIA H200", "compute_capability": "9.0"},
        {"index": "2", "uuid": "GPU-cccc3333", "gpu": "NVIDIA L4", "compute_capability": "8.9"}]


@pytest.mark.parametrize("env, gpus", [(None, ["NVIDIA A100", "NVIDIA H200", "NVIDIA L4"]),
                                       ("1", ["NVIDIA H200"]), ("2,0", ["NVIDIA L4", "NVIDIA A100"]),
                                       ("GPU-bbbb", ["NVIDIA H200"]), ("1, GPU-cccc3333", ["NVIDIA H200", "NVIDIA L4"]),
                                       ("1,7,0", ["NVIDIA H200"]), ("", []), ("-1", []), ("GPU-", [])])
def test_cuda_visible_devices_renumbers_nvidia_smi_rows(env, gpus):
    """cuda:N is the Nth visible device (CUDA stops at the first entry naming none), so nvidia-smi's
    own index is not N when CUDA_VISIBLE_DEVICES is set."""
    assert [row["gpu"] for row in visible_devices(ROWS, env)] == gpus


def test_mig_entries_cannot_be_mapped():
    assert visible_devices(ROWS, "MIG-0f1e2d3c") is None


def test_the_engine_refuses_a_bad_device_before_loading_anything(exports):
    from skipdeploy.engines.tensorrt_engine import TensorRTEngine

    manifest = read_manifest(exports["tiny"], verify=False)
    with pytest.raises(BackendError) as info:
        TensorRTEngine(manifest, device_id="cuda:one")
    _one_line(info.value, "unknown CUDA device 'cuda:one'", "cuda:N")


def test_build_engines_and_the_early_check_refuse_a_bad_device(exports):
    for call in (lambda: build_engines(exports["tiny"], device_id="gpu1", log=lambda m: None),
                 lambda: require_tensorrt("cuda:first")):
        with pytest.raises(BackendError) as info:
            call()
        _one_line(info.value, "unknown CUDA device", "cuda:N")


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the error when TensorRT is absent; it is installed here")
def test_load_takes_cuda_n_for_tensorrt(exports):
    """load(device="cuda:N") is accepted for the tensorrt backend (here it then stops at TensorRT's
    import, not installed); a malformed one is one line before anything loads."""
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        skipdeploy.load(exports["tiny"], backend="tensorrt", device="cuda:1", check_files=False)
    with pytest.raises(BackendError) as info:
        skipdeploy.load(exports["tiny"], backend="tensorrt", device="cuda:x", check_files=False)
    _one_line(info.value, "cuda:x")


def test_gpu_memory_library_and_device_are_checked():
    with pytest.raises(BackendError) as info:
        CudaMemory(0, prefer="numba")
    _one_line(info.value, "unknown GPU memory library 'numba'", "torch, cupy")
    with pytest.raises(BackendError) as info:
        CudaMemory("cuda:zero")
    _one_line(info.value, "unknown CUDA device 'cuda:zero'")


@pytest.mark.skipif(CUDA_COUNT > 0 or HAS_CUPY, reason="checks the errors without torch CUDA and CuPy")
def test_without_a_gpu_library_only_device_0_can_be_current():
    with use_device("cuda:0") as index:
        assert index == 0
    with pytest.raises(BackendError) as info:
        with use_device("cuda:1"):
            pass
    _one_line(info.value, "selecting cuda:1 needs torch with CUDA or CuPy", "CUDA_VISIBLE_DEVICES=1")
    with pytest.raises(BackendError) as info:
        CudaMemory("cuda:1")
    _one_line(info.value, "GPU buffers need torch with CUDA or CuPy")


@pytest.mark.skipif(CUDA_COUNT > 0 or HAS_CUPY or shutil.which("nvidia-smi") is not None,
                    reason="checks the error on a machine without a GPU")
def test_identity_without_a_gpu_is_one_line():
    with pytest.raises(BackendError) as info:
        gpu_identity("cuda:2")
    _one_line(info.value, "cannot identify CUDA device cuda:2")


# -- on a GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(CUDA_COUNT == 0, reason=NO_CUDA)
def test_an_index_beyond_the_devices_is_one_line():
    beyond = f"cuda:{CUDA_COUNT}"
    for call in (lambda: CudaMemory(beyond), lambda: gpu_identity(beyond), lambda: use_device(beyond).__enter__()):
        with pytest.raises(BackendError) as info:
            call()
        _one_line(info.value, f"there is no CUDA device {beyond}", "cuda:0")


@pytest.mark.skipif(CUDA_COUNT == 0, reason=NO_CUDA)
@pytest.mark.parametrize("library", ["torch", "cupy"])
def test_memory_on_device_n_is_current_only_inside_activate(library):
    if library == "cupy" and not HAS_CUPY:
        pytest.skip("CuPy is not installed here")
    import torch

    index = CUDA_COUNT - 1  # the last device: a different one from the default when there are two
    memory = CudaMemory(f"cuda:{index}", prefer=library)
    before = torch.cuda.current_device()
    with memory.activate():
        assert torch.cuda.current_device() == index
    assert torch.cuda.current_device() == before
    a = np.arange(256, dtype=np.float32)
    buf = memory.alloc(a.nbytes, zero=True)
    memory.upload(buf, a)
    assert np.array_equal(memory.download(np.empty_like(a), buf), a)
    if library == "torch":
        assert buf.owner.device == torch.device("cuda", index)
    else:
        assert buf.owner.device_id == index
    assert gpu_identity(index)["gpu"] == torch.cuda.get_device_name(index)


@pytest.mark.skipif(not (HAS_TENSORRT and CUDA_COUNT), reason=NO_TENSORRT if not HAS_TENSORRT else NO_CUDA)
def test_real_tensorrt_runtime_errors_become_one_line():
    """IOptimizationProfile.set_shape raises RuntimeError when opt < min (PY_ASSERT_RUNTIME_ERROR in
    the bindings): trt_call turns the real exception into one line."""
    import tensorrt as trt

    with use_device(0):
        builder = trt_call("to create a builder", "check the driver", trt.Builder, trt.Logger(trt.Logger.ERROR),
                           errors=(RuntimeError, TypeError))
        profile = builder.create_optimization_profile()
        with pytest.raises(BackendError) as info:
            trt_call("to set profile 0 of layer_00.onnx", "pass other --max-batch", profile.set_shape, "hidden",
                     (2, 4), (1, 4), (4, 4))
    _one_line(info.value, "TensorRT failed to set profile 0 of layer_00.onnx", "inconsistent", "--max-batch")


@pytest.fixture(scope="module")
def trt_export(exports, tmp_path_factory):
    if not (HAS_TENSORRT and CUDA_COUNT):
        pytest.skip(NO_TENSORRT if not HAS_TENSORRT else NO_CUDA)
    copy = tmp_path_factory.mktemp("trt-boundary") / "tiny"
    shutil.copytree(exports["tiny"], copy)
    build_engines(copy, max_batch=4, max_length=64, max_prompt=16, device_id=f"cuda:{CUDA_COUNT - 1}",
                  log=lambda m: None)
    return copy


def test_a_refused_profile_is_one_line_on_the_real_bindings(trt_export):
    """set_optimization_profile_async raises (TensorRT 10.16, 11.1) or returns False (older) for a
    profile the engine lacks: either way one line naming the graph."""
    rt = skipdeploy.load(trt_export, backend="tensorrt", device=f"cuda:{CUDA_COUNT - 1}")
    graph = rt.engine.layer_graphs[0]
    with rt.engine.memory.activate():
        try:
            ok = trt_call("to select profile 7 of layer_00.plan", "rebuild",
                          graph.contexts[0].set_optimization_profile_async, 7, rt.engine.memory.stream)
        except BackendError as exc:
            _one_line(exc, "TensorRT failed to select profile 7 of layer_00.plan", "rebuild")
        else:
            assert ok is False


@pytest.mark.skipif(CUDA_COUNT < 2, reason=ONE_GPU)
def test_tensorrt_runs_on_device_n(trt_export):
    import torch

    before = torch.cuda.current_device()
    rt = skipdeploy.load(trt_export, backend="tensorrt", device=f"cuda:{CUDA_COUNT - 1}")
    assert rt.engine.memory.device_id == CUDA_COUNT - 1
    assert rt.engine.entry.metadata["gpu"] == torch.cuda.get_device_name(CUDA_COUNT - 1)
    out = rt.generate([[2, 3, 4]], 3, eos_token_id=None)
    assert len(out.tokens[0]) == 3
    assert torch.cuda.current_device() == before  # the engine makes its device current only around its calls
