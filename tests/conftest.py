"""Shared fixtures: tiny random OPT checkpoints (both LayerNorm variants) and their exports.

No downloads: checkpoints are made with OPTConfig + save_pretrained. The 2-D weights are scaled
by 3 so that greedy choices are not near-ties.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch = pytest.importorskip("torch", reason="the export tests need torch (pip install 'skipdeploy[export]')")
transformers = pytest.importorskip("transformers", reason="the export tests need transformers")

import skipdeploy  # noqa: E402
from skipdeploy.random_checkpoint import make_checkpoint  # noqa: E402

VARIANTS = ["tiny", "tiny-post-ln"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    # Seeds picked so that the reference has no near-tied greedy choice in the compared steps.
    return {v: make_checkpoint(root / v, v, seed=seed, weight_scale=3.0) for v, seed in zip(VARIANTS, (2, 1))}


@pytest.fixture(scope="session")
def exports(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {v: skipdeploy.export(checkpoints[v], root / v, progress=False, log=lambda m: None).directory
            for v in VARIANTS}


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    from transformers import OPTForCausalLM

    return {v: OPTForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for v, p in checkpoints.items()}


@pytest.fixture(scope="session")
def runtimes(exports):
    return {(v, backend): skipdeploy.load(exports[v], backend=backend)
            for v in VARIANTS for backend in ("onnxruntime", "torch")}


PROMPTS = [[2, 45, 67, 89, 101, 7], [2, 300], [2, 11, 12, 13, 14, 15, 16, 17, 18, 19]]


def hf_generate(model, prompts, max_new_tokens, pad_token_id=1, eos_token_id=2):
    """Hugging Face greedy generate on a left-padded batch: (new tokens per row, logits per step)."""
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
