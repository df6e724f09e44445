"""Shared fixtures: tiny random OPT checkpoints (both LayerNorm variants) and their exports.

No downloads: checkpoints are made with OPTConfig + save_pretrained. The 2-D weights are scaled
by 3 so that greedy choices are not near-ties.

The runtime runs without torch, and so do its tests: in an install of the runtime's extras only
(serve, capi, test) there are no checkpoints, ``exports`` are written from numpy weights by
``numpy_export`` (same shapes and tokenizer, other weights), and a test that needs a checkpoint,
a transformers model, the torch backend or imports torch or transformers itself is skipped with
the reason. Reaching for torch anywhere else (the runtime, the server, the C API) fails the test.
"""

from __future__ import annotations

import importlib.util
import os
import traceback
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import skipdeploy  # noqa: E402

HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
NO_TORCH = "needs torch and transformers (pip install 'skipdeploy[export]'), which this install lacks"
TORCH_MODULES = ("torch", "transformers")
TESTS = Path(__file__).resolve().parent
PACKAGE = Path(skipdeploy.__file__).resolve().parent
# Code that needs the export extra by design (path prefixes): a test that reaches a torch import
# there needs torch. A torch import reached anywhere else breaks the runtime's promise and fails.
TORCH_SIDE = (str(TESTS) + os.sep, *(str(PACKAGE / p) for p in (
    "random_checkpoint.py", "exporter/check.py", "exporter/checkpoint.py", "exporter/export.py", "training" + os.sep,
    "verify.py", "gguf.py", "engines/torch_")))
# Tests that need torch where no fixture or exception shows it: the need shows in a subprocess,
# a command's output or a refusal that a test expects. (A test can say so itself: @needs_torch.)
NEEDS_TORCH = {
    "test_capi.py::test_loaded_into_a_python_process_it_answers_instead_of_hanging":
        "its host process imports torch, whose capsule version tag is what it tests",
    "test_cli.py::test_demo_runs_offline": "the demo exports the bundled model",
    "test_cli.py::test_user_errors_are_one_line_exit_1[args8-does not exist]": "it runs `skipdeploy export`",
    "test_cli.py::test_exporting_an_export_says_what_to_do_with_it": "it runs `skipdeploy export`",
    "test_cli.py::test_export_bundled": "it runs `skipdeploy export`",
    "test_bench.py::test_quantize_command_inspect_and_verify_against_the_float_export":
        "verify's reference is the torch backend, and inspect shows the float export's check against PyTorch",
    "test_bench.py::test_verify_fails_on_a_perturbed_int8_graph": "verify's reference is the torch backend",
}
VARIANTS = ["tiny", "tiny-post-ln"]

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason=NO_TORCH)


class _Absent:
    """Stands for torch where it is not installed, so that a test module using it in some tests
    imports: ``@torch.no_grad()`` decorates as a no-op, and any other use raises the
    ModuleNotFoundError that skips the test using it."""

    def __init__(self, name: str):
        self._module = name

    def no_grad(self):
        return lambda fn: fn

    def __getattr__(self, attr):
        raise ModuleNotFoundError(f"No module named {self._module!r}", name=self._module)


torch = importlib.import_module("torch") if HAS_TORCH else _Absent("torch")


def pytest_collection_modifyitems(items):
    if HAS_TORCH:
        return
    for item in items:
        where = Path(str(item.path)).name
        reason = NEEDS_TORCH.get(f"{where}::{item.name}") or NEEDS_TORCH.get(f"{where}::{item.originalname}")
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"{NO_TORCH}: {reason}"))


def _torch_import(exc: BaseException | None) -> str | None:
    """"FILE:LINE imports torch" when ``exc`` is, or was raised while handling, a failed import
    of torch or transformers made by a test or by torch-side code; else None."""
    if isinstance(exc, pytest.fail.Exception):  # a failure declared as such stays one
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in TORCH_MODULES:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            if str(Path(where.filename).resolve()).startswith(TORCH_SIDE):
                return f"{Path(where.filename).name}:{where.lineno} imports {exc.name}"
            return None
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without torch, a test that fails because it reached for torch (see ``_torch_import``) is
    reported as skipped, naming the import."""
    report = (yield).get_result()
    if HAS_TORCH or call.excinfo is None or report.when == "teardown":
        return
    where = _torch_import(call.excinfo.value)
    if where is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), (item.location[1] or 0) + 1, f"Skipped: {NO_TORCH} ({where})")


def skip_without(backend: str) -> None:
    """Skip the calling test when ``backend`` is torch's and this install has no torch."""
    if backend.startswith("torch") and not HAS_TORCH:
        pytest.skip(f"{NO_TORCH}: the test runs the torch backend")


class Lazy(dict):
    """key -> ``make(key)``, made when a test first asks for it: a test that never asks for the
    torch backend's runtime or engine runs without torch."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        value = self[key] = self.make(key)
        return value


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    if not HAS_TORCH:
        pytest.skip(f"{NO_TORCH}: the test uses a Hugging Face checkpoint")
    from skipdeploy.random_checkpoint import make_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    # Seeds picked so that the reference has no near-tied greedy choice in the compared steps.
    return {v: make_checkpoint(root / v, v, seed=seed, weight_scale=3.0) for v, seed in zip(VARIANTS, (2, 1))}


@pytest.fixture(scope="session")
def exports(request, tmp_path_factory):
    """The checkpoints' exports; without torch, exports of random numpy weights of the same shapes."""
    root = tmp_path_factory.mktemp("exports")
    if not HAS_TORCH:
        from .numpy_export import random_export

        try:
            return {v: random_export(root / v, v, seed=seed).directory for v, seed in zip(VARIANTS, (2, 1))}
        except ModuleNotFoundError as exc:  # a skip here would quietly skip every test that uses an export
            pytest.fail(f"writing the torch-free exports imported {exc.name}")
    checkpoints = request.getfixturevalue("checkpoints")
    return {v: skipdeploy.export(checkpoints[v], root / v, progress=False, log=lambda m: None).directory
            for v in VARIANTS}


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    from transformers import OPTForCausalLM

    return {v: OPTForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for v, p in checkpoints.items()}


@pytest.fixture(scope="session")
def runtimes(exports):
    """(variant, backend) -> Runtime."""
    return Lazy(lambda key: skip_without(key[1]) or skipdeploy.load(exports[key[0]], backend=key[1]))


PROMPTS = [[2, 45, 67, 89, 101, 7], [2, 300], [2, 11, 12, 13, 14, 15, 16, 17, 18, 19]]


def hf_generate(model, prompts, max_new_tokens, pad_token_id=1, eos_token_id=2):
    """Hugging Face greedy generate on a left-padded batch: (new tokens per row, logits per step)."""
    import torch

    B, Tp = len(prompts), max(map(len, prompts))
    ids = torch.full((B, Tp), pad_token_id)
    mask = torch.zeros(B, Tp, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, Tp - len(p):] = torch.tensor(p)
        mask[r, Tp - len(p):] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, output_logits=True,
                         return_dict_in_generate=True)
    rows = []
    for r in range(B):
        row = []
        for t in out.sequences[r, Tp:].tolist():
            row.append(t)
            if t == eos_token_id:
                break
        rows.append(row)
    return rows, [s.numpy() for s in out.logits]


def comparable_prefix(reference_logits, row, min_gap=1e-3):
    """Steps of ``row`` up to (excluding) the first whose reference top-2 gap is a near-tie."""
    for step, logits in enumerate(reference_logits):
        top2 = np.sort(logits[row])[-2:]
        if top2[1] - top2[0] < min_gap:
            return step
    return len(reference_logits)


def run_cli(*args):
    """The command line in this process, as a user types it (every argument as a string)."""
    from click.testing import CliRunner

    from skipdeploy.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def edited_export(export, out, graph, initializer, edit):
    """A copy of ``export`` whose ``graph`` has ``initializer`` replaced by ``edit(array)``, with the
    manifest's sha256 updated: a consistent export whose numbers are wrong."""
    import json
    import shutil

    import onnx
    from onnx import numpy_helper

    from skipdeploy.manifest import describe_file

    shutil.copytree(export, out)
    path = out / graph
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == initializer:
            init.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init).copy()), init.name))
    onnx.save(model, str(path))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][graph] = describe_file(path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def with_nan_column(weights):
    weights[:, 0] = np.nan
    return weights
