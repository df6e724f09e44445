"""Schedule-aware training (issue 6): the training forward equals the runtime, fine-tune, eval, data split."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="fine-tuning needs torch (pip install 'skipdeploy[export]')")
from click.testing import CliRunner

import skipdeploy
from skipdeploy.cli import main
from skipdeploy.errors import ScheduleError, SkipDeployError
from skipdeploy.random_checkpoint import make_checkpoint
from skipdeploy.schedule import Schedule, TableSchedule
from skipdeploy.training import data as data_mod
from skipdeploy.training.finetune import FinetuneConfig, finetune, stored_schedules
from skipdeploy.training.forward import layer_extents, schedule_forward

SCHEDULES = [
    Schedule.full(4),
    Schedule(4, 3, 1, decay_tokens=5, warmup_layers=1),
    Schedule(4, 3, 1, decay_tokens=4, warmup_layers=0),
    Schedule(4, 2, 1, decay_tokens=3, warmup_layers=1, prompt="schedule"),
    TableSchedule(4, [4, 3, 3, 2, 1], warmup_layers=0, prompt="schedule"),
]


@pytest.fixture(scope="module")
def sdpa_models(checkpoints):
    from transformers import OPTForCausalLM

    return {v: OPTForCausalLM.from_pretrained(p, dtype=torch.float32, attn_implementation=attn).eval()
            for v, p in checkpoints.items() for attn in ("sdpa",)} | {
        ("tiny", "eager"): OPTForCausalLM.from_pretrained(checkpoints["tiny"], dtype=torch.float32,
                                                          attn_implementation="eager").eval()}


@pytest.mark.parametrize("variant", ["tiny", "tiny-post-ln", ("tiny", "eager")], ids=str)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: repr(s.to_dict()))
def test_training_forward_equals_runtime_logits(variant, schedule, sdpa_models, runtimes):
    """Logits at positions c-1 .. c+N-2 of the training forward are the runtime's step logits."""
    model = sdpa_models[variant]
    runtime = runtimes[(variant if isinstance(variant, str) else variant[0], "onnxruntime")]
    prompts = [[2, 45, 67, 89, 101, 7], [2, 300, 5, 6, 77, 8]]  # one context length for the batch
    c, N = len(prompts[0]), 10
    result = runtime.generate(prompts, N, schedule, output_logits=True, eos_token_id=None)
    ids = torch.tensor([p + t for p, t in zip(prompts, result.tokens)])
    with torch.no_grad():
        logits = schedule_forward(model, ids, c, schedule).numpy()
    ours = logits[:, c - 1:c + N - 1]
    theirs = np.stack(result.logits, axis=1)
    assert np.abs(ours - theirs).max() < 1e-4
    # Runtime.score teacher-forces the same tokens: its log-probs are the generate logits'.
    scored = runtime.score([p + t for p, t in zip(prompts, result.tokens)], c, schedule)
    lsm = torch.log_softmax(torch.from_numpy(theirs).double(), -1).numpy()
    expected = np.take_along_axis(lsm, np.array(result.tokens)[:, :, None], -1)[..., 0]
    assert np.abs(scored - expected).max() < 1e-4


def test_layer_extents_are_prefixes():
    s = Schedule(4, 3, 1, decay_tokens=4, warmup_layers=1)
    # steps 0..5 run tops 3,3,2,2,1,1 -> layer 1 runs 2 steps, layer 2 runs 4, layers 0 and 3 all 6
    assert layer_extents(s, 4, 10) == [10, 6, 8, 10]
    assert layer_extents(Schedule(4, 2, 2, 4, 0, prompt="schedule"), 3, 8) == [0, 0, 8, 8]

    class Growing(TableSchedule):
        def top(self, step):
            return 1 if step == 0 else 3

    with pytest.raises(ScheduleError, match="not a prefix"):
        layer_extents(Growing(4, [1], warmup_layers=0, prompt="schedule"), 2, 6)


def test_stdlib_split_is_stable_and_disjoint():
    train, held = data_mod.stdlib_files("train"), data_mod.stdlib_files("heldout")
    assert train and held and not set(train) & set(held)
    root = data_mod.stdlib_root()
    assert not {data_mod.module_of(p, root) for p in train} & {data_mod.module_of(p, root) for p in held}
    assert all("site-packages" not in p.parts for p in train + held)
    # The split is a pure function of the module name.
    assert [data_mod.is_heldout(m) for m in ("email", "json", "os", "asyncio")] == [True, False, False, False]
    assert data_mod.stdlib_files("heldout") == held


CODE = '''def add(a, b):
    """Return the sum."""
    return a + b


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5


for i in range(10):
    print(i * i, add(i, 1))
'''


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for i in range(4):
        (root / f"mod{i}.py").write_text(CODE.replace("add", f"add{i}") * 3)
    (root / "notes.txt").write_text("SkipDecode runs fewer layers for later tokens.\n" * 20)
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def test_finetune_stores_schedule_resumes_and_export_uses_it(tmp_path, text_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=3)
    assert len(data_mod.resolve([str(text_dir)])) == 5
    # Uninterrupted, through the CLI.
    args = ["finetune", str(ckpt), "--data", str(text_dir), "--out", str(tmp_path / "a"), "--target-speedup", "2,1",
            "--steps", "4", "--seq-len", "32", "--batch-size", "2", "--save-every", "10", "--decay-tokens", "8"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    # Interrupted after 2 steps, then resumed by the same call.
    scheds = [Schedule.target_speedup(4, 2, decay_tokens=8), Schedule.full(4)]
    cfg = FinetuneConfig(model=str(ckpt), data=[str(text_dir)], out=str(tmp_path / "b"),
                         schedules=[s.to_dict() for s in scheds], steps=4, batch_size=2, seq_len=32, save_every=10)
    finetune(cfg, until=2, progress=False, log=lambda m: None)
    assert torch.load(tmp_path / "b" / "trainer_state.pt", weights_only=False)["step"] == 2
    logs = []
    finetune(cfg, progress=False, log=logs.append)
    assert any("resuming from step 2" in m for m in logs)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not np.allclose(a["model.decoder.layers.0.fc1.weight"], _weights(ckpt)["model.decoder.layers.0.fc1.weight"])
    # The schedules are stored; the first is the export default.
    from transformers import AutoConfig

    assert stored_schedules(AutoConfig.from_pretrained(tmp_path / "b")) == scheds
    manifest = skipdeploy.export(tmp_path / "b", tmp_path / "export", progress=False, log=lambda m: None)
    assert manifest.schedule == scheds[0]
    # A finished fine-tune is not redone; other settings are refused.
    finetune(cfg, progress=False, log=logs.append)
    assert "already fine-tuned" in logs[-1]
    bad = CliRunner().invoke(main, args[:-2] + ["--decay-tokens", "9"])
    assert bad.exit_code == 1 and "other settings" in bad.output


@pytest.mark.parametrize("args, words", [
    (["--save-every", "0"], "--save-every"), (["--save-every", "-1"], "--save-every"),
    (["--warmup-steps", "-5"], "--warmup-steps"), (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"), (["--lr", "0"], "--lr"),
])
def test_finetune_refuses_bad_values_up_front(tmp_path, text_dir, args, words):
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=3)
    out = CliRunner().invoke(main, ["finetune", str(ckpt), "--data", str(text_dir), "--out", str(tmp_path / "ft"),
                                    "--steps", "2", "--seq-len", "32", "--batch-size", "2", *args])
    assert out.exit_code in (1, 2) and words in out.output and "Traceback" not in out.output, out.output
    assert not (tmp_path / "ft").exists()  # nothing half-written


@pytest.mark.parametrize("field, value, words", [
    ("save_every", 0, "save_every must be an integer >= 1"), ("warmup_steps", -5, "warmup_steps must be"),
    ("lr", float("nan"), "lr must be a finite number > 0"), ("steps", 0, "steps must be an integer >= 1"),
])
def test_finetune_api_refuses_bad_config_before_writing(tmp_path, field, value, words):
    cfg = FinetuneConfig(model="/nonexistent", data=["x"], out=str(tmp_path / "ft"),
                         schedules=[Schedule.full(4).to_dict()], **{field: value})
    with pytest.raises(SkipDeployError, match=words):
        finetune(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "ft").exists()


def test_a_failed_first_run_leaves_no_out_directory(tmp_path, text_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=3)
    cfg = FinetuneConfig(model=str(ckpt), data=[str(text_dir)], out=str(tmp_path / "ft"), lr=1e30,
                         schedules=[Schedule.full(4).to_dict()], steps=3, batch_size=2, seq_len=32, save_every=10)
    with pytest.raises(SkipDeployError, match="the loss became"):
        finetune(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "ft").exists()


def _with_vocab_and_merges_only(ckpt):
    """The tokenizer files of the original OPT checkpoints: vocab.json + merges.txt, no tokenizer.json."""
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(ckpt / "tokenizer.json")).model.save(str(ckpt))
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_prefix_space": False}))
    return ckpt


def test_finetune_and_export_convert_a_vocab_and_merges_tokenizer(tmp_path, text_dir):
    ckpt = _with_vocab_and_merges_only(make_checkpoint(tmp_path / "ckpt", "tiny", seed=4, tokenizer=True))
    reference = data_mod.load_tokenizer(make_checkpoint(tmp_path / "same", "tiny", seed=4, tokenizer=True))
    out = CliRunner().invoke(main, ["finetune", str(ckpt), "--data", str(text_dir), "--out", str(tmp_path / "ft"),
                                    "--steps", "1", "--seq-len", "32", "--batch-size", "2"])
    assert out.exit_code == 0, out.output
    converted = data_mod.load_tokenizer(tmp_path / "ft")  # written by finetune for the export to find
    text = CODE[:200]
    assert converted.encode(text, add_special_tokens=False).ids == reference.encode(text, add_special_tokens=False).ids
    for source in (ckpt, tmp_path / "ft"):
        manifest = skipdeploy.export(source, tmp_path / f"export-{source.name}", progress=False, log=lambda m: None)
        assert manifest.tokenizer_path is not None
        result = skipdeploy.load(manifest.directory).generate_text(["def add("], 3)
        assert isinstance(result.text[0], str) and 1 <= len(result.tokens[0]) <= 3
    bare = make_checkpoint(tmp_path / "bare", "tiny", seed=4, tokenizer=False)
    refused = CliRunner().invoke(main, ["finetune", str(bare), "--data", str(text_dir), "--out", str(tmp_path / "x"),
                                        "--steps", "1", "--seq-len", "32"])
    assert refused.exit_code == 1 and "has no tokenizer" in refused.output


def test_eval_json(exports, text_dir):
    args = ["eval", str(exports["tiny"]), "--data", str(text_dir), "--target-speedup", "1,2", "--seq-len", "32",
            "--chunks", "3", "--prompts", "2", "--new-tokens", "6", "--decay-tokens", "8", "--json"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    results = report["results"]
    assert [r["target_speedup"] for r in results] == [1.0, 2.0]
    for r in results:
        assert {"target_speedup", "layer_speedup", "perplexity", "agreement"} <= set(r)
        assert np.isfinite(r["perplexity"]) and r["perplexity"] > 1 and 0 <= r["agreement"] <= 1
    assert results[0]["agreement"] == 1.0 and results[0]["layer_speedup"] == 1.0
    assert abs(results[1]["layer_speedup"] - 2) < 0.1
    assert report["tokens_scored"] == 3 * 16
    bad = CliRunner().invoke(main, args[:4] + ["--seq-len", "32", "--target-speedup", "9"])
    assert bad.exit_code == 1 and "out of reach" in bad.output


def test_demo_with_bundled_model(tmp_path):
    from skipdeploy.bundled import bundled_model

    if bundled_model() is None:
        pytest.skip("the bundled model (skipdeploy/assets/stdlib-opt) is absent; tools/train_stdlib_opt.py makes it")
    size = sum(f.stat().st_size for f in bundled_model().iterdir())
    assert size <= 20e6
    out = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path), "--max-new-tokens", "16"])
    assert out.exit_code == 0, out.output
    assert "class Stack:" in out.output and "measured decode speedup" in out.output
    assert "layers per token" in out.output
    # The label's 3x is what the tokens generated reach (the decay spans them, not the trained 128).
    import re

    label = re.search(r"--- skipdecode ([\d.]+)x: .*\(layer speedup ([\d.]+)x\)", out.output)
    assert label and abs(float(label.group(2)) - float(label.group(1))) <= 0.05 * float(label.group(1)), out.output
    manifest = skipdeploy.load(tmp_path / "export").manifest
    assert not manifest.schedule.is_full()  # the fine-tuned schedule became the export's default


# Issue 19: full-share batches, self-distillation, loss positions, eval --reference.

def _tuned_config(ckpt, text_dir, out, **kw):
    scheds = [Schedule.target_speedup(4, 2, decay_tokens=8), Schedule(4, 2, 1, decay_tokens=8, warmup_layers=0)]
    base = dict(model=str(ckpt), data=[str(text_dir)], out=str(out), schedules=[s.to_dict() for s in scheds],
                steps=4, batch_size=2, seq_len=32, save_every=10, full_share=0.5, distill=0.5,
                loss_positions="generated")
    return FinetuneConfig(**{**base, **kw})


def test_full_share_draws_are_seeded_and_leave_old_runs_alone():
    from skipdeploy.training.finetune import draw

    scheds = [Schedule.target_speedup(4, 2, decay_tokens=8)]
    plain = FinetuneConfig(model="m", data=[], out="o", schedules=[], batch_size=3, seed=5)
    mixed = FinetuneConfig(model="m", data=[], out="o", schedules=[], batch_size=3, seed=5, full_share=0.25)
    fulls = 0
    for step in range(400):
        rows, c, s = draw(plain, step, 100, 4, 16, scheds)
        rng = np.random.default_rng([5, step])  # the draws of runs made before --full-share existed
        assert rows.tolist() == rng.integers(0, 100, 3).tolist() and c == int(rng.integers(4, 17)) and s == scheds[0]
        rows2, c2, s2 = draw(mixed, step, 100, 4, 16, scheds)
        assert rows2.tolist() == rows.tolist() and c2 == c and draw(mixed, step, 100, 4, 16, scheds)[2] == s2
        fulls += s2.is_full()
    assert 70 <= fulls <= 130  # 100 expected; the draw is seeded, so this never flakes


def test_distill_and_full_share_training_lowers_the_loss_with_a_frozen_teacher(tmp_path, text_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from skipdeploy.training import finetune as finetune_mod
    from skipdeploy.training.finetune import schedule_loss

    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny-llama", seed=3)
    teachers = []

    def spy(family, source, dtype):
        teacher = load_teacher(family, source, dtype)
        teachers.append((source, teacher, {k: v.clone() for k, v in teacher.state_dict().items()}))
        return teacher

    load_teacher = finetune_mod.load_teacher
    monkeypatch.setattr(finetune_mod, "load_teacher", spy)
    cfg = _tuned_config(ckpt, text_dir, tmp_path / "ft", steps=8, lr=3e-3)
    finetune(cfg, progress=False, log=lambda m: None)
    (source, teacher, before), = teachers
    assert source == str(ckpt) and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # frozen through 8 steps

    original = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "ft", dtype=torch.float32).eval()
    chunks = data_mod.load_chunks([str(text_dir)], data_mod.load_tokenizer(ckpt), 32, 1)
    ids, sched = torch.from_numpy(chunks[:4]), Schedule.target_speedup(4, 2, decay_tokens=8)
    with torch.no_grad():
        start, start_ce = schedule_loss(original, ids, 12, sched, loss_positions="generated", teacher=original,
                                        distill=0.5)
        end, end_ce = schedule_loss(tuned, ids, 12, sched, loss_positions="generated", teacher=original,
                                    distill=0.5)
        same, same_ce = schedule_loss(original, ids, 12, Schedule.full(4), loss_positions="generated",
                                      teacher=original, distill=0.5)
    assert abs(same - 0.5 * same_ce) < 1e-5  # the teacher's own schedule: KL = 0
    assert end < 0.95 * start and end_ce < start_ce
    info = json.loads((tmp_path / "ft" / "config.json").read_text())["skipdecode"]
    assert (info["full_share"], info["distill"], info["loss_positions"]) == (0.5, 0.5, "generated")


def test_loss_positions_generated_scores_what_eval_scores(checkpoints):
    from transformers import OPTForCausalLM

    from skipdeploy.training.finetune import schedule_loss

    model = OPTForCausalLM.from_pretrained(checkpoints["tiny"], dtype=torch.float32).eval()
    ids, c, sched = torch.tensor([[2, *range(40, 63)]]), 9, Schedule.target_speedup(4, 2, decay_tokens=8)
    with torch.no_grad():
        logits = schedule_forward(model, ids, c, sched)
        generated, _ = schedule_loss(model, ids, c, sched, loss_positions="generated")
        every, _ = schedule_loss(model, ids, c, sched, loss_positions="all")
        assert torch.allclose(schedule_forward(model, ids, c, sched, first=c - 1), logits[:, c - 1:], atol=1e-5)
    ce = torch.nn.functional.cross_entropy
    assert abs(generated - ce(logits[0, c - 1:-1], ids[0, c:])) < 1e-5
    assert abs(every - ce(logits[0, :-1], ids[0, 1:])) < 1e-5


def test_resume_with_distill_and_full_share_gives_the_uninterrupted_weights(tmp_path, text_dir, monkeypatch):
    from skipdeploy.training import finetune as finetune_mod

    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny-llama", seed=4)
    finetune(_tuned_config(ckpt, text_dir, tmp_path / "a"), progress=False, log=lambda m: None)
    cfg = _tuned_config(ckpt, text_dir, tmp_path / "b")
    finetune(cfg, until=2, progress=False, log=lambda m: None)
    assert torch.load(tmp_path / "b" / "trainer_state.pt", weights_only=False)["origin"] == str(ckpt)
    sources = []
    monkeypatch.setattr(finetune_mod, "load_teacher",
                        lambda family, source, dtype, real=finetune_mod.load_teacher:
                        sources.append(source) or real(family, source, dtype))
    with pytest.raises(SkipDeployError, match="other settings"):
        finetune(_tuned_config(ckpt, text_dir, tmp_path / "b", distill=0.4), progress=False, log=lambda m: None)
    logs = []
    finetune(cfg, progress=False, log=logs.append)
    assert any("resuming from step 2" in m for m in logs) and sources[-1] == str(ckpt)  # not the partly tuned
    assert any("s/step" in m and "left" in m for m in logs)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_an_old_trainer_state_resumes_with_the_new_settings_at_their_defaults(tmp_path, text_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=3)
    cfg = _tuned_config(ckpt, text_dir, tmp_path / "ft", full_share=0.0, distill=0.0, loss_positions="all")
    finetune(cfg, until=1, progress=False, log=lambda m: None)
    path = tmp_path / "ft" / "trainer_state.pt"
    state = torch.load(path, weights_only=False)
    for key in ("full_share", "distill", "loss_positions"):
        del state["config"][key]
    del state["origin"]
    torch.save(state, path)
    logs = []
    finetune(cfg, progress=False, log=logs.append)
    assert any("resuming from step 1" in m for m in logs)


def test_fine_tuned_llama_training_forward_equals_the_runtime_of_its_export(tmp_path, text_dir):
    """Schedule-exact: after a fine-tune with distill and full-share, the training forward of each
    schedule is the runtime's per-step logits of the exported model (Llama: RoPE, GQA, RMSNorm)."""
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny-llama", seed=3, weight_scale=3.0)
    finetune(_tuned_config(ckpt, text_dir, tmp_path / "ft", steps=2, lr=1e-3), progress=False, log=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ft", dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    runtime = skipdeploy.load(skipdeploy.export(tmp_path / "ft", tmp_path / "sd", progress=False,
                                                log=lambda m: None).directory)
    prompts, N = [[1, 45, 67, 89, 101, 7], [1, 300, 5, 6, 77, 8]], 10
    for schedule in [*SCHEDULES, Schedule.target_speedup(4, 2, decay_tokens=8)]:
        result = runtime.generate(prompts, N, schedule, output_logits=True, eos_token_id=None)
        ids = torch.tensor([p + t for p, t in zip(prompts, result.tokens)])
        with torch.no_grad():
            ours = schedule_forward(model, ids, 6, schedule)[:, 5:5 + N].numpy()
        theirs = np.stack(result.logits, axis=1)
        assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max()), schedule


def test_greedy_match_counts_positions_and_identical_prefixes():
    from skipdeploy.training.evaluate import _greedy_match

    assert _greedy_match([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]]) == (7 / 8, (2 + 4) / 2)
    assert _greedy_match([[1, 2]], [[3, 2]]) == (0.5, 0.0)


def test_eval_against_a_reference_export(exports, text_dir, tmp_path):
    common = ["--data", str(text_dir), "--target-speedup", "1,2", "--seq-len", "32", "--chunks", "2", "--prompts",
              "3", "--max-new-tokens", "6", "--decay-tokens", "8", "--json"]
    own = json.loads(CliRunner().invoke(main, ["eval", str(exports["tiny"]), *common]).output)
    same = json.loads(CliRunner().invoke(main, ["eval", str(exports["tiny"]), "--reference", str(exports["tiny"]),
                                                *common]).output)
    other = CliRunner().invoke(main, ["eval", str(exports["tiny"]), "--reference", str(exports["tiny-post-ln"]),
                                      *common])
    assert other.exit_code == 0, other.output
    other = json.loads(other.output)
    assert same["reference"] == str(exports["tiny"]) and own["reference"] is None
    for a, b in zip(own["results"], same["results"]):  # itself as the reference: the same figures
        assert (a["agreement"], a["prefix"], a["prefix_tokens"]) == (b["agreement"], b["prefix"], b["prefix_tokens"])
    full = same["results"][0]
    assert (full["agreement"], full["prefix"], full["prefix_tokens"]) == (1.0, 1.0, 6.0)
    for r in same["results"] + other["results"]:
        assert 0 <= r["prefix"] <= r["agreement"] <= 1 and r["prefix_tokens"] == pytest.approx(r["prefix"] * 6)
    assert other["results"][0]["agreement"] < 1  # another model's greedy tokens
    table = CliRunner().invoke(main, ["eval", str(exports["tiny"]), "--reference", str(exports["tiny"]),
                                      *common[:-1]])
    assert table.exit_code == 0 and "identical prefix" in table.output and "6.0 (1.000)" in table.output


def test_eval_refuses_a_reference_with_another_tokenizer(exports, text_dir, tmp_path):
    llama = make_checkpoint(tmp_path / "llama", "tiny-llama", seed=1)
    ref = skipdeploy.export(llama, tmp_path / "llama-sd", progress=False, log=lambda m: None).directory
    out = CliRunner().invoke(main, ["eval", str(exports["tiny"]), "--reference", str(ref), "--data", str(text_dir),
                                    "--target-speedup", "1", "--seq-len", "32", "--chunks", "1", "--prompts", "1"])
    assert out.exit_code == 1 and "another tokenizer" in out.output and "Traceback" not in out.output, out.output


@pytest.mark.parametrize("args, words", [
    (["--full-share", "1.5"], "--full-share"), (["--distill", "-0.1"], "--distill"),
    (["--distill", "nan"], "--distill must be a finite number"), (["--loss-positions", "some"], "--loss-positions"),
])
def test_finetune_refuses_bad_mixing_values(tmp_path, text_dir, args, words):
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=3)
    out = CliRunner().invoke(main, ["finetune", str(ckpt), "--data", str(text_dir), "--out", str(tmp_path / "ft"),
                                    "--steps", "2", "--seq-len", "32", *args])
    assert out.exit_code in (1, 2) and words in out.output and "Traceback" not in out.output, out.output
    assert not (tmp_path / "ft").exists()
