"""The command line as a user runs it: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import run_cli as run


def run_process(*args):
    """The installed entry point in a subprocess, for what only a real process shows."""
    return subprocess.run([sys.executable, "-m", "skipdeploy", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_command():
    out = run("--help")
    assert out.exit_code == 0
    for command in ("export", "inspect", "schedule", "generate"):
        assert command in out.output
        assert run(command, "--help").exit_code == 0


def test_front_page_names_demo_and_every_option_has_help():
    import click

    from skipdeploy.cli import main

    assert "skipdeploy demo" in run("--help").output
    for name, command in main.commands.items():
        assert command.help, name
        for param in command.params:
            if isinstance(param, click.Option) and not param.help:
                pytest.fail(f"{name} {param.opts} has no help text")
    # One flag name for one thing: the number of tokens to generate is --max-new-tokens everywhere.
    for name in ("generate", "verify", "bench", "eval", "demo"):
        assert "--max-new-tokens" in run(name, "--help").output, name


def test_stop_escapes_stream_json_and_the_target_met_over_this_generation(exports):
    from skipdeploy.cli.options import unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb") == "a\tb" and unescape("é") == "é"
    lines = run("generate", exports["tiny"], "--prompt", "for i in", "--max-new-tokens", "5", "--stream", "--json")
    assert lines.exit_code == 0, lines.output
    *steps, final = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [s["token"] for s in steps] == final["tokens"][0] and "".join(s["text"] for s in steps) == final["text"][0]
    # --decay-tokens defaults to the decode steps of this generation: the target is met over them.
    met = json.loads(run("generate", exports["tiny"], "--input-ids", "2,5,6", "--max-new-tokens", "9",
                         "--target-speedup", "1.6", "--json").stdout)
    assert len(met["layers_per_step"]) == 8 and abs(met["layer_speedup"] - 1.6) <= 0.05 * 1.6


def test_partial_schedule_flags_modify_the_default(checkpoints, tmp_path):
    out_dir = tmp_path / "exp"
    assert run("export", checkpoints["tiny"], "--out", out_dir, "--max-layers", "3", "--min-layers", "1",
               "--decay-tokens", "4").exit_code == 0
    base = json.loads(run("generate", out_dir, "--input-ids", "2,5", "--max-new-tokens", "6", "--json").stdout)
    assert base["schedule"]["max_layers"] == 3 and base["schedule"]["decay_tokens"] == 4
    changed = json.loads(run("generate", out_dir, "--input-ids", "2,5", "--max-new-tokens", "6", "--warmup-layers",
                             "2", "--prompt-layers", "schedule", "--json").stdout)["schedule"]
    assert changed == {**base["schedule"], "warmup_layers": 2, "prompt": "schedule"}


@pytest.mark.parametrize("args, message", [
    (("--seed", str(2 ** 70), "--temperature", "1"), "--seed must be a 64-bit integer"),
    (("--temperature", "nan"), "--temperature must be a number >= 0"),
    (("--top-p", "1.5", "--temperature", "1"), "--top-p must be a number in (0, 1]"),
])
def test_bad_knob_values_are_one_line(exports, args, message):
    result = run("generate", exports["tiny"], "--input-ids", "2,5", *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_out_of_range_counts_are_usage_errors(exports):
    for args in (("--threads", "0"), ("--threads", "-1"), ("--max-new-tokens", "0")):
        result = run("generate", exports["tiny"], "--input-ids", "2,5", *args)
        assert result.exit_code == 2 and "Traceback" not in result.output, args


def test_export_inspect_generate_json(checkpoints, tmp_path):
    out_dir = tmp_path / "exp"
    result = run("export", checkpoints["tiny"], "--out", out_dir, "--target-speedup", "1.5", "--decay-tokens", "8")
    assert result.exit_code == 0, result.output
    assert "exported 4 layers" in result.output and "max abs error" in result.output
    info = run("inspect", out_dir)
    assert info.exit_code == 0 and "sha256 verified" in info.output and "4 layers" in info.output
    data = json.loads(run("inspect", out_dir, "--json").output)
    assert data["schedule"]["kind"] == "linear" and data["schedule"]["decay_tokens"] == 8

    result = run("generate", out_dir, "--input-ids", "2,5,6,7", "--input-ids", "2,9", "--max-new-tokens", "6",
                 "--json", "--max-layers", "2", "--min-layers", "1", "--decay-tokens", "3")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["tokens"]) == 2 and all(1 <= len(t) <= 6 for t in payload["tokens"])
    assert payload["layers_per_step"][:3] == [3, 3, 2][:len(payload["layers_per_step"])]
    assert payload["prompt_layers"] == 4

    full = json.loads(run("generate", out_dir, "--prompt", "def greet", "--full", "--json").stdout)
    assert set(full["layers_per_step"]) <= {4} and isinstance(full["text"][0], str)


def test_generate_plain_and_stream(exports):
    plain = run("generate", exports["tiny"], "--prompt", "for i in", "--max-new-tokens", "5")
    assert plain.exit_code == 0 and "layers per token" in plain.stderr
    stream = run("generate", exports["tiny"], "--prompt", "for i in", "--max-new-tokens", "5", "--stream")
    assert stream.exit_code == 0 and stream.stdout == plain.stdout


def test_schedule_command(tmp_path):
    result = run("schedule", "--layers", "12", "--target-speedup", "2", "--decay-tokens", "16")
    assert result.exit_code == 0 and "layer speedup" in result.output
    data = json.loads(run("schedule", "--layers", "12", "--max-layers", "8", "--min-layers", "2",
                          "--decay-tokens", "6", "--json").output)
    assert data["steps"][0]["layers"] == [0, 4, 5, 6, 7, 8, 9, 10, 11]
    assert data["steps"][6]["layers"] == [0, 10, 11]


@pytest.mark.parametrize("args, message", [
    (("schedule", "--layers", "12", "--min-layers", "0"), "--min-layers must be an integer in [1, "),
    (("schedule", "--layers", "12", "--max-layers", "13"), "max_layers must be <= num_layers=12"),
    (("schedule", "--layers", "12", "--warmup-layers", "20"), "warmup_layers must be <= num_layers=12"),
    (("schedule", "--layers", "12", "--decay-tokens", "0"), "--decay-tokens must be an integer in [1, "),
    (("schedule", "--layers", "12", "--target-speedup", "40"), "out of reach"),
    (("schedule", "--layers", "6", "--table", "5,3,4"), "not monotone: tops[2]=4 > tops[1]=3"),
    (("inspect", "/nonexistent/export"), "does not exist"),
    (("generate", "/nonexistent/export", "--input-ids", "1,2"), "does not exist"),
    (("export", "/nonexistent/checkpoint", "--out", "/tmp/never-written"), "does not exist"),
])
def test_user_errors_are_one_line_exit_1(args, message):
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_generate_errors(exports):
    bad = run("generate", exports["tiny"], "--input-ids", "2,9999")
    assert bad.exit_code == 1 and "outside the vocabulary" in bad.output
    garbled = run("generate", exports["tiny"], "--input-ids", "2,x")
    assert garbled.exit_code == 1 and "comma-separated integers" in garbled.output
    usage = run("generate", exports["tiny"])
    assert usage.exit_code == 2


@pytest.mark.slow
def test_unsupported_checkpoint_from_the_real_entry_point(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    proc = run_process("export", tmp_path / "gpt2", "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert "is a GPT2LMHeadModel checkpoint; skipdeploy exports OPTForCausalLM" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_demo_runs_offline(tmp_path):
    result = run("demo", "--workdir", tmp_path, "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    assert "measured decode speedup" in result.output and (tmp_path / "export" / "manifest.json").is_file()


def test_verify_passes_on_a_good_export(exports, checkpoints):
    result = run("verify", exports["tiny"])
    assert result.exit_code == 0, result.output
    assert "layer_03.onnx" in result.output and "FAIL" not in result.output
    data = json.loads(run("verify", exports["tiny"], "--model", checkpoints["tiny"], "--json").stdout)
    assert data["ok"] and data["graphs"][1]["reference"] == "transformers"
    assert {d["name"] for d in data["decode"]} == {"full", "skip 2x"}


def test_verify_fails_on_a_perturbed_graph(exports, checkpoints, tmp_path):
    from .conftest import edited_export

    copy = edited_export(exports["tiny"], tmp_path / "copy", "layer_01.onnx", "fc2.bias", lambda b: b + 0.01)
    result = run("verify", copy, "--model", checkpoints["tiny"])
    assert result.exit_code == 1
    assert "verification failed beyond tolerance: layer_01.onnx" in result.output


@pytest.mark.parametrize("args, words", [
    (["demo", "--max-new-tokens", "1"], "--max-new-tokens must be at least 2"),
    (["demo", "--target-speedup", "0"], "--target-speedup must be above 1"),
    (["demo", "--prompt", ""], "--prompt is empty"),
])
def test_demo_refuses_values_it_used_to_replace_or_crash_on(args, words):
    out = run(*args)
    assert out.exit_code == 1 and words in out.output and "Traceback" not in out.output


def test_bench_checks_its_output_paths_before_measuring(exports, tmp_path):
    for option in ("--output", "--plot"):
        out = run("bench", exports["tiny"], option, str(tmp_path / "missing" / "b.json"))
        assert out.exit_code == 1 and f"{option} " in out.output and "does not exist" in out.output
        assert "ms/token" not in out.output  # refused before any measurement


def test_eval_seq_len_below_two_names_itself(exports):
    out = run("eval", exports["tiny"], "--data", "stdlib:heldout", "--seq-len", "0")
    assert out.exit_code == 1 and "--seq-len must be at least 2" in out.output


def test_empty_items_in_a_comma_list_are_refused(exports):
    out = run("generate", exports["tiny"], "--input-ids", "2,,3")
    assert out.exit_code == 1 and "--input-ids has an empty item" in out.output


def test_stop_strings_without_a_tokenizer_name_the_stop_option(checkpoints, tmp_path):
    import skipdeploy

    export = skipdeploy.export(checkpoints["tiny"], tmp_path / "sd", progress=False, log=lambda m: None).directory
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["tokenizer"] = None  # what an export of a checkpoint without a tokenizer records
    (export / "manifest.json").write_text(json.dumps(manifest))
    out = run("generate", export, "--input-ids", "2,100", "--stop", "\\n\\n")
    assert out.exit_code == 1 and "stop strings need the model's tokenizer" in out.output


def test_bench_default_targets_adapt_to_the_steps_measured(exports):
    # 4 layers over 3 decode steps cannot reach the default 3x and 5x: they are left out, with a note.
    out = run("bench", exports["tiny"], "--max-new-tokens", "4", "--batch-sizes", "1", "--repeats", "1", "--warmup",
              "0", "--no-hf", "--no-memory", "--no-bandwidth", "--json")
    assert out.exit_code == 0, out.output
    assert "left out of the default --target-speedup" in out.stderr and "--warmup-layers" not in out.output
    assert json.loads(out.stdout)["config"]["target_speedups"] == [2.0]


def test_bench_unreachable_target_names_what_bench_can_change(exports):
    out = run("bench", exports["tiny"], "--max-new-tokens", "4", "--target-speedup", "5")
    assert out.exit_code == 1 and "out of reach" in out.output and "ms/token" not in out.output
    assert "--max-new-tokens" in out.output and "--target-speedup" in out.output
    assert "--warmup-layers" not in out.output and len(out.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (("schedule", "--layers", "100000000", "--target-speedup", "2"), "--layers must be <= 1024"),
    (("schedule", "--layers", "12", "--steps", "100000000"), "--steps must be <= 1048576"),
    (("schedule", "--layers", "12", "--decay-tokens", "100000000"), "--decay-tokens"),
    (("schedule", "--layers", "12", "--target-speedup", "2", "--decay-tokens", "100000000"), "--decay-tokens"),
])
def test_schedule_sizes_are_bounded_by_what_a_model_has(args, words):
    result = run(*args)
    assert result.exit_code == 1 and words in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_schedule_json_at_a_long_horizon_lists_every_step():
    data = json.loads(run("schedule", "--layers", "12", "--target-speedup", "2", "--decay-tokens", "5000",
                          "--json").stdout)
    assert len(data["steps"]) == 5001 and data["steps"][-1]["step"] == 5000
    assert abs(data["layer_speedup"] - 2) <= 0.1


def test_demo_label_matches_its_figure_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import re
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the demo's temporary directory goes
    out = run("demo", "--random", "--max-new-tokens", "9", "--target-speedup", "1.6")
    assert out.exit_code == 0, out.output
    # The label's speedup is the one reached over the tokens generated (the decay spans them).
    label = re.search(r"--- skipdecode ([\d.]+)x: .*\(layer speedup ([\d.]+)x\)", out.output)
    assert label and abs(float(label.group(2)) - float(label.group(1))) <= 0.05 * float(label.group(1))
    assert "removed at the end; --workdir DIR keeps it" in out.output
    assert not list(tmp_path.glob("skipdeploy-demo-*"))


ARGUMENTS = {"export": "MODEL", "finetune": "MODEL", "eval": "MODEL", "inspect": "EXPORT", "quantize": "EXPORT",
             "serve": "EXPORT", "verify": "EXPORT", "bench": "EXPORT", "build-engines": "EXPORT", "generate": "EXPORT",
             "triton": "EXPORT"}


@pytest.mark.parametrize("name, argument", sorted(ARGUMENTS.items()))
def test_positional_arguments_say_export_or_model(name, argument):
    usage = run(name, "--help").output.splitlines()[0]
    assert usage.endswith(f"[OPTIONS] {argument}") and "DIRECTORY" not in usage, usage


def test_export_and_quantize_share_the_weights_option(checkpoints, tmp_path):
    helps = run("export", "--help").output
    assert "--weights" in helps and "--quantize" not in helps  # the old spelling stays, hidden
    assert "--weights" in run("quantize", "--help").output
    old = run("export", checkpoints["tiny"], "--out", tmp_path / "x", "--quantize", "int3")
    assert old.exit_code == 2 and "int3" in old.output  # still parsed as the same option


def test_force_is_named_as_the_door_spells_it(exports, checkpoints, tmp_path):
    import skipdeploy
    from skipdeploy.errors import ExportError

    taken = tmp_path / "taken"
    taken.mkdir()
    for args in (("export", checkpoints["tiny"]), ("quantize", exports["tiny"])):
        out = run(*args, "--out", taken)
        assert out.exit_code == 1 and "pass --force to replace it" in out.output and "force=True" not in out.output
    with pytest.raises(ExportError, match="pass force=True to replace it") as refused:
        skipdeploy.export(checkpoints["tiny"], taken, log=lambda m: None)
    assert "--force" not in str(refused.value)


def test_exporting_an_export_says_what_to_do_with_it(exports, tmp_path):
    out = run("export", exports["tiny"], "--out", tmp_path / "again")
    assert out.exit_code == 1 and "is already a skipdeploy export, not a checkpoint" in out.output
    assert f"skipdeploy generate {exports['tiny']}" in out.output and not (tmp_path / "again").exists()


def test_export_max_batch_is_bounded_up_front(checkpoints, tmp_path):
    import skipdeploy
    from skipdeploy.errors import ExportError
    from skipdeploy.exporter.export import MAX_BATCH

    out = run("export", checkpoints["tiny"], "--out", tmp_path / "x", "--max-batch", "99999999999999999999")
    assert out.exit_code == 1 and f"max_batch must be an integer between 1 and {MAX_BATCH}" in out.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match=str(MAX_BATCH)):
        skipdeploy.export("/nonexistent", tmp_path / "y", max_batch=MAX_BATCH + 1)


def test_bundled_is_a_source_name():
    from skipdeploy.bundled import bundled_model
    from skipdeploy.exporter.checkpoint import local_source

    if bundled_model() is None:
        pytest.skip("the bundled model is absent from this installation")
    assert local_source("bundled") == str(bundled_model())


@pytest.mark.slow
def test_export_bundled(tmp_path):
    from skipdeploy.bundled import bundled_model

    if bundled_model() is None:
        pytest.skip("the bundled model is absent from this installation")
    out = run("export", "bundled", "--out", tmp_path / "sd", "--no-check")
    assert out.exit_code == 0, out.output
    assert "exported 12 layers" in out.output and (tmp_path / "sd" / "manifest.json").is_file()
