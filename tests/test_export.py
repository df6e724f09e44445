"""The exporter: graphs, manifest, atomic writes, checks (onnxruntime against transformers)."""

from __future__ import annotations

import hashlib
import json
import signal
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="the exporter needs torch (pip install 'skipdeploy[export]')")

import skipdeploy
from skipdeploy.errors import CheckpointError, ExportError, ManifestError
from skipdeploy.manifest import read_manifest

from .conftest import VARIANTS


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_graph_keeps_symbolic_dims(exports, variant):
    m = read_manifest(exports[variant])
    want = {"input_ids": ["batch", "new_tokens"], "position_ids": ["batch", "new_tokens"], "hidden": ["batch", "new_tokens"],
            "past_key": ["past_tokens", "batch"], "past_value": ["past_tokens", "batch"],
            "attention_bias": ["batch", "total_tokens"], "hidden_out": ["batch", "new_tokens"],
            "key": ["new_tokens", "batch"], "value": ["new_tokens", "batch"], "logits": ["batch"]}
    files = ["embed.onnx", "head.onnx"] + [f"layer_{i:02d}.onnx" for i in range(m.model.num_layers)]
    for name in files:
        model = onnx.load(str(m.directory / name))
        for value in list(model.graph.input) + list(model.graph.output):
            dims = [d.dim_param for d in value.type.tensor_type.shape.dim]
            expected = want[value.name][:1] if name == "head.onnx" else want[value.name]
            assert dims[:len(expected)] == expected, (name, value.name, dims)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_layer_runs_with_empty_past_and_matches_transformers(exports, hf_models, variant):
    """P = 0 (the prefill case): hidden, keys and values against the HF layer's own forward."""
    hf = hf_models[variant]
    cfg = hf.config
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    B, T = 3, 5
    x = torch.randn(B, T, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.full((T, T), torch.finfo(torch.float32).min), 1)[None, None].expand(B, 1, T, T)
    for index, layer in enumerate(hf.model.decoder.layers):
        want = layer(x, attention_mask=mask)
        want = want[0] if isinstance(want, tuple) else want
        h = layer.self_attn_layer_norm(x) if cfg.do_layer_norm_before else x
        want_k = layer.self_attn.k_proj(h).view(B, T, H, D).transpose(0, 1)
        empty = np.zeros((0, B, H, D), np.float32)
        hidden, key, value = _session(exports[variant] / f"layer_{index:02d}.onnx").run(None, {
            "hidden": x.numpy(), "past_key": empty, "past_value": empty,
            "attention_bias": np.zeros((B, T), np.float32)})
        assert np.abs(hidden - want.numpy()).max() < 1e-4
        assert np.abs(key - want_k.numpy()).max() < 1e-4
        assert key.shape == value.shape == (T, B, H, D)


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifest_lists_every_file_with_its_sha256(exports, variant):
    directory = exports[variant]
    data = json.loads((directory / "manifest.json").read_text())
    assert data["format_version"] == 2
    on_disk = {p.name for p in directory.iterdir() if p.name != "manifest.json"}
    assert set(data["files"]) == on_disk
    for name, info in data["files"].items():
        blob = (directory / name).read_bytes()
        assert info["sha256"] == hashlib.sha256(blob).hexdigest() and info["size"] == len(blob)
    assert data["model"]["layer_norm"] == ("pre" if variant == "tiny" else "post")
    assert max(data["check"]["max_abs_error"].values()) < 1e-4
    assert "tokenizer.json" in on_disk
    assert not list(directory.parent.glob(".*partial*")), "temporary directories left behind"


def test_tokenizer_matches_transformers(exports, checkpoints):
    from transformers import AutoTokenizer

    runtime = skipdeploy.load(exports["tiny"])
    hf = AutoTokenizer.from_pretrained(checkpoints["tiny"])
    for text in ["def greet(name):", "The quick brown fox", "print(i * i)"]:
        assert runtime.tokenizer.encode(text) == hf(text)["input_ids"]


def test_existing_output_needs_force(checkpoints, exports, tmp_path):
    with pytest.raises(ExportError, match="already exists"):
        skipdeploy.export(checkpoints["tiny"], exports["tiny"], progress=False)
    out = tmp_path / "again"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    skipdeploy.export(checkpoints["tiny"], out, force=True, progress=False, log=lambda m: None)
    assert not (out / "stale.txt").exists() and read_manifest(out).model.num_layers == 4


def test_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="is a GPT2LMHeadModel checkpoint; skipdeploy exports OPTForCausalLM, "
                                              "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        skipdeploy.export(tmp_path / "gpt2", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        skipdeploy.export(tmp_path / "nope", tmp_path / "out", progress=False)


def test_failed_export_leaves_nothing(checkpoints, tmp_path):
    """A schedule for the wrong number of layers fails after loading; nothing may remain."""
    with pytest.raises(ExportError):
        skipdeploy.export(checkpoints["tiny"], tmp_path / "out", schedule=skipdeploy.Schedule.full(7),
                          progress=False)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_graph_is_refused_by_name(exports, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exports["tiny"], copy)
    path = copy / "layer_01.onnx"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match="layer_01.onnx does not match its sha256"):
        skipdeploy.load(copy)
    path.write_bytes(bytes(blob[:100]))
    with pytest.raises(ManifestError, match="layer_01.onnx has 100 bytes"):
        skipdeploy.load(copy)
    path.unlink()
    with pytest.raises(ManifestError, match="layer_01.onnx is missing"):
        skipdeploy.load(copy)


def test_fp16_export_runs_close_to_fp32(checkpoints, exports, tmp_path):
    m = skipdeploy.export(checkpoints["tiny"], tmp_path / "fp16", dtype="float16", progress=False,
                          log=lambda m: None)
    assert m.dtype == "float16"
    prompts = [[2, 5, 6, 7], [2, 9]]
    a = skipdeploy.load(m.directory).generate(prompts, 4, output_logits=True)
    b = skipdeploy.load(exports["tiny"]).generate(prompts, 4, output_logits=True)
    assert np.abs(a.logits[0] - b.logits[0]).max() < 5e-2


def test_export_quantize_writes_the_int8_export_under_one_lock(checkpoints, tmp_path):
    """export(quantize="int8") writes OUT through quantize_export while holding OUT's lock itself:
    the nested staging takes the lock again (same thread) instead of refusing its own export."""
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "int8"
    m = skipdeploy.export(checkpoints["tiny"], out, quantize="int8", progress=False, log=lambda m: None)
    assert m.directory == out and m.raw["quantization"]["weights"] == "int8"
    assert m.raw["quantization"]["source"] is None
    assert read_manifest(out, verify=True).model.num_layers == 4
    assert [p.name for p in tmp_path.iterdir()] == ["int8"], "partial or lock files left behind"
    assert signal.getsignal(signal.SIGTERM) == handler, "the SIGTERM handler was not restored"


def test_staging_lock_refuses_other_threads_and_rechecks_the_output(tmp_path):
    import os

    from skipdeploy.exporter.staging import lock_file, move_into_place, staging_directory

    out = tmp_path / "out"
    refused = []

    def other():
        try:
            with staging_directory(out):
                pass
        except ExportError as exc:
            refused.append(str(exc))

    with staging_directory(out) as tmp:
        assert lock_file(out).is_file()
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=30)
        assert refused == [f"{out} is being written by another export (process {os.getpid()}); "
                           "wait for it to finish or write to another directory"]
        with staging_directory(out) as inner:  # the same thread again: re-entrant (export --quantize)
            (inner / "x").write_text("inner")
            move_into_place(inner, out)
        (tmp / "y").write_text("outer")
        move_into_place(tmp, out)
    assert [p.name for p in out.iterdir()] == ["y"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "partial or lock files left behind"
    # "out exists" is checked again under the lock: a directory that appeared after the caller's
    # own check is refused, not replaced.
    with pytest.raises(ExportError, match="already exists"):
        with staging_directory(out):
            pass
    (tmp_path / ".out.old-0123abcd").mkdir()  # a replaced export a killed run did not delete
    with staging_directory(out, force=True) as tmp:
        assert not (tmp_path / ".out.old-0123abcd").exists()
        (tmp / "z").write_text("forced")
        move_into_place(tmp, out)
    assert [p.name for p in out.iterdir()] == ["z"] and [p.name for p in tmp_path.iterdir()] == ["out"]
