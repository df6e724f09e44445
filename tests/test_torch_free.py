"""The runtime's promise to run without torch: what the doors import, the torch-free exports the
tests use where torch is missing, and a Llama-family export through the doors without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import skipdeploy

from . import numpy_export
from .conftest import VARIANTS

IGNORED = ("check", "tools", "source", "created")  # what says where an export came from


def _family_weights(checkpoint):
    from skipdeploy.exporter.checkpoint import load_model
    from skipdeploy.families import for_model_type

    spec, model = load_model(checkpoint)
    family = for_model_type(spec.model_type)
    return spec, {"embed": family.embed_weights(model, spec), "head": family.head_weights(model, spec),
                  "layers": [family.layer_weights(model, i, spec) for i in range(spec.num_layers)]}


def _same_layout(a: dict, b: dict) -> bool:
    """The same weights (None or left out: the model has none), each of one shape and dtype in both."""
    def layout(w, k):
        return None if w.get(k) is None else (w[k].shape, w[k].dtype)
    return all(layout(a, k) == layout(b, k) for k in a.keys() | b.keys())


def _same_export(a, b) -> None:
    """Every file byte-identical (the manifest's sha256 list says so) and the manifest equal but
    for its provenance."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ma.items() if k not in IGNORED} == {k: v for k, v in mb.items() if k not in IGNORED}


def test_numpy_exports_are_what_the_exporter_writes(checkpoints, exports, tmp_path):
    """Fed a checkpoint's weights, the torch-free writer writes the exporter's files, and its random
    weights have the family's names, shapes and dtypes: the torch-free session's exports differ
    from the exporter's in their numbers only."""
    from skipdeploy.random_checkpoint import make_checkpoint

    llama = make_checkpoint(tmp_path / "tiny-llama", "tiny-llama", seed=0)
    sources = {**{v: (checkpoints[v], exports[v]) for v in VARIANTS},
               "tiny-llama": (llama, skipdeploy.export(llama, tmp_path / "llama-export", progress=False,
                                                         log=lambda m: None).directory)}
    for shape, (checkpoint, export) in sources.items():
        spec, weights = _family_weights(checkpoint)
        assert numpy_export.spec_of(shape) == spec, shape
        ours = numpy_export.write_export(tmp_path / f"numpy-{shape}", spec, weights,
                                         tokenizer=numpy_export.tokenizer(spec),
                                         schedule=skipdeploy.load(export, check_files=False).manifest.schedule)
        _same_export(export, ours.directory)
        drawn = numpy_export.random_weights(spec)
        assert _same_layout(drawn["embed"], weights["embed"]) and _same_layout(drawn["head"], weights["head"])
        assert all(_same_layout(d, w) for d, w in zip(drawn["layers"], weights["layers"], strict=True))


DOORS = r"""
import json, sys

class Block:  # as on an install without torch: importing it fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Block())
export, prompt = sys.argv[1], [2, 45, 67, 89]

import skipdeploy
want = skipdeploy.load(export).generate([prompt], 3).tokens[0]
assert skipdeploy.load(export).generate_text(["def greet"], 2).text

from click.testing import CliRunner
from skipdeploy.cli import main
assert CliRunner().invoke(main, ["--help"]).exit_code == 0
out = CliRunner().invoke(main, ["generate", export, "--input-ids", ",".join(map(str, prompt)), "--max-new-tokens", "3",
                                "--json"], catch_exceptions=False)
assert json.loads(out.stdout)["tokens"] == [want], out.output

from fastapi.testclient import TestClient
from skipdeploy.serving import ServingEngine
from skipdeploy.serving.server import create_app
app = create_app(lambda observer: ServingEngine(export, max_batch=2, observer=observer), model_name="m", num_layers=4)
with TestClient(app) as client:
    for _ in range(600):  # the engine loads in a thread at startup
        if client.get("/health").status_code == 200:
            break
        __import__("time").sleep(0.1)
    body = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 3,
                                                "temperature": 0, "ignore_eos": False}).json()
    assert body["choices"][0]["skipdecode"]["token_ids"] == want, body

from skipdeploy.capi import bridge
b = bridge.Bridge()
handle = b.load(export, '{"threads": 1}')
assert b.generate(handle, prompt, '{"max_new_tokens": 3}') == want
b.free(handle)

import skipdeploy.triton.model, skipdeploy.triton.server  # noqa: E401
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})
print("imported:", loaded)
"""


@pytest.mark.slow
def test_runtime_cli_server_and_c_bridge_import_nothing_from_torch(exports):
    """``import skipdeploy``, ``load``, the CLI (``--help``, ``generate``), the OpenAI server, the C
    API's bridge and the Triton model, in a process where torch and transformers cannot be
    imported: each works and none was imported."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(DOORS), str(exports["tiny"])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "imported: []"


def test_a_llama_export_through_the_doors_without_torch(tmp_path):
    """A grouped-query, RoPE export written without torch gives ``Runtime.generate``'s tokens
    through the in-flight engine and the C API's bridge."""
    from skipdeploy.capi import bridge
    from skipdeploy.serving import ServingEngine

    export = numpy_export.random_export(tmp_path / "llama", "tiny-llama", seed=0).directory
    runtime = skipdeploy.load(export, threads=1)
    prompts = [[1, 45, 67, 89, 101, 7], [1, 300], [1, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    want = [runtime.generate([p], 8, eos_token_id=None).tokens[0] for p in prompts]
    assert runtime.generate(prompts, 8, eos_token_id=None).tokens == want
    engine = ServingEngine(export, max_batch=3, threads=1)
    try:
        requests = [engine.submit(p, 8, eos_token_id=None) for p in prompts]
        assert [r.result(timeout=120).tokens[0] for r in requests] == want
    finally:
        engine.shutdown()
    b = bridge.Bridge()
    handle = b.load(str(export), '{"threads": 1}')
    try:
        assert [b.generate(handle, p, '{"max_new_tokens": 8, "ignore_eos": true}') for p in prompts] == want
    finally:
        b.free(handle)
