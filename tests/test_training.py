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
