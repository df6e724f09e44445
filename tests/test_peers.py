"""The benchmark's peer engines (CTranslate2, onnxruntime-genai; skipdeploy/bench/peers.py) and
``skipdeploy bench --peers`` (bench/peer_workers.py), on tiny random checkpoints, against Hugging
Face ``generate`` as an independent reference. Greedy tokens are compared up to the first step
whose reference top-2 gap is a near-tie (< 1e-3). A peer that is not installed is skipped; the
missing-library path is tested without it (a subprocess in which the import is blocked). No
timing assertions.
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

from click.testing import CliRunner  # noqa: E402

from skipdeploy.bench import peer_base, peers  # noqa: E402
from skipdeploy.cli import main  # noqa: E402
from skipdeploy.errors import BackendError, InputError  # noqa: E402
from skipdeploy.random_checkpoint import SHAPES, make_checkpoint  # noqa: E402

B, P, N = 3, 8, 12


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
def llama_work(tmp_path_factory):
    """One work directory for the Llama conversions: each is made once for the module's tests."""
    return tmp_path_factory.mktemp("llama-work")


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
    monkeypatch.setattr(peer_base, "require", lambda module, install: None)  # what prepare() calls
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
def test_ct2_float32_matches_hf_on_llama(llama_checkpoint, llama_work):
    runner = peers.peer("ct2-fp32", llama_checkpoint, llama_work, threads=1, log=lambda m: None)
    prompts = prompts_for(runner.vocab_size)
    check_against_hf(runner.run(prompts, N), llama_checkpoint, prompts)


# -- onnxruntime-genai ------------------------------------------------------------------------------
@needs_og
@pytest.mark.slow
def test_ortgenai_float32_matches_hf_on_llama(llama_checkpoint, llama_work):
    runner = peers.peer("ortgenai-fp32", llama_checkpoint, llama_work, threads=1, log=lambda m: None)
    prompts = prompts_for(runner.vocab_size)
    run = runner.run(prompts, N)
    check_against_hf(run, llama_checkpoint, prompts)
    single = runner.run(prompts[:1], N)  # batch 1 gives the batch's first row
    assert single.tokens[0] == run.tokens[0]


@needs_og
@pytest.mark.slow
def test_ortgenai_int4_runs_on_llama(llama_checkpoint, llama_work):
    runner = peers.peer("ortgenai-int4", llama_checkpoint, llama_work, threads=1, log=lambda m: None)
    check_shape(runner.run(prompts_for(runner.vocab_size), N))


# -- skipdeploy bench --peers ------------------------------------------------------------------------
BENCH_ARGS = ["--batch-sizes", "1,2", "--target-speedup", "2", "--prompt-length", "6", "--max-new-tokens", "5",
              "--repeats", "2", "--warmup", "0", "--threads", "1", "--no-memory", "--no-bandwidth"]


def test_peer_names_expand_engines_and_refuse_unknown_ones():
    assert peers.peer_names(["ct2", "ortgenai-int8", "ctranslate2"]) == ["ct2-fp32", "ct2-int8", "ortgenai-int8"]
    assert peers.peer_names(["ort-genai"]) == ["ortgenai-fp32", "ortgenai-int4"]
    assert peers.peer_names(["all"]) == ["ct2-fp32", "ct2-int8", "ortgenai-fp32", "ortgenai-int4", "llamacpp-f32",
                                         "llamacpp-file"]
    assert peers.peer_names(["llama.cpp"]) == ["llamacpp-f32", "llamacpp-file"]
    with pytest.raises(InputError, match="unknown peer 'vllm'.*ct2.*ortgenai-int4"):
        peers.peer_names(["ct2", "vllm"])


def test_bench_refuses_an_unknown_peer_before_measuring(exports, tmp_path):
    result = CliRunner().invoke(main, ["bench", str(exports["tiny"]), "--peers", "ct2,vllm",
                                       "--work-dir", str(tmp_path / "work"), *BENCH_ARGS])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        next(line for line in result.stderr.splitlines() if "unknown peer 'vllm'" in line)]
    assert result.stdout == "" and not (tmp_path / "work").exists()


def bench_rows(results: dict) -> dict:
    return {(r["batch"], r["contender"]): r for r in results["rows"]}


def check_peer_rows(results: dict, names: list[str], fp32: list[str]) -> None:
    """Rows with the fields of the others, ratios to the full schedule of the same run, and token
    agreement with it (float32 peers: the same greedy tokens but for a near-tie)."""
    rows = bench_rows(results)
    fields = set(rows[1, "full"])
    agree = {(a["contender"], a["batch"]): a for a in results["agreement"]}
    for batch in (1, 2):
        for name in names:
            row = rows[batch, name]
            assert set(row) == fields and row["kind"] == "peer" and len(row["runs"]) == 2
            assert row["export"] == ("float32" if name in fp32 else name.rsplit("-", 1)[1])
            assert row["ms_per_token"]["median"] > 0 and row["tokens_per_s"] > 0
            assert row["speedup_vs_full"] > 0 and row["vs_hf"] > 0
            assert row["cost_model_speedup"] is None and row["bytes_per_token"] is None
            a = agree[name, batch]
            assert a["reference"] == "full" and 0 <= a["positions_equal"] <= 1
            if name in fp32:
                assert a["positions_equal"] >= 0.8, (name, batch, a)
        assert rows[batch, "full"]["speedup_vs_full"] == 1.0
    assert set(names) <= set(results["config"]["peers"]) and set(results["peers"]["prepared"]) == set(names)


@needs_ct2
@pytest.mark.slow
def test_bench_with_ctranslate2_on_opt(exports, checkpoints, tmp_path):
    """CTranslate2 takes its turns next to skipdeploy and HF; onnxruntime-genai, which has no OPT,
    is one line; the conversions are made once, with a line each, and reused by the next run."""
    out = tmp_path / "bench.json"
    args = ["bench", str(exports["tiny"]), "--checkpoint", str(checkpoints["tiny"]), "--peers", "ct2,ortgenai",
            "--work-dir", str(tmp_path / "work"), "--output", str(out), *BENCH_ARGS]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert [r["contender"] for r in results["rows"] if r["batch"] == 1] == [
        "full", "skip 2x", "ct2-fp32", "ct2-int8", "hf generate"]
    check_peer_rows(results, ["ct2-fp32", "ct2-int8"], fp32=["ct2-fp32"])
    no_opt = "onnxruntime-genai's model builder has no OPT support"
    assert [line for line in result.stderr.splitlines() if "skipped" in line] == [
        f"ortgenai-fp32, ortgenai-int4 skipped: {no_opt} (Llama, Mistral, Qwen, Phi, Gemma, ... only)"]
    assert [(s["contender"], s["reason"].startswith(no_opt)) for s in results["peers"]["skipped"]] == [
        ("ortgenai-fp32", True), ("ortgenai-int4", True)]
    assert sum("converting" in line for line in result.stderr.splitlines()) == 2
    assert "ct2-int8" in result.stdout and "skipped ortgenai-int4" in result.stdout
    again = CliRunner().invoke(main, args[:5] + ["ct2-fp32"] + args[6:])
    assert again.exit_code == 0, again.output
    assert "converting" not in again.stderr and "ct2-fp32 (CTranslate2): reusing the conversion" in again.stderr


@pytest.fixture(scope="module")
def llama_export(llama_checkpoint, tmp_path_factory):
    import skipdeploy

    return skipdeploy.export(llama_checkpoint, tmp_path_factory.mktemp("peers") / "llama-sd", progress=False,
                             log=lambda m: None).directory


@needs_ct2
@needs_og
@pytest.mark.slow
def test_bench_with_ctranslate2_and_ortgenai_on_llama(llama_export, llama_checkpoint, llama_work):
    """The conversions are the ones the tests above made, if they ran (then reused, with a line)."""
    from skipdeploy.bench import run_bench

    lines: list[str] = []
    results = run_bench(llama_export, batch_sizes=[1, 2], target_speedups=[2], prompt_length=6, new_tokens=5,
                        repeats=2, warmup=0, threads=1, checkpoint=str(llama_checkpoint), memory=False,
                        bandwidth=False, progress=False, peers=["ct2-fp32", "ortgenai"], work_dir=llama_work,
                        log=lines.append)
    names = ["ct2-fp32", "ortgenai-fp32", "ortgenai-int4"]  # ct2-int8: on OPT above
    assert [r["contender"] for r in results["rows"] if r["batch"] == 2] == ["full", "skip 2x", *names, "hf generate"]
    check_peer_rows(results, names, fp32=["ct2-fp32", "ortgenai-fp32"])
    assert results["peers"]["skipped"] == [] and not any("skipped" in line for line in lines)
    assert [line.split(":")[0] for line in lines if "converting" in line or "reusing" in line] == [
        "ct2-fp32 (CTranslate2)", "ortgenai-fp32 (onnxruntime-genai)", "ortgenai-int4 (onnxruntime-genai)"]
    assert results["environment"]["ctranslate2"] and results["environment"]["onnxruntime-genai"]
    json.dumps(results)


BLOCKED = """
import sys

class Blocked:
    \"\"\"The peer's package, as if it were not installed.\"\"\"
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ctranslate2":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocked())
from skipdeploy.cli import main
main(sys.argv[1:], prog_name="skipdeploy")
"""


@pytest.mark.slow
def test_a_missing_peer_package_is_one_line_and_the_rest_runs(exports, checkpoints, tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-c", BLOCKED, "bench", str(exports["tiny"]), "--checkpoint",
                           str(checkpoints["tiny"]), "--peers", "ct2", "--work-dir", str(tmp_path / "work"),
                           "--no-hf", "--output", str(tmp_path / "bench.json"), *BENCH_ARGS],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "ctranslate2" in line]
    assert lines == ["ct2-fp32, ct2-int8 skipped: ctranslate2 is not installed; pip install ctranslate2 "
                     "(or pip install 'skipdeploy[bench]')"]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["contender"] for r in results["rows"]] == ["full", "skip 2x"] * 2
    assert [s["contender"] for s in results["peers"]["skipped"]] == ["ct2-fp32", "ct2-int8"]
    assert not (tmp_path / "work").exists()
