"""One request, one meaning: the same list of requests, edge values included, through the five
doors (Python API, CLI, OpenAI server, Triton model, C API) must give the same tokens or the same
refusal. The reference is ``Runtime.generate`` of each request alone (the Python door); a refusal
must name the field as that door spells it (OpenAI's ``max_tokens`` and ``param``, Triton's
``sampling_parameters.`` keys, C's ``params_json`` keys, the CLI's flags).

Each door is the real thing: the CLI's click command, ``skipdeploy serve`` in its own process over
HTTP, a real tritonserver, and a C program linked against the built library.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest

import skipdeploy
from skipdeploy.errors import SkipDeployError
from skipdeploy.request_params import CLI, OPENAI, PYTHON, TRITON, C

from .test_capi import capi  # noqa: F401 - the built C library (a fixture)

PROMPT = [2, 45, 67, 89]
TEXT = "def greet(name):"
VOCAB = 512  # the tiny checkpoints' vocabulary (conftest)

# (label, fields in request_params' names (schedule fields under "schedule"), accepted?, field a refusal names)
# Every field is given explicitly where the protocols' defaults differ (docs/DESIGN.md section 11).
G = {"max_new_tokens": 6, "temperature": 0}
REQUESTS = [
    ("greedy", G, True, None),
    ("top_k sampled", {**G, "temperature": 0.8, "top_k": 5, "seed": 7}, True, None),
    ("top_p, seed -1", {**G, "temperature": 1.0, "top_p": 0.9, "seed": -1}, True, None),
    ("seed 2**64-1", {**G, "temperature": 0.7, "seed": 2**64 - 1}, True, None),
    ("temperature 3", {**G, "temperature": 3, "seed": 1}, True, None),
    ("top_k -1 is off", {**G, "temperature": 0.5, "top_k": -1, "seed": 3}, True, None),
    ("repetition penalty", {**G, "repetition_penalty": 1.3}, True, None),
    ("stop token list", {**G, "stop_token_ids": "STOP_TOKEN"}, True, None),
    ("stop token single", {**G, "stop_token_ids": ["STOP_TOKEN"]}, True, None),
    ("ignore_eos", {**G, "ignore_eos": True}, True, None),
    ("target speedup", {**G, "schedule": {"target_speedup": 2}}, True, None),
    ("linear schedule", {**G, "max_new_tokens": 8,
                         "schedule": {"max_layers": 3, "min_layers": 1, "decay_tokens": 4, "warmup_layers": 0}}, True,
     None),
    ("full", {**G, "schedule": {"full": True}}, True, None),
    ("table", {**G, "schedule": {"table": [3, 2, 1]}}, True, None),
    ("one token", {**G, "max_new_tokens": 1}, True, None),
    ("max_new_tokens 0", {**G, "max_new_tokens": 0}, False, "max_new_tokens"),
    ("max_new_tokens huge", {**G, "max_new_tokens": 2**21}, False, "max_new_tokens"),
    ("past the export's length", {**G, "max_new_tokens": 600}, False, None),
    ("temperature < 0", {**G, "temperature": -0.1}, False, "temperature"),
    ("top_p 0", {**G, "top_p": 0}, False, "top_p"),
    ("top_p > 1", {**G, "top_p": 1.5}, False, "top_p"),
    ("top_k -2", {**G, "top_k": -2}, False, "top_k"),
    ("seed 2**64", {**G, "seed": 2**64}, False, "seed"),
    ("seed below int64", {**G, "seed": -2**63 - 1}, False, "seed"),
    ("repetition penalty 0", {**G, "repetition_penalty": 0}, False, "repetition_penalty"),
    ("stop token outside the vocabulary", {**G, "stop_token_ids": [VOCAB]}, False, None),
    ("negative stop token", {**G, "stop_token_ids": [-1]}, False, "stop_token_ids"),
    ("max_layers 0", {**G, "schedule": {"max_layers": 0}}, False, "max_layers"),
    ("max_layers above the model's", {**G, "schedule": {"max_layers": 5}}, False, None),
    ("target speedup < 1", {**G, "schedule": {"target_speedup": 0.5}}, False, "target_speedup"),
    ("decay_tokens 0", {**G, "schedule": {"decay_tokens": 0}}, False, "decay_tokens"),
    ("target and max_layers", {**G, "schedule": {"target_speedup": 2, "max_layers": 3}}, False, None),
    ("rising table", {**G, "schedule": {"table": [1, 2]}}, False, None),
]
TEXT_REQUESTS = [  # text prompts; "STOP_TEXT" is a piece of the greedy completion
    ("text greedy", {"max_new_tokens": 12, "temperature": 0}, True, None),
    ("text stop string", {"max_new_tokens": 12, "temperature": 0, "stop": ["STOP_TEXT"]}, True, None),
    ("text stop, sampled", {"max_new_tokens": 12, "temperature": 0.9, "seed": 5, "stop": "STOP_TEXT"}, True, None),
    ("empty stop string", {"max_new_tokens": 12, "temperature": 0, "stop": [""]}, False, "stop"),
]


@pytest.fixture(scope="module")
def runtime(exports):
    return skipdeploy.load(exports["tiny"])


@pytest.fixture(scope="module")
def requests(runtime):
    """The lists with their placeholders filled from the model's own greedy output, so that the stop
    token and the stop string really occur."""
    greedy = runtime.generate([PROMPT], 6, temperature=0).tokens[0]
    full_text = runtime.generate_text([TEXT], 12, temperature=0).text[0]
    stop_text = full_text[len(full_text) // 2:len(full_text) // 2 + 2]
    assert len(greedy) == 6 and len(stop_text) == 2 and stop_text.strip(), (greedy, full_text)

    def fill(value):
        if value == "STOP_TOKEN":
            return greedy[3]
        if value == "STOP_TEXT":
            return stop_text
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    return ([(label, fill(f), ok, name) for label, f, ok, name in REQUESTS],
            [(label, fill(f), ok, name) for label, f, ok, name in TEXT_REQUESTS], full_text, stop_text)


# -- the doors: each returns ("tokens", ids) / ("text", str) or ("refused", message) ------------------
def python_door(runtime, fields, text=False):
    knobs = {PYTHON.key(k): v for k, v in fields.items() if k not in ("max_new_tokens", "schedule", "ignore_eos")}
    if fields.get("ignore_eos"):
        knobs["eos_token_id"] = None
    try:
        if text:
            return "text", runtime.generate_text([TEXT], fields["max_new_tokens"], schedule=fields.get("schedule"),
                                                 **knobs).text[0]
        return "tokens", runtime.generate([PROMPT], fields["max_new_tokens"], fields.get("schedule"),
                                          **knobs).tokens[0]
    except SkipDeployError as exc:
        return "refused", str(exc)


def cli_door(export, fields, text=False):
    from click.testing import CliRunner

    from skipdeploy.cli import main

    args = ["generate", str(export), "--json", *(["--prompt", TEXT] if text else ["--input-ids", ",".join(map(str, PROMPT))])]
    for key, value in {**fields, **fields.get("schedule", {})}.items():
        if key == "schedule":
            continue
        flag = CLI.key(key)
        if isinstance(value, bool):
            args += [flag] if value else []
        elif key == "table":
            args += [flag, ",".join(map(str, value))]
        elif isinstance(value, list):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    result = CliRunner().invoke(main, args)
    if result.exit_code == 2:  # click's own usage error (a range it checks itself): its "Error:" line
        return "refused", next(line for line in result.output.splitlines() if line.startswith("Error:"))
    if result.exit_code != 0:
        assert result.exit_code == 1, result.output
        return "refused", result.output
    body = json.loads(result.stdout)
    return ("text", body["text"][0]) if text else ("tokens", body["tokens"][0])


def protocol_body(fields, door):
    """The fields under ``door``'s keys, the schedule fields in its nested object."""
    body = {door.key(k): v for k, v in fields.items() if k != "schedule"}
    if "schedule" in fields:
        body[door.schedule_key] = fields["schedule"]
    return body


def c_params(fields):
    return json.dumps({**{k: v for k, v in fields.items() if k != "schedule"}, **fields.get("schedule", {})})


# -- the servers and the C program ------------------------------------------------------------------
@pytest.fixture(scope="module")
def openai_server(exports, tmp_path_factory):
    pytest.importorskip("fastapi", reason="serve needs the serve extra (pip install 'skipdeploy[serve]')")
    from .test_serve import Server

    server = Server(exports["tiny"], "--model-name", "tiny", "--max-batch", "2",
                    log_path=tmp_path_factory.mktemp("doors-serve") / "server.log")
    yield server
    assert server.stop() == 0, server.log()


def openai_door(server, fields, text=False):
    body = {"model": "tiny", "prompt": TEXT if text else PROMPT, **protocol_body(fields, OPENAI)}
    status, _, reply = server.post(body, key=None)
    if status != 200:
        assert 400 <= status < 500, (status, reply)
        return "refused", f"{reply['error']['param']}: {reply['error']['message']}"
    choice = reply["choices"][0]
    return ("text", choice["text"]) if text else ("tokens", choice["skipdecode"]["token_ids"])


@pytest.fixture(scope="module")
def triton_server(exports, tmp_path_factory):
    from .test_triton import _server_or_skip, run_triton

    server_mod = _server_or_skip()
    root = tmp_path_factory.mktemp("doors-triton")
    made = run_triton(exports["tiny"], "--out", root / "repo", "--model-name", "tiny", "--max-batch", "2")
    assert made.exit_code == 0, made.output
    server = server_mod.TritonServer(root / "repo", workdir=root / "server")
    server.start()
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


def triton_door(server, fields, text=False):
    body = {"sampling_parameters": json.dumps(protocol_body(fields, TRITON)), "exclude_input_in_output": True,
            **({"text_input": TEXT} if text else {"input_ids": PROMPT})}
    request = urllib.request.Request(f"{server.http_url}/v2/models/tiny/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        assert 400 <= exc.code < 500, exc.code
        return "refused", json.loads(exc.read())["error"]
    if text:
        return "text", reply["text_output"]
    ids = reply["output_ids"]
    return "tokens", ids if isinstance(ids, list) else [ids]


C_PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include <skipdeploy.h>

/* Reads "ids|text <TAB> prompt <TAB> params_json" lines; answers "OK ..." or "REFUSED status: message". */
int main(int argc, char **argv)
{
    sd_runtime *rt = NULL;
    if (argc != 2 || sd_load(argv[1], NULL, &rt) != SD_OK) {
        fprintf(stderr, "load: %s\n", sd_last_error());
        return 1;
    }
    static char line[1 << 16], text[1 << 16];
    while (fgets(line, sizeof line, stdin)) {
        char *kind = strtok(line, "\t"), *prompt = strtok(NULL, "\t"), *params = strtok(NULL, "\n");
        sd_status status;
        size_t n = 0;
        if (strcmp(kind, "text") == 0) {
            status = sd_generate_text(rt, prompt, params, text, sizeof text, &n);
            if (status == SD_OK)
                printf("OK %s\n", text);  /* the test's texts hold no newline: checked there */
        } else {
            int64_t ids[64], out[4096];
            size_t len = 0;
            for (char *p = strtok(prompt, ","); p; p = strtok(NULL, ","))
                ids[len++] = strtoll(p, NULL, 10);
            status = sd_generate(rt, ids, len, params, out, 4096, &n);
            if (status == SD_OK) {
                printf("OK ");
                for (size_t i = 0; i < n; i++)
                    printf("%s%lld", i ? "," : "", (long long)out[i]);
                printf("\n");
            }
        }
        if (status != SD_OK)
            printf("REFUSED %s: %s\n", sd_status_name(status), sd_last_error());
        fflush(stdout);
    }
    sd_free(rt);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_program(capi, tmp_path_factory):
    from .test_capi import compile_c

    return compile_c(capi, C_PROGRAM.replace("#include <stdio.h>", "#include <stdio.h>\n#include <stdlib.h>"),
                     "doors", tmp_path_factory.mktemp("doors-c"))


def c_door_all(program, export, calls):
    """Every call through one process (loading once): [(fields, text)] -> outcomes."""
    lines = [f"{'text' if text else 'ids'}\t{TEXT if text else ','.join(map(str, PROMPT))}\t{c_params(fields)}"
             for fields, text in calls]
    run = subprocess.run([str(program), str(export)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    answers = run.stdout.splitlines()
    assert len(answers) == len(calls), run.stdout
    out = []
    for answer, (_, text) in zip(answers, calls):
        if answer.startswith("REFUSED "):
            assert not answer.startswith("REFUSED SD_ERR_INTERNAL"), answer
            out.append(("refused", answer[len("REFUSED "):]))
        elif text:
            out.append(("text", answer[len("OK "):]))
        else:
            body = answer[len("OK "):]
            out.append(("tokens", [int(t) for t in body.split(",")] if body else []))
    return out


# -- the comparison ---------------------------------------------------------------------------------
def spelled(door, name):
    return door.spelled(name).removeprefix("params_json: ")


def compare(door_name, door, cases, outcomes, reference):
    for (label, fields, ok, name), got, want in zip(cases, outcomes, reference):
        assert (got[0] != "refused") == ok, (door_name, label, got)
        if ok:
            assert got == want, (door_name, label)
        elif name is not None:  # the refusal names the field as this door spells it
            assert spelled(door, name) in got[1], (door_name, label, got[1])
            assert got[1].count("\n") <= 1 and "Traceback" not in got[1], (door_name, label)


@pytest.fixture(scope="module")
def reference(runtime, requests):
    cases, text_cases, full_text, stop_text = requests
    tokens = [python_door(runtime, f) for _, f, _, _ in cases]
    texts = [python_door(runtime, f, text=True) for _, f, _, _ in text_cases]
    return tokens, texts


def test_python_door_keeps_the_rules(runtime, requests, reference):
    """The reference itself: edge values accepted or refused as listed, and OpenAI's stop rule."""
    cases, text_cases, full_text, stop_text = requests
    compare("python", PYTHON, cases, reference[0], reference[0])
    compare("python", PYTHON, text_cases, reference[1], reference[1])
    greedy, cut = reference[1][0][1], reference[1][1][1]
    assert greedy == full_text and cut == full_text[:full_text.index(stop_text)]  # ends before the stop string
    # the same seed modulo 2**64 is the same request
    assert python_door(runtime, {**G, "temperature": 1.0, "top_p": 0.9, "seed": 2**64 - 1}) == reference[0][2]


def check_door(name, door, ask, requests, reference):
    """Every token and text request through ``ask(fields, text)`` of one door, against the reference."""
    cases, text_cases, _, _ = requests
    compare(name, door, cases, [ask(f, False) for _, f, _, _ in cases], reference[0])
    compare(name, door, text_cases, [ask(f, True) for _, f, _, _ in text_cases], reference[1])


def test_cli_door(exports, requests, reference):
    check_door("cli", CLI, lambda f, text: cli_door(exports["tiny"], f, text), requests, reference)


@pytest.mark.slow
def test_openai_door(openai_server, requests, reference):
    check_door("openai", OPENAI, lambda f, text: openai_door(openai_server, f, text), requests, reference)


@pytest.mark.slow
def test_triton_door(triton_server, requests, reference):
    check_door("triton", TRITON, lambda f, text: triton_door(triton_server, f, text), requests, reference)


@pytest.mark.slow
def test_c_door(c_program, exports, requests, reference):
    cases, text_cases, full_text, _ = requests
    assert "\n" not in full_text  # the C program answers a line per call
    outcomes = c_door_all(c_program, exports["tiny"], [(f, False) for _, f, _, _ in cases] +
                          [(f, True) for _, f, _, _ in text_cases])
    compare("c", C, cases, outcomes[:len(cases)], reference[0])
    compare("c", C, text_cases, outcomes[len(cases):], reference[1])


def test_every_field_is_documented_in_the_design():
    from pathlib import Path

    from skipdeploy.request_params import SAMPLING_FIELDS, SCHEDULE_FIELDS

    design = (Path(__file__).resolve().parent.parent / "docs" / "DESIGN.md").read_text()
    for field in SAMPLING_FIELDS + SCHEDULE_FIELDS:
        assert f"`{field.name}`" in design, field.name
