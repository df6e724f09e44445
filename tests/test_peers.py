"""The benchmark's peer engines (CTranslate2, onnxruntime-genai; skipdeploy/bench/peers.py) and
tools/peer_bench.py, on tiny random checkpoints, against Hugging Face ``generate`` as an independent
reference. Greedy tokens are compared up to the first step whose reference top-2 gap is a
near-tie (< 1e-3). A peer that is not installed is skipped; the missing-library path is tested
without it. No timing assertions.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the peer tests need torch (pip install 'skipdeploy[export]')")
pytest.importorskip("transformers", reason="the peer tests need transformers")

from skipdeploy.bench import peers  # noqa: E402
from skipdeploy.errors import BackendError  # noqa: E402
from skipdeploy.random_checkpoint import SHAPES, make_checkpoint  # noqa: E402

B, P, N = 3, 8, 12
ROOT = Path(__file__).resolve().parents[1]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_ct2 = pytest.mark.skipif(not installed("ctranslate2"), reason="ctranslate2 is not installed "
                               "(pip install 'skipdeploy[bench]')")
needs_og = pytest.mark.skipif(not (installed("onnxruntime_genai") and installed("onnx_ir")),
                              reason="onnxruntime-genai / onnx-ir are not installed (pip install 'skipdeploy[bench]')")


def prompts_for(vocab: int, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng(seed).integers(4, vocab, size=(B, P)).tolist()


def reference(checkpoint: Path, prompts: list[list[int]], new_tokens: int):
    """Hugging Face greedy tokens (EOS suppressed, like the peers) and the logits of every step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:].tolist(), [s.float().numpy() for s in out.logits]


def comparable(logits: list[np.ndarray], row: int, min_gap: float = 1e-3) -> int:
    """Steps of ``row`` before the first whose reference top-2 gap is a near-tie."""
    for step, step_logits in enumerate(logits):
        top2 = np.sort(step_logits[row])[-2:]
        if top2[1] - top2[0] < min_gap:
            return step
    return len(logits)


def check_shape(run, new_tokens: int = N) -> None:
    assert [len(t) for t in run.tokens] == [new_tokens] * B  # EOS ignored: every row makes N tokens
    assert len(run.token_times) == new_tokens - 1
    assert run.ttft > 0 and all(t >= 0 for t in run.token_times)


def check_against_hf(run, checkpoint: Path, prompts) -> None:
    check_shape(run)
    ref, logits = reference(checkpoint, prompts, N)
    compared = 0
    for r in range(B):
        k = comparable(logits, r)
        assert run.tokens[r][:k] == ref[r][:k], f"row {r}: {run.tokens[r]} vs Hugging Face {ref[r]} (first {k})"
        compared += k
    assert compared >= B * N // 2, "too many near-ties to compare (pick another seed)"


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return float(np.mean([x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)]))


@pytest.fixture(scope="module")
def opt_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("peers") / "opt", "tiny", seed=2, weight_scale=3.0)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    if "tiny-llama" not in SHAPES:
        pytest.skip("skipdeploy.random_checkpoint has no 'tiny-llama' shape yet")
    return make_checkpoint(tmp_path_factory.mktemp("peers") / "llama", "tiny-llama", seed=0, weight_scale=3.0)


# -- the missing-library and unsupported paths (no peer library needed) -----------------------------
@pytest.mark.parametrize("cls, module, install", [(peers.CTranslate2Runner, "ctranslate2", "pip install ctranslate2"),
                                                  (peers.OrtGenAIRunner, "onnxruntime_genai",
                                                   "pip install onnxruntime-genai")])
def test_missing_library_is_one_backend_error(tmp_path, monkeypatch, cls, module, install):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 16}))
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(BackendError, match=install) as info:
        cls(tmp_path / "ckpt", tmp_path / "work").prepare()
    assert "\n" not in str(info.value)
    assert not (tmp_path / "work").exists()


def test_ortgenai_refuses_opt_before_building(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "vocab_size": 16}))
    with pytest.raises(BackendError, match="no OPT"):
        peers.peer("ortgenai-fp32", tmp_path, tmp_path / "work")


def test_a_foreign_work_directory_is_left_alone(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 16}))
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    runner = peers.CTranslate2Runner(tmp_path, tmp_path / "work")
    monkeypatch.setattr(peers, "require", lambda module, install: None)
    with pytest.raises(BackendError, match="holds no conversion"):
        runner.prepare()
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine"


def test_peer_names_and_options(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "vocab_size": 16}))
    with pytest.raises(Exception, match="unknown peer"):
        peers.peer("ct2-fp64", tmp_path, tmp_path / "work")
    with pytest.raises(Exception, match="quantization"):
        peers.CTranslate2Runner(tmp_path, tmp_path / "w", quantization="int3")
    with pytest.raises(Exception, match="precision"):
        peers.OrtGenAIRunner(tmp_path, tmp_path / "w", precision="fp8")
    with pytest.raises(Exception, match="equal length"):
        peers.equal_lengths([[4, 5], [6]])


def eos_everywhere(checkpoint: Path, out: Path, prompts) -> Path:
    """A copy of ``checkpoint`` whose EOS (2) is the greedy choice at every step: its LM-head row
    points along the mean final hidden state (the head untied from the embedding first)."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(torch.tensor(prompts)).last_hidden_state
        direction = hidden.reshape(-1, hidden.shape[-1]).mean(0)
        head = model.lm_head.weight.detach().clone()
        head[2] = 20 * head.norm(dim=1).max() * direction / direction.norm()
        model.lm_head.weight = torch.nn.Parameter(head)
        model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    for path in Path(checkpoint).iterdir():
        if path.name.startswith("tokenizer"):
            shutil.copy(path, out / path.name)
    return out


@pytest.mark.parametrize("name, family", [pytest.param("ct2-fp32", "opt", marks=needs_ct2),
                                          pytest.param("ortgenai-fp32", "llama", marks=[needs_og, pytest.mark.slow])])
def test_eos_is_ignored(request, tmp_path, name, family):
    """EOS is the argmax at every step, and still every row makes N tokens, those of Hugging Face
    ``generate`` with ``min_new_tokens=N`` (EOS suppressed)."""
    from transformers import AutoModelForCausalLM

    checkpoint = request.getfixturevalue(f"{family}_checkpoint")
    prompts = prompts_for(512)
    eos = eos_everywhere(checkpoint, tmp_path / "eos", prompts)
    model = AutoModelForCausalLM.from_pretrained(str(eos), dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                          pad_token_id=0, eos_token_id=2)
    assert free[:, P:].tolist() == [[2]] * B  # without suppression every row stops at once
    runner = peers.peer(name, eos, tmp_path / "work", threads=1, log=lambda m: None)
    run = runner.run(prompts, N)
    check_shape(run)
    assert all(2 not in row for row in run.tokens)
    assert run.tokens == reference(eos, prompts, N)[0]


# -- CTranslate2 ------------------------------------------------------------------------------------
@needs_ct2
def test_ct2_float32_matches_hf_on_opt(opt_checkpoint, tmp_path):
    runner = peers.peer("ct2-fp32", opt_checkpoint, tmp_path, threads=1, log=lambda m: None)
    prompts = prompts_for(runner.vocab_size)
    run = runner.run(prompts, N)
    check_against_hf(run, opt_checkpoint, prompts)
    assert runner.run(prompts, N).tokens == run.tokens  # greedy and deterministic
    # A second prepare reuses the conversion (the stamp matches).
    stamp = (tmp_path / "ct2-fp32" / peers.STAMP).stat().st_mtime_ns
    peers.peer("ct2-fp32", opt_checkpoint, tmp_path, threads=1, log=lambda m: None)
    assert (tmp_path / "ct2-fp32" / peers.STAMP).stat().st_mtime_ns == stamp


@needs_ct2
def test_ct2_int8_runs_on_opt(opt_checkpoint, tmp_path):
    runner = peers.peer("ct2-int8", opt_checkpoint, tmp_path, threads=1, log=lambda m: None)
    prompts = prompts_for(runner.vocab_size)
    run = runner.run(prompts, N)
    check_shape(run)
    assert agreement(run.tokens, reference(opt_checkpoint, prompts, N)[0]) >= 0.5


@needs_ct2
def test_ct2_float32_matches_hf_on_llama(llama_checkpoint, tmp_path):
    runner = peers.peer("ct2-fp32", llama_checkpoint, tmp_path, threads=1, log=lambda m: None)
    prompts = prompts_for(runner.vocab_size)
    check_against_hf(runner.run(prompts, N), llama_checkpoint, prompts)


# -- onnxruntime-genai ------------------------------------------------------------------------------
@needs_og
@pytest.mark.slow
def test_ortgenai_float32_matches_hf_on_llama(llama_checkpoint, tmp_path):
    runner = peers.peer("ortgenai-fp32", llama_checkpoint, tmp_path, threads=1, log=lambda m: None)
    prompts = prompts_for(runner.vocab_size)
    run = runner.run(prompts, N)
    check_against_hf(run, llama_checkpoint, prompts)
    single = runner.run(prompts[:1], N)  # batch 1 gives the batch's first row
    assert single.tokens[0] == run.tokens[0]


@needs_og
@pytest.mark.slow
def test_ortgenai_int4_runs_on_llama(llama_checkpoint, tmp_path):
    runner = peers.peer("ortgenai-int4", llama_checkpoint, tmp_path, threads=1, log=lambda m: None)
    check_shape(runner.run(prompts_for(runner.vocab_size), N))


# -- tools/peer_bench.py ----------------------------------------------------------------------------
@needs_ct2
@pytest.mark.slow
@pytest.mark.parametrize("isolation", [[], ["--in-process"]], ids=["worker-processes", "in-process"])
def test_peer_bench_end_to_end(opt_checkpoint, tmp_path, capsys, isolation):
    import skipdeploy

    export = skipdeploy.export(opt_checkpoint, tmp_path / "export", progress=False, log=lambda m: None).directory
    spec = importlib.util.spec_from_file_location("peer_bench", ROOT / "tools" / "peer_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    names = "skipdeploy-full,skipdeploy-2x,ct2-fp32,ortgenai-fp32,skipdeploy-int8,hf"
    assert bench.main(["--checkpoint", str(opt_checkpoint), "--export", str(export), "--batch-sizes", "1,2",
                       "--prompt-length", "6", "--max-new-tokens", "5", "--rounds", "2", "--threads", "1",
                       "--contenders", names, "--work-dir", str(tmp_path / "work"), "--json", str(out),
                       "--no-progress", *isolation]) == 0
    results = json.loads(out.read_text())
    assert results["reference"] == "skipdeploy-full"
    assert {s["contender"] for s in results["skipped"]} == {"ortgenai-fp32", "skipdeploy-int8"}
    ran = ["skipdeploy-full", "skipdeploy-2x", "ct2-fp32", "hf"]
    assert [(r["batch"], r["contender"]) for r in results["rows"]] == [(b, c) for b in (1, 2) for c in ran]
    assert set(results["prepared"]) == set(ran)
    for row in results["rows"]:
        assert len(row["runs"]) == 2 and row["tokens_per_row"] == [5]
        if row["contender"] == "skipdeploy-full":
            assert row["speed_vs_reference"] == pytest.approx(1.0)
            assert row["agreement_vs_reference"]["positions_equal"] == 1.0
        if row["contender"] in ("ct2-fp32", "hf"):  # float32 everywhere: the same greedy tokens
            assert row["agreement_vs_reference"]["positions_equal"] >= 0.9
    table = capsys.readouterr().out
    assert "| 2 | ct2-fp32 |" in table and "skipped ortgenai-fp32" in table
