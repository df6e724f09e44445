"""Sampling, stop conditions and streaming, against Hugging Face's logits processors where they exist."""

from __future__ import annotations

import numpy as np
import pytest

from skipdeploy import GenerationConfig, Schedule
from skipdeploy.errors import InputError
from skipdeploy.runtime.sampling import TokenPicker

from .conftest import PROMPTS, torch


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (5, 1.0), (7, 0.5), (0, 0.3), (50, 0.95)])
def test_candidate_set_matches_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(top_k)
    logits = rng.normal(size=(4, 200)).astype(np.float32) * 3
    picker = TokenPicker(GenerationConfig(temperature=0.7, top_k=top_k, top_p=top_p), [[1]] * 4)
    scores = TemperatureLogitsWarper(0.7)(None, torch.from_numpy(logits))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    want_probs = torch.softmax(scores, dim=-1).numpy()
    for row in range(4):
        ids, probs = picker.distribution(logits[row])
        assert set(ids.tolist()) == set(np.nonzero(want_probs[row] > 0)[0].tolist())
        assert np.allclose(probs, want_probs[row][ids], atol=1e-6)


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = np.random.default_rng(0).normal(size=(2, 50)).astype(np.float32)
    prompts = [[3, 4, 5], [10, 3]]
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[3, 4, 5], [10, 3, 3]]), torch.from_numpy(logits.copy()))
    picker = TokenPicker(GenerationConfig(repetition_penalty=1.7), prompts)
    assert np.allclose(picker.penalize(logits), want.numpy())
    assert picker.pick(logits).tolist() == want.argmax(-1).tolist()


def test_sampling_is_reproducible_across_runs_and_backends(runtimes):
    kwargs = dict(temperature=0.9, top_p=0.95, seed=1234, eos_token_id=None)
    sched = Schedule(4, 3, 1, decay_tokens=5)
    a = runtimes["tiny", "onnxruntime"].generate(PROMPTS, 12, sched, **kwargs)
    b = runtimes["tiny", "onnxruntime"].generate(PROMPTS, 12, sched, **kwargs)
    c = runtimes["tiny", "torch"].generate(PROMPTS, 12, sched, **kwargs)
    greedy = runtimes["tiny", "onnxruntime"].generate(PROMPTS, 12, sched, eos_token_id=None)
    other_seed = runtimes["tiny", "onnxruntime"].generate(PROMPTS, 12, sched, **{**kwargs, "seed": 99})
    assert a.tokens == b.tokens == c.tokens
    assert a.tokens != greedy.tokens and a.tokens != other_seed.tokens


def test_top_k_one_is_greedy(runtimes):
    rt = runtimes["tiny", "onnxruntime"]
    assert rt.generate(PROMPTS, 8, temperature=1.5, top_k=1, seed=0).tokens == rt.generate(PROMPTS, 8).tokens


def test_stop_token_ids_and_stop_strings(runtimes):
    rt = runtimes["tiny", "onnxruntime"]
    free = rt.generate(PROMPTS, 10, eos_token_id=None)
    stop = free.tokens[0][3]
    out = rt.generate(PROMPTS, 10, eos_token_id=None, stop_token_ids=[stop])
    assert out.tokens[0] == free.tokens[0][:free.tokens[0].index(stop) + 1] and out.finish_reasons[0] == "stop"

    text = rt.generate_text(["def greet(name):"], 10, eos_token_id=None)
    generated = text.text[0]
    needle = generated[len(generated) // 2:][:2] or generated[:1]
    if not needle.strip():
        pytest.skip("the random model produced only whitespace")
    stopped = rt.generate_text(["def greet(name):"], 10, eos_token_id=None, stop_strings=[needle])
    assert needle not in stopped.text[0] and stopped.finish_reasons == ["stop"]  # the text ends before it
    assert needle in rt.tokenizer.decode(stopped.tokens[0])
    assert len(stopped.tokens[0]) < len(text.tokens[0])
    assert needle not in rt.tokenizer.decode(stopped.tokens[0][:-1])  # stopped at the first occurrence


def test_stream_yields_each_step_and_returns_the_result(runtimes):
    rt = runtimes["tiny", "onnxruntime"]
    steps = rt.stream(PROMPTS, 6, eos_token_id=None)
    seen = []
    while True:
        try:
            seen.append(next(steps))
        except StopIteration as done:
            result = done.value
            break
    assert [s.token_index for s in seen] == list(range(6))
    assert [s.index for s in seen] == list(range(6))  # the older name, an alias
    assert [s.layers for s in seen[1:]] == result.layers_per_step  # token i > 0 from decode step i - 1
    for row in range(len(PROMPTS)):
        assert [s.tokens[row] for s in seen] == result.tokens[row]


# The wording of each refusal belongs to the request schema; these check that it is refused, naming the field.
@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature must be"),
    (dict(top_p=0), "top_p must be"),
    (dict(top_k=-2), "top_k must be an integer"),
    (dict(repetition_penalty=0), "repetition_penalty must be"),
    (dict(stop_token_ids=[10**6]), "stop token id 1000000 is outside"),
    (dict(stop_strings=[""]), "stop.strings must"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer"),
    (dict(seed=2**64, temperature=1.0), "seed must be"),
    (dict(top_p="high", temperature=1.0), "top_p must be"),
    (dict(temperatur=1.0), "unknown generation argument"),
])
def test_bad_knobs(runtimes, kwargs, match):
    with pytest.raises(InputError, match=match):
        runtimes["tiny", "onnxruntime"].generate(PROMPTS, **kwargs)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "torch-static"])
def test_two_batches_interleaved_on_one_runtime_get_their_solo_tokens(runtimes, exports, backend):
    """Caches belong to generators, not engines: two batches (same batch size, different prompts and
    schedules) stepped alternately from one thread, and a stream left open while another runs to
    the end, each get exactly the tokens and logits they get alone."""
    from skipdeploy.manifest import read_manifest
    from skipdeploy.runtime import Runtime

    if backend == "torch-static":
        from skipdeploy.engines.torch_engine import TorchEngine

        manifest = read_manifest(exports["tiny"])
        rt = Runtime(manifest, TorchEngine(manifest, static_cache=True))
    else:
        rt = runtimes["tiny", backend]
    jobs = [(PROMPTS, Schedule(4, 3, 1, decay_tokens=5)), ([[2, 50, 51], [2, 9], [2, 77, 78, 79]], Schedule.full(4))]
    knobs = dict(output_logits=True, eos_token_id=None)
    alone = [rt.generate(p, 8, s, **knobs) for p, s in jobs]
    gens = [rt.generator(p, 8, s, **knobs) for p, s in jobs]
    while not all(g.is_done() for g in gens):
        for g in gens:
            if not g.is_done():
                g.generate_next_token()
    for gen, want in zip(gens, alone):
        got = gen.result()
        gen.close()
        assert got.tokens == want.tokens and got.layers_per_step == want.layers_per_step
        assert all(np.array_equal(a, b) for a, b in zip(got.logits, want.logits))
    first = rt.stream(jobs[0][0], 8, jobs[0][1], **knobs)
    next(first)
    assert rt.generate(jobs[1][0], 8, jobs[1][1], **knobs).tokens == alone[1].tokens
    steps = list(first)
    assert [s.tokens for s in steps] == [[row[i] for row in alone[0].tokens] for i in range(1, 8)]
