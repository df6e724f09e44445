"""The Llama family (Llama 2/3.x, Mistral, Qwen2) through export, both decoding paths, training,
verify and the CLI, against transformers itself and against a reference written here on the
Hugging Face modules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import comparable_prefix, hf_generate, run_cli

torch = pytest.importorskip("torch", reason="these check against transformers (pip install 'skipdeploy[export]')")

import skipdeploy  # noqa: E402
from skipdeploy import Schedule  # noqa: E402
from skipdeploy.errors import ExportError  # noqa: E402
from skipdeploy.random_checkpoint import make_checkpoint  # noqa: E402

# tiny-llama: GQA, tied; tiny-llama3: llama3 RoPE scaling with original_max_position_embeddings 16 (the
# prompts below plus 24 tokens pass it), untied; tiny-llama-head-dim: head_dim 24 != 64 / 4;
# tiny-qwen2: q/k/v biases (non-zero), RMSNorm eps 1e-6; tiny-mistral.
FAMILIES = ["tiny-llama", "tiny-llama3", "tiny-llama-head-dim", "tiny-qwen2", "tiny-mistral"]
PROMPTS = [[1, 45, 67, 89, 101, 7], [1, 300], [1, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
NEW = 24


@pytest.fixture(scope="module")
def llama_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-checkpoints")
    return {f: make_checkpoint(root / f, f, seed=3, weight_scale=3.0) for f in FAMILIES}


@pytest.fixture(scope="module")
def llama_exports(llama_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-exports")
    return {f: skipdeploy.export(llama_checkpoints[f], root / f, progress=False, log=lambda m: None).directory
            for f in FAMILIES}


@pytest.fixture(scope="module")
def llama_models(llama_checkpoints):
    from transformers import AutoModelForCausalLM

    return {f: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
            for f, p in llama_checkpoints.items()}


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_schedule_reproduces_transformers_generate(llama_exports, llama_models, family, backend):
    with torch.no_grad():  # padding with EOS (Llama has no pad token); EOS never stops a row here
        want_tokens, want_logits = hf_generate(llama_models[family], PROMPTS, NEW, pad_token_id=2, eos_token_id=None)
    got = skipdeploy.load(llama_exports[family], backend=backend).generate(PROMPTS, NEW, output_logits=True,
                                                                          eos_token_id=None)
    for step, (g, w) in enumerate(zip(got.logits, want_logits)):
        assert np.abs(g - w).max() < 1e-3 * max(1.0, np.abs(w).max()), f"step {step}"
    for row in range(len(PROMPTS)):
        n = comparable_prefix(want_logits, row)
        assert n >= 8, "the reference is near-tied too early for a meaningful comparison"
        assert got.tokens[row][:n] == want_tokens[row][:n]


def _hf_skip_reference(model, prompt: list[int], new: int, schedule) -> list[int]:
    """Greedy SkipDecode on the transformers modules themselves, recomputing the whole sequence
    at every step: the prompt positions run the prompt layers, the position holding generated
    token j runs ``schedule.layers(j)``; each layer attends over the earlier positions that ran it."""
    inner = model.model
    tokens = list(prompt)
    c = len(prompt)
    with torch.no_grad():
        for _ in range(new):
            S = len(tokens)
            ids = torch.tensor([tokens])
            positions = torch.arange(S)[None]
            hidden = inner.embed_tokens(ids)
            runs = [set(schedule.prompt_layers())] * c + [set(schedule.layers(j)) for j in range(S - c)]
            for index, layer in enumerate(inner.layers):
                n = 0
                while n < S and index in runs[n]:
                    n += 1
                if n == 0:
                    continue
                mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
                emb = inner.rotary_emb(hidden[:, :n], positions[:, :n])
                out = layer(hidden[:, :n], attention_mask=mask, position_ids=positions[:, :n], position_embeddings=emb)
                hidden = torch.cat([out[0] if isinstance(out, tuple) else out, hidden[:, n:]], dim=1)
            logits = model.lm_head(inner.norm(hidden[:, -1]))
            tokens.append(int(logits.argmax()))
    return tokens[c:]


SKIPS = [Schedule(4, max_layers=3, min_layers=1, decay_tokens=8, warmup_layers=1),
         Schedule(4, max_layers=2, min_layers=1, decay_tokens=4, warmup_layers=1, prompt="schedule")]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SKIPS, ids=["prompt-full", "prompt-schedule"])
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
def test_skip_schedules_equal_a_reference_on_the_hf_modules(llama_exports, llama_models, family, schedule):
    for backend in ("onnxruntime", "torch"):
        rt = skipdeploy.load(llama_exports[family], backend=backend)
        batch = rt.generate(PROMPTS, 12, schedule, eos_token_id=None)
        for row, prompt in enumerate(PROMPTS):
            assert batch.tokens[row] == _hf_skip_reference(llama_models[family], prompt, 12, schedule), backend
    full = skipdeploy.load(llama_exports[family]).generate(PROMPTS, 12, eos_token_id=None)
    assert full.tokens != batch.tokens  # the schedule really skipped layers


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_inflight_requests_equal_generate_alone(llama_exports, backend):
    export = llama_exports["tiny-llama3"]
    rt = skipdeploy.load(export)
    schedules = [Schedule.full(4), *SKIPS]
    rng = np.random.default_rng(5)
    engine = skipdeploy.ServingEngine(export, max_batch=4, backend=backend, prefill_chunk=5)
    try:
        waves = []
        for wave in range(3):  # later waves arrive while earlier requests decode
            for i in range(4):
                prompt = [1, *rng.integers(3, 500, int(rng.integers(1, 14))).tolist()]
                knobs = {"temperature": 0.8, "top_p": 0.9, "seed": i} if i % 2 else {}
                sched = schedules[(wave + i) % 3]
                waves.append((prompt, sched, knobs, engine.submit(prompt, int(rng.integers(2, 16)), sched,
                                                                   eos_token_id=None, **knobs)))
            next(waves[-1][3].stream())
        for prompt, sched, knobs, request in waves:
            alone = rt.generate([prompt], request.config.max_new_tokens, sched, eos_token_id=None, **knobs)
            assert request.result().tokens[0] == alone.tokens[0]
    finally:
        engine.shutdown()


def test_training_forward_equals_runtime_logits(llama_checkpoints, llama_exports):
    from transformers import AutoModelForCausalLM

    from skipdeploy.training.forward import schedule_forward

    model = AutoModelForCausalLM.from_pretrained(llama_checkpoints["tiny-qwen2"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    rt = skipdeploy.load(llama_exports["tiny-qwen2"])
    ids = [1, *range(40, 60)]
    for schedule in SKIPS:
        c = 6
        with torch.no_grad():
            logits = torch.log_softmax(schedule_forward(model, torch.tensor([ids]), c, schedule), -1)[0]
        want = logits[torch.arange(c - 1, len(ids) - 1), torch.tensor(ids[c:])].numpy()
        got = rt.score([ids], c, schedule)[0]
        assert np.abs(got - want).max() < 1e-4


def test_gqa_cache_holds_the_key_value_heads_only(llama_exports):
    rt = skipdeploy.load(llama_exports["tiny-llama"])
    with rt.generator([[1, 5, 6]], 4) as gen:
        assert gen.cache.keys[0].shape[2:] == (2, 16)  # 2 key/value heads of 16, not 4 query heads
    out = run_cli("inspect", str(llama_exports["tiny-llama"]))
    assert "(2 key/value heads)" in out.output and "KV cache   1.0 KB per token" in out.output


def test_mistral_sliding_window_shorter_than_the_length_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "mistral", "tiny-mistral", sliding_window=32)
    with pytest.raises(ExportError, match="sliding window of 32 positions.*--max-length 32 or less"):
        skipdeploy.export(ckpt, tmp_path / "out", max_length=64, progress=False, log=lambda m: None)
    manifest = skipdeploy.export(ckpt, tmp_path / "ok", progress=False, log=lambda m: None)
    assert manifest.limits["max_length"] == 32
    assert not (tmp_path / "out").exists()


def test_int8_quantized_llama_export_decodes_close_to_float(llama_exports, tmp_path):
    skipdeploy.quantize(llama_exports["tiny-llama"], tmp_path / "int8")
    fp32 = skipdeploy.load(llama_exports["tiny-llama"]).generate(PROMPTS, 6, output_logits=True, eos_token_id=None)
    int8 = skipdeploy.load(tmp_path / "int8").generate(PROMPTS, 6, output_logits=True, eos_token_id=None)
    assert np.abs(int8.logits[0] - fp32.logits[0]).max() < 0.1 * np.abs(fp32.logits[0]).max()


@pytest.mark.slow
def test_verify_cli_against_transformers(llama_exports, llama_checkpoints):
    out = run_cli("verify", str(llama_exports["tiny-qwen2"]), "--model", str(llama_checkpoints["tiny-qwen2"]),
                  "--max-new-tokens", "6", "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["ok"] and any(c["reference"] == "transformers" for c in report["graphs"])


def test_verify_refuses_a_checkpoint_of_another_shape(llama_exports, llama_checkpoints):
    out = run_cli("verify", str(llama_exports["tiny-llama"]), "--model", str(llama_checkpoints["tiny-llama-head-dim"]))
    assert out.exit_code == 1 and "is not the checkpoint" in out.output and "head_dim 24 vs 16" in out.output


def _schedule_loss(checkpoint, ids: list[int]) -> float:
    """Next-token cross-entropy of ``ids`` with the checkpoint's 2x schedule after 8 context tokens."""
    from transformers import AutoModelForCausalLM

    from skipdeploy.training.forward import schedule_forward

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    schedule = Schedule.target_speedup(4, 2, decay_tokens=len(ids) - 9)
    with torch.no_grad():
        logits = schedule_forward(model, torch.tensor([ids]), 8, schedule)[0, 7:-1]
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[8:])))


@pytest.mark.slow
def test_finetune_loss_falls_and_eval_reports(tmp_path, llama_checkpoints):
    from skipdeploy.training.data import load_tokenizer

    data = tmp_path / "data"
    data.mkdir()
    text = "def add(a, b):\n    return a + b\n" * 60
    (data / "a.py").write_text(text)
    ids = [1, *load_tokenizer(llama_checkpoints["tiny-llama"]).encode(text).ids[:31]]
    out = run_cli("finetune", str(llama_checkpoints["tiny-llama"]), "--data", str(data), "--out",
                  str(tmp_path / "tuned"), "--target-speedup", "2", "--steps", "12", "--lr", "3e-3",
                  "--batch-size", "2", "--seq-len", "32")
    assert out.exit_code == 0, out.output
    assert _schedule_loss(tmp_path / "tuned", ids) < _schedule_loss(llama_checkpoints["tiny-llama"], ids)
    exported = run_cli("export", str(tmp_path / "tuned"), "--out", str(tmp_path / "tuned-sd"))
    assert exported.exit_code == 0, exported.output
    ev = run_cli("eval", str(tmp_path / "tuned-sd"), "--data", str(data), "--target-speedup", "1,2", "--json",
                 "--seq-len", "32", "--chunks", "2", "--prompts", "2", "--max-new-tokens", "4")
    assert ev.exit_code == 0, ev.output
    results = json.loads(ev.output)["results"]
    assert [r["target_speedup"] for r in results] == [1, 2] and all(r["perplexity"] > 1 for r in results)


@pytest.mark.slow
def test_bench_runs_a_llama_export_with_its_cost_model_and_hf(llama_exports):
    out = run_cli("bench", str(llama_exports["tiny-llama"]), "--batch-sizes", "1", "--prompt-length", "3",
                  "--max-new-tokens", "4", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-bandwidth",
                  "--no-memory", "--target-speedup", "2", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [r["contender"] for r in data["rows"]] == ["full", "skip 2x", "hf generate"]  # HF loads the Llama
    E, A, K, F, V = 64, 4 * 16, 2 * 16, 128, 512  # q/out over 4 heads, k/v over 2; gate, up and down
    assert data["cost_model"]["layer"] == 2 * E * A + 2 * E * K + 3 * E * F and data["cost_model"]["head"] == E * V
    assert data["rows"][2]["ms_per_token"]["median"] > 0 and data["errors"] == []
