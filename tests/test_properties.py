"""Property tests: the onnxruntime runtime against the torch backend for random small models,
batches, prompt lengths and schedules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch", reason="these compare with the torch backend (pip install 'skipdeploy[export]')")

import skipdeploy  # noqa: E402
from skipdeploy import Schedule  # noqa: E402
from skipdeploy.random_checkpoint import make_checkpoint  # noqa: E402


@st.composite
def cases(draw):
    layers = draw(st.integers(1, 4))
    heads = draw(st.sampled_from([1, 2, 4]))
    hidden = heads * draw(st.sampled_from([4, 8]))
    post_ln = draw(st.booleans())
    model = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                 ffn_dim=draw(st.sampled_from([8, 32])), vocab_size=draw(st.integers(8, 64)),
                 max_position_embeddings=32, do_layer_norm_before=not post_ln,
                 word_embed_proj_dim=draw(st.sampled_from([hidden, hidden // 2 if hidden > 4 else hidden])))
    max_l = draw(st.integers(1, layers))
    schedule = Schedule(layers, max_l, draw(st.integers(1, max_l)), draw(st.integers(1, 6)),
                        draw(st.integers(0, layers)), draw(st.sampled_from(["full", "schedule"])))
    vocab = model["vocab_size"]
    prompts = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=6), min_size=1, max_size=3))
    return model, schedule, prompts, draw(st.integers(1, 6)), draw(st.integers(0, 10**6))


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases())
def test_runtime_matches_torch_backend(tmp_path_factory, case):
    model, schedule, prompts, new_tokens, seed = case
    root = tmp_path_factory.mktemp("prop")
    ckpt = make_checkpoint(root / "ckpt", "tiny", seed=seed, weight_scale=3.0, tokenizer=False, **model)
    export = skipdeploy.export(ckpt, root / "export", progress=False, log=lambda m: None).directory
    got = skipdeploy.load(export).generate(prompts, new_tokens, schedule, output_logits=True, eos_token_id=None)
    want = skipdeploy.load(export, backend="torch").generate(prompts, new_tokens, schedule, output_logits=True,
                                                              eos_token_id=None)
    assert got.layers_per_step == want.layers_per_step == [schedule.count(s) for s in range(new_tokens - 1)]
    for row in range(len(prompts)):
        for step, (a, b) in enumerate(zip(got.tokens[row], want.tokens[row])):
            assert np.abs(got.logits[step][row] - want.logits[step][row]).max() < 1e-4
            if a != b:  # allowed only on a near-tie of the reference
                top2 = np.sort(want.logits[step][row])[-2:]
                assert top2[1] - top2[0] < 1e-4
                break
