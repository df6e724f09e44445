"""The C API: the bridge in Python, then the built library from C and C++ programs run with an
empty environment (``env -i``), against the Python API.

The library is built once per module (a second or so), the examples with their own Makefiles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skipdeploy.capi import bridge, functions, header
from skipdeploy.capi.status import MESSAGE_LIMIT, Status, message_of, status_of
from skipdeploy.errors import (BackendError, CapacityError, InputError, ManifestError, ScheduleError,
                               SkipDeployError)
from skipdeploy.schedule import Schedule
from skipdeploy.serving import QueueFullError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "c"
PROMPT = [2, 45, 67, 89]
SCHEDULED = {"max_layers": 3, "min_layers": 1, "decay_tokens": 4}


# -- the bridge, in Python (no compiler) ----------------------------------------------------------

GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": None, "stop_strings": (),
          "stop_token_ids": ()}


def test_params_parse_schedule_knobs_and_stop():
    default = Schedule.full(4)
    p = bridge.parse_params(None, 4, default)
    assert (p.max_new_tokens, p.schedule, p.knobs) == (32, default, GREEDY)  # the C API's documented defaults
    p = bridge.parse_params(json.dumps({**SCHEDULED, "max_new_tokens": 8, "temperature": 0.5, "seed": 3,
                                        "stop": "\n\n", "stop_token_ids": 7, "ignore_eos": True}), 4, default)
    assert p.schedule.to_dict() == Schedule(4, 3, 1, 4).to_dict()
    assert p.knobs == {**GREEDY, "temperature": 0.5, "seed": 3, "stop_strings": ("\n\n",), "stop_token_ids": (7,)}
    assert p.eos_token_id is None and p.max_new_tokens == 8
    assert bridge.parse_params('{"stop": ["a", "b"]}', 4, default).knobs["stop_strings"] == ("a", "b")
    # target_speedup decays over this generation's decode steps
    assert bridge.parse_params('{"target_speedup": 2, "max_new_tokens": 9}', 4, default).schedule.decay_tokens == 8


@pytest.mark.parametrize("text, words", [
    ("{", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"max_new_token": 3}', "unknown key"),
    ('{"max_new_tokens": 0}', "max_new_tokens"),
    ('{"max_new_tokens": "3"}', "max_new_tokens"),
    ('{"max_layers": 9}', "max_layers"),
    ('{"max_layers": "x"}', "max_layers"),
    ('{"target_speedup": 2, "max_layers": 3}', "target_speedup"),
    ('{"stop": 5}', "stop"),
    ('{"stop_token_ids": ["a"]}', "stop_token_ids"),
    ('{"ignore_eos": 1}', "ignore_eos"),
])
def test_params_errors(text, words):
    with pytest.raises(InputError, match=words) as info:  # SD_ERR_INPUT, naming the key
        bridge.parse_params(text, 4, Schedule.full(4))
    assert status_of(info.value) == Status.SD_ERR_INPUT


@pytest.mark.parametrize("text, error, words", [
    ('{"threads": 0}', InputError, "threads"),
    ('{"max_batch": true}', InputError, "max_batch"),
    ('{"memory_limit": "1G"}', InputError, "memory_limit"),
    ('{"check_files": "yes"}', InputError, "check_files"),
    ('{"device": "cuda"}', BackendError, "CPU"),
    ('{"backend": "tensorrt"}', BackendError, "onnxruntime or torch"),
    ('{"max_batchh": 2}', InputError, "unknown key"),
])
def test_options_errors(text, error, words):
    with pytest.raises(error, match=words):
        bridge.engine_options(text)


def test_status_mapping_and_one_line_messages():
    assert bridge.engine_options(None) == {} and bridge.engine_options('{"threads": 2, "max_length": null}') == \
        {"threads": 2}
    cases = [(InputError("x"), False, "SD_ERR_INPUT"), (ScheduleError("x"), False, "SD_ERR_INPUT"),
             (CapacityError("x"), False, "SD_ERR_CAPACITY"), (QueueFullError("x"), False, "SD_ERR_CAPACITY"),
             (ManifestError("x"), True, "SD_ERR_EXPORT"), (BackendError("x"), True, "SD_ERR_EXPORT"),
             (BackendError("x"), False, "SD_ERR_INTERNAL"), (SkipDeployError("x"), True, "SD_ERR_INTERNAL"),
             (ZeroDivisionError("x"), False, "SD_ERR_INTERNAL")]
    for exc, loading, name in cases:
        assert status_of(exc, loading).name == name
    assert message_of(KeyError("a\nb"), "sd_load") == "sd_load: KeyError: 'a\\nb'"
    assert "\n" not in message_of(InputError("line one\n  line two")) and \
        len(message_of(InputError("é" * 2000)).encode()) <= MESSAGE_LIMIT


@pytest.mark.slow
def test_bridge_matches_the_python_api(exports):
    import skipdeploy

    export = exports["tiny"]
    b = bridge.Bridge()
    handle = b.load(str(export), '{"threads": 1, "max_batch": 2}')
    try:
        runtime = skipdeploy.load(export)
        want = runtime.generate([PROMPT], 6).tokens[0]
        assert b.generate(handle, PROMPT, '{"max_new_tokens": 6}') == want
        seen = []
        b.stream(handle, PROMPT, '{"max_new_tokens": 6}', lambda t: seen.append(t) or len(seen) == 2)
        assert seen == want[:2]
        text = runtime.generate_text(["def greet"], 5).text[0]
        assert b.generate_text(handle, "def greet", '{"max_new_tokens": 5}') == text
        assert b.detokenize(handle, b.tokenize(handle, "for i in")) == "for i in"
        assert json.loads(b.info(handle))["num_layers"] == 4
        with pytest.raises(InputError, match="empty"):
            b.generate(handle, [], None)
        with pytest.raises(InputError, match="vocabulary"):
            b.generate(handle, [2, 10**6], None)
    finally:
        b.free(handle)
    with pytest.raises(InputError, match="not a live sd_runtime"):
        b.generate(handle, PROMPT, None)


# -- the table: each function declared once ------------------------------------------------------

# The C section of CONTRACTS.md: what users' programs call.
CONTRACT_FUNCTIONS = {"sd_version", "sd_load", "sd_generate", "sd_generate_stream", "sd_generate_text",
                      "sd_last_error", "sd_free", "sd_status_name", "sd_tokenize", "sd_detokenize", "sd_runtime_info"}
CONTRACT_STATUSES = ["SD_OK", "SD_ERR_INPUT", "SD_ERR_CAPACITY", "SD_ERR_EXPORT", "SD_ERR_BUFFER", "SD_ERR_INTERNAL"]
# A declaration in the header: a return type at the start of a line, then the name.
DECLARATION = re.compile(r"^(?:const char \*|sd_status |void )(sd_\w+)\(", re.M)


def test_the_table_keeps_the_contract():
    assert {f.name for f in functions.FUNCTIONS} >= CONTRACT_FUNCTIONS
    assert [s.name for s in Status] == CONTRACT_STATUSES and [int(s) for s in Status] == list(range(6))


def test_the_header_declares_each_function_of_the_table_once_with_its_doc():
    text = header.header("9.9.9")
    assert DECLARATION.findall(text) == [f.name for f in functions.FUNCTIONS]
    for f in functions.FUNCTIONS:
        assert "\n".join([*header.comment(f.doc), header.prototype(f)]) + "\n" in text, f.name
    for s in Status:  # the enum, with the values Python returns
        assert re.search(rf"^    {s.name} = {int(s)}\b", text, re.M), s.name
    assert '#define SKIPDEPLOY_VERSION "9.9.9"' in text and "Buffer rules as sd_generate_text." in text
    # sd_status_name knows every status, and each wrapper resets and checks what its roles say
    source = header.wrappers('L"/python"')
    assert all(f'case {s.name}: return "{s.name}";' in source for s in Status)
    assert 'sd_generate: prompt is NULL but prompt_len is %zu' in source and "*out = NULL;" in source


def test_install_binds_every_function_of_the_table_and_nothing_else():
    from skipdeploy.capi.binding import bindings

    python = [f for f in functions.FUNCTIONS if f.method is not None]
    made = bindings(None, None, bridge.Bridge())  # looks each Bridge method up now
    assert list(made) == [f.extern for f in python]
    assert re.findall(r'extern "Python" int (\w+)\(', header.cdef()) == list(made)
    assert {f.name for f in functions.FUNCTIONS} - {f.name for f in python} == \
        {"sd_version", "sd_status_name", "sd_last_error"}  # C alone
    import inspect

    for f in python:  # the Bridge method takes what the C arguments become
        inputs = [p for p in f.params if p.role in ("rt", "path", "text", "json", "ids", "callback")]
        inspect.signature(getattr(bridge.Bridge, f.method)).bind(None, *inputs)
    with pytest.raises(AttributeError):
        bindings(None, None, object())
    cffi = pytest.importorskip("cffi")
    cffi.FFI().cdef(header.cdef())  # what the build hands cffi parses


@pytest.mark.parametrize("params, words", [
    ((("const int64_t *ids", "ids"),), "partner"),
    ((("size_t ids_len", "len"),), "must follow"),
    ((("int64_t *out", "ids_out"), ("size_t out_capacity", "capacity")), "out_len"),
    ((("int x", "number"),), "unknown role"),
])
def test_the_table_refuses_entries_the_generators_cannot_make(params, words):
    entry = functions.Function("sd_bad", "sd_status", tuple(functions.Param(*p) for p in params), "doc",
                               method="info")
    with pytest.raises(ValueError, match=words):
        functions.check_table((entry,))
    with pytest.raises(ValueError, match="twice"):
        functions.check_table(functions.FUNCTIONS + functions.FUNCTIONS[:1])


# -- the library, from C --------------------------------------------------------------------------

def _skip_reason() -> str | None:
    import importlib.util

    if importlib.util.find_spec("cffi") is None:
        return "the C API needs cffi (pip install 'skipdeploy[capi]')"
    for tool in ("cc", "make", "pkg-config"):
        if shutil.which(tool) is None:
            return f"the C API tests need {tool}"
    from skipdeploy.capi.build import libpython

    try:
        libpython()
    except SkipDeployError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def capi(tmp_path_factory):
    """A C API build (through the command) and the environment that finds it with pkg-config."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from click.testing import CliRunner

    from skipdeploy.cli.capi import command

    out = tmp_path_factory.mktemp("capi")
    result = CliRunner().invoke(command, ["-o", str(out)], catch_exceptions=False)  # -o as in every command
    assert result.exit_code == 0, result.output
    assert "PKG_CONFIG_PATH=" in result.output
    return out


def _pc_env(prefix: Path) -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PKG_CONFIG_PATH": str(prefix / "lib" / "pkgconfig")}


def compile_c(prefix: Path, source: str, name: str, tmp: Path) -> Path:
    path = tmp / f"{name}.c"
    path.write_text(source)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "skipdeploy"], env=_pc_env(prefix), check=True,
                           capture_output=True, text=True).stdout.split()
    binary = tmp / name
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-pthread", "-o", str(binary), str(path), *flags], check=True)
    return binary


def run_empty_env(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run with an EMPTY environment, as `env -i` does."""
    result = subprocess.run([str(a) for a in args], env={}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def _ids(line: str) -> list[int]:
    body = line.split(":", 1)[1].strip()
    return [int(t) for t in body.split(",")] if body else []


@pytest.fixture(scope="module")
def python_tokens(exports):
    import skipdeploy

    runtime = skipdeploy.load(exports["tiny"])
    sched = Schedule(4, **SCHEDULED)
    return {"greedy": runtime.generate([PROMPT], 32).tokens[0],
            "scheduled": runtime.generate([PROMPT], 12, sched).tokens[0],
            "default_prompt": runtime.generate([[2, 100, 200]], 32).tokens[0]}


@pytest.mark.slow
def test_build_layout_and_rebuild(capi, tmp_path):
    import ctypes

    from click.testing import CliRunner

    from skipdeploy import __version__
    from skipdeploy.cli import main

    lib, include = capi / "lib" / "libskipdeploy.so", capi / "include" / "skipdeploy.h"
    assert include.read_text() == header.header(__version__)  # the shipped header is the table's
    pc = (capi / "lib" / "pkgconfig" / "skipdeploy.pc").read_text()
    assert f"prefix={capi}" in pc and "-Wl,-rpath,${libdir}" in pc and "-lskipdeploy" in pc
    dynamic = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout \
        if shutil.which("readelf") else ""
    if dynamic:
        import sysconfig

        assert "libpython" in dynamic and sysconfig.get_config_var("LIBDIR") in dynamic
    names = {f.name for f in functions.FUNCTIONS}
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout \
        if shutil.which("nm") else ""
    if exported:  # the table's functions, and nothing else
        assert {line.split()[-1] for line in exported.splitlines()} == names
    loaded = ctypes.CDLL(str(lib))
    assert all(hasattr(loaded, name) for name in names)
    assert not hasattr(loaded, "_sdpy_generate") and not hasattr(loaded, "PyInit__skipdeploy_capi")
    # the header stands alone, in C and C++
    for compiler, language in (("cc", "c"), ("c++", "c++")):
        if shutil.which(compiler):
            subprocess.run([compiler, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-x", language, str(include)],
                           check=True)
    result = CliRunner().invoke(main, ["capi", "--out", str(capi)])
    assert result.exit_code == 1 and "pass --force" in result.output


TABLE_ARGS = {"rt": "(sd_runtime *)0x7777", "path": '"/nonexistent/export"', "text": '"x"', "json": "NULL",
              "ids": "ids", "len": "1", "callback": "on_token", "user": "NULL", "handle_out": "&handle",
              "ids_out": "id_buf", "text_out": "text_buf", "out_len": "&n"}


def _table_program() -> str:
    """A C program that calls every function of the table that runs Python once, with a made-up
    handle (sd_load: a missing export), and prints its status and message."""
    calls = []
    for f in functions.FUNCTIONS:
        if f.method is None:
            continue
        args = []
        for i, p in enumerate(f.params):
            args.append(f"sizeof {args[-1]} / sizeof {args[-1]}[0]" if p.role == "capacity" else TABLE_ARGS[p.role])
        call = f"{f.name}({', '.join(args)})"
        if f.returns == "void":
            calls.append(f'    {call};\n    printf("{f.name}\\t-\\t%s\\n", sd_last_error());')
        else:
            calls.append(f'    s = {call};\n    printf("{f.name}\\t%s\\t%s\\n", sd_status_name(s), sd_last_error());')
    return ("#include <stdio.h>\n#include <skipdeploy.h>\n\n"
            "static int on_token(int64_t t, void *u) { (void)t; (void)u; return 1; }\n\n"
            "int main(void)\n{\n    sd_runtime *handle = NULL;\n    int64_t ids[1] = {2}, id_buf[8];\n"
            "    char text_buf[64];\n    size_t n = 0;\n    sd_status s;\n"
            "    (void)handle; (void)ids; (void)id_buf; (void)text_buf; (void)n;\n"
            + "\n".join(calls) + "\n    return 0;\n}\n")


@pytest.mark.slow
def test_every_function_of_the_table_reaches_its_python_binding(capi, tmp_path):
    """Each call gets its answer from the Bridge (a missing binding would say "the Python side
    did not run"), through the status the table's roles promise."""
    lines = run_empty_env(compile_c(capi, _table_program(), "table", tmp_path)).stdout.splitlines()
    rows = {name: (status, message) for name, status, message in (line.split("\t") for line in lines)}
    assert list(rows) == [f.name for f in functions.FUNCTIONS if f.method is not None]
    for name, (status, message) in rows.items():
        assert message.startswith(f"{name}: ") and "did not run" not in message, (name, message)
        if name == "sd_load":
            assert status == "SD_ERR_EXPORT"
        else:
            assert status in ("SD_ERR_INPUT", "-") and "not a live sd_runtime" in message, (name, message)


@pytest.mark.slow
def test_c_example_matches_python_under_env_i(capi, exports, python_tokens, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(EXAMPLES, work)
    subprocess.run(["make", "-s", f"PKG_CONFIG_PATH={capi}/lib/pkgconfig"], cwd=work, check=True,
                   env={"PATH": os.environ["PATH"]})
    export = exports["tiny"]
    out = run_empty_env(work / "generate", export, *PROMPT).stdout.splitlines()
    assert _ids(out[0]) == _ids(out[1]) == python_tokens["greedy"]
    # README's form: the ids as the CLI's --input-ids takes them
    out = run_empty_env(work / "generate", export, ",".join(map(str, PROMPT))).stdout.splitlines()
    assert _ids(out[0]) == python_tokens["greedy"]
    bad = subprocess.run([str(work / "generate"), str(export), "2,,3"], env={}, capture_output=True, text=True)
    assert bad.returncode == 2 and "not a token id" in bad.stderr
    out = run_empty_env(work / "generate", export, "--params", json.dumps({**SCHEDULED, "max_new_tokens": 12}),
                        *PROMPT).stdout.splitlines()
    assert _ids(out[0]) == _ids(out[1]) == python_tokens["scheduled"]


@pytest.mark.slow
def test_cpp_wrapper_example_under_env_i(capi, exports, python_tokens, tmp_path):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler (c++)")
    work = tmp_path / "c"
    shutil.copytree(EXAMPLES, work)
    # generate (through the stream), generate_into (sd_generate), info and text.
    subprocess.run(["make", "-s", f"PKG_CONFIG_PATH={capi}/lib/pkgconfig"], cwd=work / "cpp", check=True,
                   env={"PATH": os.environ["PATH"]})
    out = run_empty_env(work / "cpp" / "example", exports["tiny"]).stdout.splitlines()
    assert _ids(out[0]) == _ids(out[1]) == python_tokens["default_prompt"]
    assert json.loads(out[2].split(":", 1)[1])["vocab_size"] == 512
    assert out[3].startswith('text: "')


ERRORS_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <skipdeploy.h>

static void show(const char *name, sd_status s)
{
    printf("%s\t%s\t%s\n", name, sd_status_name(s), sd_last_error());
}

static int stop_after_3(int64_t token, void *user) { (void)token; return ++*(int *)user >= 3; }

static volatile int hold = 1, holding = 0;
static int wait_in_callback(int64_t token, void *user)
{
    (void)token; (void)user;
    holding = 1;
    while (hold) usleep(1000);
    return 1;
}
static void *occupy(void *rt)
{
    sd_generate_stream((sd_runtime *)rt, (const int64_t[]){2, 5}, 2, "{\"max_new_tokens\": 50}",
                       wait_in_callback, NULL);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *good = argv[1], *damaged = argv[2];
    sd_runtime *rt = (sd_runtime *)1, *busy = NULL;
    int64_t prompt[] = {2, 45, 67}, oov[] = {2, 999999}, negative[] = {2, -1}, out[64];
    size_t n = 99;
    char text[2048];
    int count = 0;

    show("load_null_dir", sd_load(NULL, NULL, &rt));
    printf("load_null_dir_out\t%s\n", rt == NULL ? "NULL" : "set");
    show("load_null_out", sd_load(good, NULL, NULL));
    rt = (sd_runtime *)1;
    show("load_missing", sd_load("/nonexistent/export", NULL, &rt));
    printf("load_missing_out\t%s\n", rt == NULL ? "NULL" : "set");
    show("load_damaged", sd_load(damaged, NULL, &rt));
    show("load_bad_json", sd_load(good, "{\"threads\": ", &rt));
    show("load_not_object", sd_load(good, "[1]", &rt));
    show("load_unknown_key", sd_load(good, "{\"thread\": 1}", &rt));
    show("load_bad_value", sd_load(good, "{\"max_batch\": 0}", &rt));
    show("load_cuda", sd_load(good, "{\"device\": \"cuda\"}", &rt));
    show("load", sd_load(good, "{\"threads\": 1, \"max_batch\": 2}", &rt));

    show("generate_null_rt", sd_generate(NULL, prompt, 3, NULL, out, 64, &n));
    show("generate_null_prompt", sd_generate(rt, NULL, 3, NULL, out, 64, &n));
    show("generate_null_out", sd_generate(rt, prompt, 3, NULL, NULL, 64, &n));
    show("generate_null_out_len", sd_generate(rt, prompt, 3, NULL, out, 64, NULL));
    show("generate_empty", sd_generate(rt, prompt, 0, NULL, out, 64, &n));
    show("generate_oov", sd_generate(rt, oov, 2, NULL, out, 64, &n));
    show("generate_negative", sd_generate(rt, negative, 2, NULL, out, 64, &n));
    show("generate_bad_json", sd_generate(rt, prompt, 3, "{max_new_tokens: 2}", out, 64, &n));
    show("generate_unknown_key", sd_generate(rt, prompt, 3, "{\"temprature\": 1}", out, 64, &n));
    show("generate_bad_schedule", sd_generate(rt, prompt, 3, "{\"max_layers\": 9}", out, 64, &n));
    show("generate_bad_knob", sd_generate(rt, prompt, 3, "{\"top_p\": 2}", out, 64, &n));
    show("generate_too_long", sd_generate(rt, prompt, 3, "{\"max_new_tokens\": 500}", out, 64, &n));
    show("generate_small_buffer", sd_generate(rt, prompt, 3, "{\"max_new_tokens\": 5, \"ignore_eos\": true}",
                                             out, 2, &n));
    printf("generate_small_buffer_len\t%zu\n", n);
    show("generate_size_query", sd_generate(rt, prompt, 3, "{\"max_new_tokens\": 4, \"ignore_eos\": true}",
                                           NULL, 0, &n));
    printf("generate_size_query_len\t%zu\n", n);
    show("generate", sd_generate(rt, prompt, 3, "{\"max_new_tokens\": 4, \"ignore_eos\": true}", out, 64, &n));
    printf("generate_len\t%zu\n", n);

    show("stream_null_fn", sd_generate_stream(rt, prompt, 3, NULL, NULL, NULL));
    show("stream_oov", sd_generate_stream(rt, oov, 2, NULL, stop_after_3, &count));
    show("stream_stop", sd_generate_stream(rt, prompt, 3, "{\"max_new_tokens\": 20, \"ignore_eos\": true}",
                                           stop_after_3, &count));
    printf("stream_stop_count\t%d\n", count);

    show("text_null_prompt", sd_generate_text(rt, NULL, NULL, text, sizeof text, &n));
    show("text_empty", sd_generate_text(rt, "", NULL, text, sizeof text, &n));
    show("text_bad_utf8", sd_generate_text(rt, "\xff\xfe", NULL, text, sizeof text, &n));
    show("text_small_buffer", sd_generate_text(rt, "def greet", "{\"max_new_tokens\": 6, \"ignore_eos\": true}",
                                               text, 4, &n));
    printf("text_small_buffer_len\t%zu\t%zu\n", n, strlen(text));
    show("text", sd_generate_text(rt, "def greet", "{\"max_new_tokens\": 6, \"ignore_eos\": true}",
                                  text, sizeof text, &n));
    printf("text_len\t%zu\t%zu\n", n, strlen(text));

    show("tokenize_null", sd_tokenize(rt, NULL, out, 64, &n));
    show("tokenize", sd_tokenize(rt, "for i in", out, 64, &n));
    show("detokenize_oov", sd_detokenize(rt, oov, 2, text, sizeof text, &n));
    show("info_small_buffer", sd_runtime_info(rt, text, 8, &n));
    show("info", sd_runtime_info(rt, text, sizeof text, &n));

    /* one slot, no queue: a second request while the first holds the slot is refused */
    show("load_one_slot", sd_load(good, "{\"threads\": 1, \"max_batch\": 1, \"max_queue\": 0}", &busy));
    pthread_t thread;
    pthread_create(&thread, NULL, occupy, busy);
    while (!holding) usleep(1000);
    show("generate_queue_full", sd_generate(busy, prompt, 3, NULL, out, 64, &n));
    hold = 0;
    pthread_join(thread, NULL);
    sd_free(busy);

    sd_free(rt);
    show("generate_after_free", sd_generate(rt, prompt, 3, NULL, out, 64, &n));
    sd_free(NULL);
    show("free_null", SD_OK);
    printf("version\t%s\n", sd_version());
    return 0;
}
"""

EXPECTED = {
    "load_null_dir": "SD_ERR_INPUT", "load_null_out": "SD_ERR_INPUT", "load_missing": "SD_ERR_EXPORT",
    "load_damaged": "SD_ERR_EXPORT", "load_bad_json": "SD_ERR_INPUT", "load_not_object": "SD_ERR_INPUT",
    "load_unknown_key": "SD_ERR_INPUT", "load_bad_value": "SD_ERR_INPUT", "load_cuda": "SD_ERR_EXPORT",
    "load": "SD_OK",
    "generate_null_rt": "SD_ERR_INPUT", "generate_null_prompt": "SD_ERR_INPUT", "generate_null_out": "SD_ERR_INPUT",
    "generate_null_out_len": "SD_ERR_INPUT", "generate_empty": "SD_ERR_INPUT", "generate_oov": "SD_ERR_INPUT",
    "generate_negative": "SD_ERR_INPUT", "generate_bad_json": "SD_ERR_INPUT",
    "generate_unknown_key": "SD_ERR_INPUT", "generate_bad_schedule": "SD_ERR_INPUT",
    "generate_bad_knob": "SD_ERR_INPUT", "generate_too_long": "SD_ERR_CAPACITY",
    "generate_small_buffer": "SD_ERR_BUFFER", "generate_size_query": "SD_ERR_BUFFER", "generate": "SD_OK",
    "stream_null_fn": "SD_ERR_INPUT", "stream_oov": "SD_ERR_INPUT", "stream_stop": "SD_OK",
    "text_null_prompt": "SD_ERR_INPUT", "text_empty": "SD_ERR_INPUT", "text_bad_utf8": "SD_ERR_INPUT",
    "text_small_buffer": "SD_ERR_BUFFER", "text": "SD_OK",
    "tokenize_null": "SD_ERR_INPUT", "tokenize": "SD_OK", "detokenize_oov": "SD_ERR_INPUT",
    "info_small_buffer": "SD_ERR_BUFFER", "info": "SD_OK",
    "load_one_slot": "SD_OK", "generate_queue_full": "SD_ERR_CAPACITY",
    "generate_after_free": "SD_ERR_INPUT", "free_null": "SD_OK",
}


@pytest.mark.slow
def test_errors_are_statuses_with_one_line_messages(capi, exports, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(exports["tiny"], damaged)
    with open(damaged / "layer_01.onnx", "r+b") as f:  # same size, different bytes: the sha256 check fails
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    binary = compile_c(capi, ERRORS_C, "errors", tmp_path)
    lines = run_empty_env(binary, exports["tiny"], damaged).stdout.splitlines()
    rows = {}
    for line in lines:
        name, *rest = line.split("\t")
        rows[name] = rest
    for name, status in EXPECTED.items():
        got, message = rows[name][0], rows[name][1]
        assert got == status, f"{name}: {got} ({message}), expected {status}"
        assert bool(message) == (status != "SD_OK"), f"{name}: message {message!r}"
    assert len(lines) == len(rows), "a message took more than one line"
    assert rows["load_null_dir_out"] == ["NULL"] and rows["load_missing_out"] == ["NULL"]
    assert "sha256" in rows["load_damaged"][1] or "damaged" in rows["load_damaged"][1] \
        or "checksum" in rows["load_damaged"][1], rows["load_damaged"]
    assert "not valid JSON" in rows["load_bad_json"][1] and "unknown key" in rows["generate_unknown_key"][1]
    assert "vocabulary" in rows["generate_oov"][1] and "empty" in rows["generate_empty"][1]
    assert rows["generate_small_buffer_len"] == ["5"] and rows["generate_size_query_len"] == ["4"]
    assert rows["generate_len"] == ["4"] and rows["stream_stop_count"] == ["3"]
    needed, prefix = map(int, rows["text_small_buffer_len"])
    assert prefix <= 3 and [needed, needed] == list(map(int, rows["text_len"]))
    assert "not a live sd_runtime" in rows["generate_after_free"][1]
    assert rows["version"] == [__import__("skipdeploy").__version__]


INIT_FAIL_C = r"""
#include <stdio.h>
#include <skipdeploy.h>

int main(void)
{
    sd_runtime *rt = (sd_runtime *)1;
    int64_t prompt[] = {2, 3}, out[4];
    size_t n;
    sd_status s = sd_load("/anything", NULL, &rt);
    printf("%s\t%s\t%s\n", sd_status_name(s), rt == NULL ? "NULL" : "set", sd_last_error());
    s = sd_generate((sd_runtime *)1, prompt, 2, NULL, out, 4, &n);
    printf("%s\t%s\n", sd_status_name(s), sd_last_error());
    return 0;
}
"""


@pytest.mark.slow
def test_a_failed_interpreter_start_is_never_sd_ok(tmp_path, monkeypatch):
    """cffi returns 0 (SD_OK) from every call when its init code fails: the wrappers must not."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    import skipdeploy.capi.build as build_module

    monkeypatch.setattr(build_module, "INIT_CODE", build_module.INIT_CODE.replace(
        "    from skipdeploy.capi import bridge", "    raise ImportError('simulated: no skipdeploy here')"))
    prefix = build_module.build(tmp_path / "broken").library.parent.parent
    lines = run_empty_env(compile_c(prefix, INIT_FAIL_C, "initfail", tmp_path)).stdout.splitlines()
    assert lines[0].split("\t")[:2] == ["SD_ERR_INTERNAL", "NULL"]
    assert "simulated: no skipdeploy here" in lines[0] and "failed to start" in lines[0]
    assert lines[1].startswith("SD_ERR_INTERNAL\t") and "simulated" in lines[1]


THREADS_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <skipdeploy.h>

#define THREADS 4
#define ROUNDS 3
static sd_runtime *rt;
static const int64_t prompts[THREADS][4] = {{2, 45, 67, 89}, {2, 300}, {2, 11, 12, 13}, {2, 7, 8}};
static const size_t lengths[THREADS] = {4, 2, 4, 3};
static const char *params[THREADS] = {
    "{\"max_new_tokens\": 12}",
    "{\"max_new_tokens\": 12, \"max_layers\": 3, \"min_layers\": 1, \"decay_tokens\": 4}",
    "{\"max_new_tokens\": 9, \"target_speedup\": 2}",
    "{\"max_new_tokens\": 12, \"temperature\": 0.8, \"seed\": 5}"};
static int64_t got[ROUNDS][THREADS][16];
static size_t got_len[ROUNDS][THREADS];
static sd_status got_status[ROUNDS][THREADS];
static int round_now;

static void *worker(void *arg)
{
    int i = (int)(long)arg;
    got_status[round_now][i] = sd_generate(rt, prompts[i], lengths[i], params[i], got[round_now][i], 16,
                                           &got_len[round_now][i]);
    return NULL;
}

static char own_error[THREADS][128];
static void *failing_worker(void *arg)  /* sd_last_error is per thread: each sees its own message */
{
    int i = (int)(long)arg;
    char key[16], params[64];
    int64_t out[4];
    size_t n;
    snprintf(key, sizeof key, "bogus_%d", i);  /* quoted or not: the door's choice */
    snprintf(params, sizeof params, "{\"bogus_%d\": 1}", i);
    for (int k = 0; k < 50; k++) {
        sd_generate(rt, prompts[i], lengths[i], params, out, 4, &n);
        snprintf(own_error[i], sizeof own_error[i], "%s", sd_last_error());
        if (strstr(own_error[i], key) == NULL || strstr(own_error[i], "unknown key") == NULL)
            return NULL;
    }
    snprintf(own_error[i], sizeof own_error[i], "ok");
    return NULL;
}

static const char *export_dir;
static sd_status first_status[THREADS];
static void *first_call(void *arg)  /* the library's first calls, all at once: one starts Python */
{
    int i = (int)(long)arg;
    sd_runtime *own = NULL;
    first_status[i] = sd_load(export_dir, "{\"threads\": 1, \"max_batch\": 1}", &own);
    sd_free(own);
    return NULL;
}

static void print(const char *tag, int i, const int64_t *ids, size_t n)
{
    printf("%s %d:", tag, i);
    for (size_t k = 0; k < n; k++) printf("%s%lld", k ? "," : "", (long long)ids[k]);
    printf("\n");
}

int main(int argc, char **argv)
{
    (void)argc;
    export_dir = argv[1];
    pthread_t first[THREADS];
    for (long i = 0; i < THREADS; i++) pthread_create(&first[i], NULL, first_call, (void *)i);
    for (int i = 0; i < THREADS; i++) pthread_join(first[i], NULL);
    for (int i = 0; i < THREADS; i++) printf("first %d: %s\n", i, sd_status_name(first_status[i]));
    if (sd_load(argv[1], "{\"threads\": 1, \"max_batch\": 4}", &rt) != SD_OK) {
        printf("load failed: %s\n", sd_last_error());
        return 1;
    }
    for (int i = 0; i < THREADS; i++) {  /* one after another */
        int64_t ids[16];
        size_t n = 0;
        sd_status s = sd_generate(rt, prompts[i], lengths[i], params[i], ids, 16, &n);
        if (s != SD_OK) { printf("sequential %d failed: %s\n", i, sd_last_error()); return 1; }
        print("seq", i, ids, n);
    }
    for (round_now = 0; round_now < ROUNDS; round_now++) {  /* all at once */
        pthread_t threads[THREADS];
        for (long i = 0; i < THREADS; i++) pthread_create(&threads[i], NULL, worker, (void *)i);
        for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
        for (int i = 0; i < THREADS; i++) {
            if (got_status[round_now][i] != SD_OK) { printf("parallel %d failed\n", i); return 1; }
            print("par", i, got[round_now][i], got_len[round_now][i]);
        }
    }
    pthread_t threads[THREADS];
    for (long i = 0; i < THREADS; i++) pthread_create(&threads[i], NULL, failing_worker, (void *)i);
    for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < THREADS; i++) printf("err %d: %s\n", i, own_error[i]);
    sd_free(rt);
    return 0;
}
"""


@pytest.mark.slow
def test_four_threads_get_what_sequential_calls_get(capi, exports, tmp_path):
    import skipdeploy

    lines = run_empty_env(compile_c(capi, THREADS_C, "threads", tmp_path), exports["tiny"]).stdout.splitlines()
    seq = {int(line.split()[1].split(":")[0]): _ids(line) for line in lines if line.startswith("seq")}
    par = [(int(line.split()[1].split(":")[0]), _ids(line)) for line in lines if line.startswith("par")]
    assert len(seq) == 4 and len(par) == 12
    assert [line for line in lines if line.startswith("first")] == [f"first {i}: SD_OK" for i in range(4)]
    assert [line for line in lines if line.startswith("err")] == [f"err {i}: ok" for i in range(4)]
    for i, ids in par:
        assert ids == seq[i], f"thread {i}: {ids} != {seq[i]}"
    runtime = skipdeploy.load(exports["tiny"])
    assert seq[0] == runtime.generate([[2, 45, 67, 89]], 12).tokens[0]
    assert seq[1] == runtime.generate([[2, 300]], 12, Schedule(4, 3, 1, 4)).tokens[0]
    assert seq[3] == runtime.generate([[2, 7, 8]], 12, temperature=0.8, seed=5).tokens[0]


MEMORY_C = r"""
#include <stdio.h>
#include <string.h>
#include <skipdeploy.h>

static long rss_kb(void)
{
    char line[256];
    long kb = -1;
    FILE *f = fopen("/proc/self/status", "r");
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) sscanf(line + 6, "%ld", &kb);
    if (f) fclose(f);
    return kb;
}

static int count(int64_t token, void *user) { (void)token; ++*(int *)user; return 0; }

static int round_of_calls(sd_runtime *rt, int calls)
{
    int64_t prompt[] = {2, 45, 67}, out[8];
    size_t n;
    char text[256];
    int tokens = 0;
    for (int i = 0; i < calls; i++) {
        if (sd_generate(rt, prompt, 3, "{\"max_new_tokens\": 2, \"ignore_eos\": true}", out, 8, &n) != SD_OK
                || n != 2) {
            printf("call %d failed: %s\n", i, sd_last_error());
            return 1;
        }
        if (i % 10 == 0) {  /* the other paths too: errors, streams, text */
            sd_generate(rt, prompt, 3, "{bad", out, 8, &n);
            sd_generate_stream(rt, prompt, 3, "{\"max_new_tokens\": 2}", count, &tokens);
            sd_generate_text(rt, "def f", "{\"max_new_tokens\": 2}", text, sizeof text, &n);
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    (void)argc;
    sd_runtime *rt;
    if (sd_load(argv[1], "{\"threads\": 1}", &rt) != SD_OK) {
        printf("load failed: %s\n", sd_last_error());
        return 1;
    }
    if (round_of_calls(rt, 200)) return 1;  /* warm-up: caches, allocator pools */
    long before = rss_kb();
    if (round_of_calls(rt, 1000)) return 1;
    long after = rss_kb();
    printf("rss_kb %ld %ld\n", before, after);
    sd_free(rt);
    return 0;
}
"""


@pytest.mark.slow
def test_a_thousand_calls_do_not_grow_memory(capi, exports, tmp_path):
    out = run_empty_env(compile_c(capi, MEMORY_C, "memory", tmp_path), exports["tiny"], timeout=180).stdout
    before, after = map(int, re.search(r"rss_kb (\d+) (\d+)", out).groups())
    assert after - before < 5 * 1024, f"VmRSS grew by {after - before} kB over 1000 calls"


@pytest.mark.slow
def test_overhead_benchmark_runs(capi, exports):
    """The benchmark of docs/c-api.md, briefly (no timing assertion: the machine may be busy)."""
    from skipdeploy.capi.overhead import measure

    result = measure(exports["tiny"], calls=4, tokens=4, block=2, lib_dir=capi)
    for key in ("processes", "one_process"):
        assert result[key]["c_median_ms"] > 0 and result[key]["python_median_ms"] > 0
    assert result["fixed_us"]["c"] > 0
    print(json.dumps(result), file=sys.stderr)


HOSTED_PY = r"""
import ctypes, sys
import torch  # noqa: F401  (gives PyCapsule_Type a version tag, which cffi's start-up lock cannot take)
lib = ctypes.CDLL(sys.argv[1])
lib.sd_last_error.restype = ctypes.c_char_p
rt = ctypes.c_void_p()
status = lib.sd_load(sys.argv[2].encode(), b'{"threads": 1}', ctypes.byref(rt))
print(status, lib.sd_last_error().decode())
lib.sd_free(rt)
"""


@pytest.mark.slow
def test_loaded_into_a_python_process_it_answers_instead_of_hanging(capi, exports):
    """cffi's start-up spins forever in a Python host whose capsule type has a version tag
    (Python < 3.12): the library must refuse instead, or work."""
    result = subprocess.run([sys.executable, "-c", HOSTED_PY, str(capi / "lib" / "libskipdeploy.so"),
                             str(exports["tiny"])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    status, _, message = result.stdout.strip().partition(" ")
    assert status == "0" or (status == "5" and "already runs Python" in message), result.stdout
