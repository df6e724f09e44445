"""``skipdeploy triton``: the model repository, and the real tritonserver serving it.

The server tests start the ``tritonserver`` of the nvidia-pytriton wheel on free local ports (one
server for the module, two repositories: the tiny export by path, and the post-LN export copied
in with a default schedule), talk to it with tritonclient (HTTP and gRPC streaming) and plain HTTP
(the generate endpoints), compare every output with ``Runtime.generate`` of the request alone,
and stop it by its pid (SIGTERM, clean exit). They are skipped, saying why, where the server is
not installed (``pip install --no-deps nvidia-pytriton; python -m skipdeploy.triton.server --setup``).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from skipdeploy.request_params import schedule_from_options
from skipdeploy.runtime.text import CompletionText
from skipdeploy.triton.parameters import RequestError, parse_sampling_parameters
from skipdeploy.triton.repository import config_pbtxt, default_model_name


def run_triton(*args):
    """``skipdeploy triton ...`` in this process, through a group like the CLI's own (one-line errors)."""
    from click.testing import CliRunner

    import skipdeploy.cli as cli
    from skipdeploy.cli.triton import command

    group = type(cli.main)()
    group.add_command(command)
    return CliRunner().invoke(group, ["triton", *map(str, args)], catch_exceptions=False)


# -- without a server -------------------------------------------------------------------------------
def test_sampling_parameters_follow_vllm_and_refuse_in_one_line():
    p = parse_sampling_parameters(None)
    assert (p.max_new_tokens, p.temperature, p.schedule) == (16, 1.0, None)  # vLLM's defaults
    p = parse_sampling_parameters(b'{"max_tokens": "8", "temperature": "0", "top_k": -1, "top_p": 0.9, "seed": 3,'
                                  b' "stop": "\\n", "stop_token_ids": [7], "ignore_eos": "true",'
                                  b' "skipdecode": {"target_speedup": 1.5}}')
    assert p.max_new_tokens == 8 and p.schedule == {"target_speedup": 1.5}
    assert p.knobs() == {"temperature": 0.0, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.0, "seed": 3,
                         "stop_strings": ("\n",), "stop_token_ids": (7,), "eos_token_id": None}
    for bad, message in [("{bad", "not valid JSON"), ("[1]", "must be a JSON object"),
                         ('{"foo": 1}', "unknown key(s) foo in sampling_parameters"),
                         ('{"temperature": "hot"}', "sampling_parameters.temperature must be a number"),
                         ('{"max_tokens": 0}', "sampling_parameters.max_tokens must be an integer in [1,"),
                         ('{"max_tokens": 2.5}', "max_tokens must be an integer"),
                         ('{"stop": [""]}', "sampling_parameters.stop must be"),
                         ('{"skipdecode": {"speed": 2}}', "unknown key(s) speed in sampling_parameters.skipdecode"),
                         ('{"skipdecode": {"full": 1}}', "skipdecode.full must be true or false")]:
        with pytest.raises(RequestError, match=None) as info:
            parse_sampling_parameters(bad)
        assert message in str(info.value) and "\n" not in str(info.value), bad


def test_text_stream_holds_back_stop_prefixes_and_joins_to_the_text():
    pieces = {1: "ab", 2: "c\n", 3: "\nd"}
    stream = CompletionText(lambda ids: "".join(pieces[i] for i in ids), stop=("\n\n",))
    sent = [stream.extend([1]), stream.extend([2]), stream.extend([3]) + stream.rest()]
    assert sent == ["ab", "c", ""] and "".join(sent) == stream.text() == "abc"


def test_config_and_repository_layout(exports, tmp_path):
    text = config_pbtxt("m", 2)
    assert 'backend: "python"' in text and "decoupled: true" in text and "count: 2" in text
    for name in ("text_input", "input_ids", "stream", "sampling_parameters", "exclude_input_in_output",
                 "text_output", "output_ids"):
        assert f'name: "{name}"' in text
    assert default_model_name(exports["tiny"]) == "tiny"

    repo = tmp_path / "repo"
    repo.mkdir()  # an empty directory is taken as is
    out = run_triton(exports["tiny"], "--out", repo, "--model-name", "m", "--max-batch", "4", "--instances", "2",
                     "--max-layers", "3", "--min-layers", "1")
    assert out.exit_code == 0, out.output
    config = json.loads((repo / "m" / "1" / "skipdeploy.json").read_text())
    assert config["export"] == str(exports["tiny"].resolve()) and config["engine"]["max_batch"] == 4
    assert config["schedule"]["max_layers"] == 3 and config["schedule"]["min_layers"] == 1
    assert (repo / "m" / "1" / "model.py").read_text().startswith('"""A skipdeploy export as a Triton')
    assert "count: 2" in (repo / "m" / "config.pbtxt").read_text()

    again = run_triton(exports["tiny"], "--out", repo, "--model-name", "m")
    assert again.exit_code == 1 and "m already exists; pass --force" in again.output
    assert len(again.output.strip().splitlines()) == 1 and (repo / "m").is_dir()
    # A second model joins the repository; --force replaces one model's directory, not the others.
    second = run_triton(exports["tiny"], "--out", repo, "--model-name", "n", "--copy-export")
    assert second.exit_code == 0, second.output
    forced = run_triton(exports["tiny"], "--out", repo, "--model-name", "m", "--max-batch", "2", "--force")
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in repo.iterdir()) == ["m", "n"]  # no staging or lock left inside
    assert json.loads((repo / "m" / "1" / "skipdeploy.json").read_text())["engine"]["max_batch"] == 2
    assert json.loads((repo / "n" / "1" / "skipdeploy.json").read_text())["export"] == "export"
    assert (repo / "n" / "1" / "export" / "manifest.json").is_file()
    assert not list(tmp_path.glob(".repo.*"))  # nor beside it

    bad = run_triton(exports["tiny"], "--out", tmp_path / "other", "--model-name", "a/b")
    assert bad.exit_code == 1 and "model name" in bad.output and not (tmp_path / "other").exists()


def test_engine_options_the_server_would_refuse_are_refused_when_writing(exports, tmp_path):
    from skipdeploy.manifest import read_manifest

    limit = read_manifest(exports["tiny"], verify=False).max_length
    cases = [(["--max-length", limit + 1], f"max_length must be an integer in [2, {limit}]"),
             (["--threads", 100000], "threads must be an integer in [1, 1024]"),
             (["--instances", 10**6], "instances must be an integer in [1, 1024]"),
             (["--max-batch", 10**12], "of KV cache and this machine has"),
             (["--max-batch", 2**40, "--max-length", 2], "of KV cache and this machine has"),
             (["--instances", 1000, "--max-batch", 10**6], "1000 instance(s)")]
    for args, message in cases:
        out = run_triton(exports["tiny"], "--out", tmp_path / "repo", "--model-name", "m", *args)
        assert out.exit_code == 1 and message in out.output, (args, out.output)
        assert len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output
        assert not (tmp_path / "repo").exists()
    ok = run_triton(exports["tiny"], "--out", tmp_path / "repo", "--max-length", limit, "--threads", 1)
    assert ok.exit_code == 0, ok.output


# -- the real server --------------------------------------------------------------------------------
def _server_or_skip():
    from skipdeploy.errors import BackendError
    from skipdeploy.triton import server

    try:
        server.find_tritonserver()
        server.stub_python()
    except BackendError as exc:
        pytest.skip(f"no usable tritonserver: {exc}")
    return server


@pytest.fixture(scope="module")
def triton(exports, tmp_path_factory):
    """One server, one repository of two models: ``tiny`` (by path, 8 slots) and ``postln`` (the
    post-LN export copied in, a 3-to-1-layer default schedule), added to the same repository."""
    server_mod = _server_or_skip()
    root = tmp_path_factory.mktemp("triton")
    first = run_triton(exports["tiny"], "--out", root / "repo", "--model-name", "tiny", "--max-batch", "8",
                       "--max-queue", "8")
    assert first.exit_code == 0, first.output
    second = run_triton(exports["tiny-post-ln"], "--out", root / "repo", "--model-name", "postln", "--copy-export",
                        "--max-layers", "3", "--min-layers", "1", "--decay-tokens", "6", "--threads", "1")
    assert second.exit_code == 0, second.output
    server = server_mod.TritonServer(root / "repo", workdir=root / "server")
    server.start()
    try:
        server.wait_ready(120)
    except Exception:
        server.stop()
        raise
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop()


def post(server, model, endpoint, body, timeout=60):
    """(status, parsed body or SSE events) of POST /v2/models/MODEL/ENDPOINT."""
    data = {k: (json.dumps(v) if k == "sampling_parameters" else v) for k, v in body.items()}
    request = urllib.request.Request(f"{server.http_url}/v2/models/{model}/{endpoint}", data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        return exc.code, json.loads(text[len("data: "):] if text.startswith("data: ") else text)
    if endpoint == "generate_stream":
        return status, [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    return status, json.loads(text)


def as_list(value) -> list:
    """The generate endpoint gives a one-element tensor as a scalar."""
    return value if isinstance(value, list) else [value]


def metrics(server) -> dict:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines
            if line.startswith("skipdeploy_")}


def metric(server, name, model="tiny", **labels) -> float:
    """The value of one skipdeploy_* series (summed over the model's instances)."""
    want = {"model": model, "version": "1", **labels}
    total = 0.0
    for key, value in metrics(server).items():
        series, _, rest = key.partition("{")
        found = dict(item.split("=", 1) for item in rest.rstrip("}").split(",")) if rest else {}
        if series == name and {k: v.strip('"') for k, v in found.items() if k != "instance"} == want:
            total += value
    return total


def reference(runtime, ids, max_tokens, knobs, skipdecode=None):
    schedule = None
    if skipdecode:
        schedule = schedule_from_options(skipdecode, runtime.spec.num_layers, runtime.manifest.schedule,
                                         max_tokens - 1)
    knobs = {("stop_strings" if k == "stop" else k): v for k, v in knobs.items()}
    return runtime.generate([ids], max_tokens, schedule, **knobs).tokens[0]


GREEDY = {"temperature": 0}
SEEDED = {"temperature": 0.8, "top_p": 0.9, "seed": 11}


@pytest.mark.slow
@pytest.mark.parametrize("knobs", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_generate_equals_the_runtime_alone(triton, runtimes, knobs):
    runtime = runtimes[("tiny", "onnxruntime")]
    ids = [2, 45, 67, 89, 101, 7]
    want = reference(runtime, ids, 12, knobs)
    status, body = post(triton, "tiny", "generate", {"input_ids": ids, "exclude_input_in_output": True,
                                                     "sampling_parameters": {"max_tokens": 12, **knobs}})
    assert status == 200 and body["output_ids"] == want
    # Not excluded: the input comes first (as in the vLLM backend), ids and text alike.
    status, body = post(triton, "tiny", "generate", {"input_ids": ids, "sampling_parameters": {"max_tokens": 12, **knobs}})
    assert body["output_ids"] == ids + want
    prompt = "def fib(n):"
    want = reference(runtime, runtime.tokenizer.encode(prompt), 10, knobs)
    status, body = post(triton, "tiny", "generate", {"text_input": prompt, "sampling_parameters": {"max_tokens": 10,
                                                                                                  **knobs}})
    assert status == 200 and body["text_output"] == prompt + runtime.tokenizer.decode(want)
    status, body = post(triton, "tiny", "generate", {"text_input": prompt, "exclude_input_in_output": True,
                                                     "sampling_parameters": {"max_tokens": 10, **knobs}})
    assert body["text_output"] == runtime.tokenizer.decode(want)


@pytest.mark.slow
def test_streamed_deltas_join_to_the_whole_output(triton, runtimes):
    runtime = runtimes[("tiny", "onnxruntime")]
    prompt, params = "for i in range(", {"max_tokens": 14, **SEEDED}
    whole = runtime.tokenizer.decode(reference(runtime, runtime.tokenizer.encode(prompt), 14, SEEDED))
    status, events = post(triton, "tiny", "generate_stream", {"text_input": prompt, "stream": True,
                                                              "sampling_parameters": params})
    assert status == 200 and all(isinstance(e["text_output"], str) for e in events)
    assert "".join(e["text_output"] for e in events) == whole
    status, body = post(triton, "tiny", "generate", {"text_input": prompt, "exclude_input_in_output": True,
                                                     "sampling_parameters": params})
    assert body["text_output"] == whole
    ids = [2, 300, 301]
    status, events = post(triton, "tiny", "generate_stream", {"input_ids": ids, "stream": True,
                                                              "sampling_parameters": {"max_tokens": 9, **GREEDY}})
    want = reference(runtime, ids, 9, GREEDY)
    assert status == 200 and sum((as_list(e["output_ids"]) for e in events), []) == want
    # One event per token, however far the model's responses lag behind the engine; the last event
    # may be an empty final one (when the last token went out before the request was seen done).
    assert [len(as_list(e["output_ids"])) for e in events] in ([1] * len(want), [1] * len(want) + [0])
    # A stop string ends the text before it, streamed or not.
    text = runtime.tokenizer.decode(reference(runtime, runtime.tokenizer.encode(prompt), 14, SEEDED))
    stop = text[3:5]
    params = {"max_tokens": 14, "stop": stop, **SEEDED}
    status, events = post(triton, "tiny", "generate_stream", {"text_input": prompt, "stream": True,
                                                              "sampling_parameters": params})
    assert "".join(e["text_output"] for e in events) == text[:text.find(stop)]
    # Streaming with the input in the output is refused, as in the vLLM backend.
    status, body = post(triton, "tiny", "generate_stream", {"text_input": prompt, "stream": True,
                                                            "exclude_input_in_output": False})
    assert status == 400 and "exclude_input_in_output" in body["error"]


@pytest.mark.slow
def test_tritonclient_http_and_grpc_streaming(triton, runtimes):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(f"{triton.host}:{triton.http_port}")
    assert http.is_server_ready() and http.is_model_ready("tiny") and http.is_model_ready("postln")
    assert {m["name"] for m in http.get_model_repository_index()} == {"tiny", "postln"}
    config = http.get_model_config("tiny")
    assert config["model_transaction_policy"]["decoupled"] is True
    assert {i["name"] for i in http.get_model_metadata("tiny")["inputs"]} >= {"text_input", "sampling_parameters"}

    runtime = runtimes[("tiny", "onnxruntime")]
    prompts = {"g0": ("hello world", GREEDY), "g1": ("import numpy as", SEEDED)}
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for request_id, (prompt, knobs) in prompts.items():
            inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("stream", [1], "BOOL"),
                      grpcclient.InferInput("sampling_parameters", [1], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
            inputs[1].set_data_from_numpy(np.array([True]))
            inputs[2].set_data_from_numpy(np.array([json.dumps({"max_tokens": 11, **knobs}).encode()], dtype=np.object_))
            client.async_stream_infer("tiny", inputs, request_id=request_id, enable_empty_final_response=True)
        texts = {k: "" for k in prompts}
        finished = set()
        while finished != set(prompts):
            result, error = responses.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            output = result.as_numpy("text_output")
            if output is not None:
                texts[response.id] += b"".join(output.reshape(-1)).decode()
            if response.parameters["triton_final_response"].bool_param:
                finished.add(response.id)
    finally:
        client.stop_stream()
        client.close()
    for request_id, (prompt, knobs) in prompts.items():
        assert texts[request_id] == runtime.tokenizer.decode(reference(runtime, runtime.tokenizer.encode(prompt), 11,
                                                                       knobs)), request_id


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_each_equals_the_runtime_alone(triton, runtimes):
    runtime = runtimes[("tiny", "onnxruntime")]
    jobs = [([2, 10 + i, 20 + 2 * i, 7], [GREEDY, SEEDED][i % 2] | ({"seed": 100 + i} if i % 2 else {}),
             {"max_layers": 3, "min_layers": 1} if i % 3 == 0 else None) for i in range(8)]
    results: dict = {}
    long_ids = [2, 5, 6, 7]

    def run(i, ids, knobs, skipdecode, tokens):
        params = {"max_tokens": tokens, **knobs, **({"skipdecode": skipdecode} if skipdecode else {})}
        results[i] = post(triton, "tiny", "generate", {"input_ids": ids, "exclude_input_in_output": True,
                                                       "sampling_parameters": params})

    # A long request first; the others join it once its first token streamed back (so it runs).
    events: list = []
    opener = urllib.request.urlopen(urllib.request.Request(
        f"{triton.http_url}/v2/models/tiny/generate_stream", headers={"Content-Type": "application/json"},
        data=json.dumps({"input_ids": long_ids, "stream": True,
                         "sampling_parameters": json.dumps({"max_tokens": 100, **GREEDY})}).encode()), timeout=60)
    with opener as stream:
        line = stream.readline()
        while not line.startswith(b"data: "):
            line = stream.readline()
        events.append(json.loads(line[6:]))
        threads = [threading.Thread(target=run, args=(i, ids, knobs, sd, 40)) for i, (ids, knobs, sd) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        events += [json.loads(line[6:]) for line in stream.read().splitlines() if line.startswith(b"data: ")]
    assert sum((as_list(e["output_ids"]) for e in events), []) == reference(runtime, long_ids, 100, GREEDY)
    for i, (ids, knobs, skipdecode) in enumerate(jobs):
        status, body = results[i]
        assert status == 200 and body["output_ids"] == reference(runtime, ids, 40, knobs, skipdecode), i
    # Timing-free evidence of in-flight batching: the most requests one engine iteration advanced.
    assert metric(triton, "skipdeploy_batch_rows_peak") >= 2
    assert "batch rows peak" in triton.log()


@pytest.mark.slow
def test_copied_export_with_a_default_schedule(triton, runtimes):
    runtime = runtimes[("tiny-post-ln", "onnxruntime")]
    ids = [2, 11, 12, 13]
    default = schedule_from_options({"max_layers": 3, "min_layers": 1, "decay_tokens": 6}, runtime.spec.num_layers,
                                    runtime.manifest.schedule, None)
    want = runtime.generate([ids], 8, default, temperature=0).tokens[0]
    status, body = post(triton, "postln", "generate", {"input_ids": ids, "exclude_input_in_output": True,
                                                       "sampling_parameters": {"max_tokens": 8, **GREEDY}})
    assert status == 200 and body["output_ids"] == want
    # A request's skipdecode object replaces it: {"full": true} runs every layer.
    full = runtime.generate([ids], 8, None if runtime.manifest.schedule.is_full() else
                            schedule_from_options({"full": True}, runtime.spec.num_layers, None, 7), temperature=0)
    status, body = post(triton, "postln", "generate", {"input_ids": ids, "exclude_input_in_output": True,
                                                       "sampling_parameters": {"max_tokens": 8, "skipdecode": {"full": True},
                                                                               **GREEDY}})
    assert body["output_ids"] == full.tokens[0]


@pytest.mark.slow
def test_malformed_requests_are_refused_and_the_server_stays_ready(triton):
    cases = [({"text_input": "hi", "sampling_parameters": "{not json"}, "not valid JSON"),
             ({"text_input": "hi", "sampling_parameters": {"max_tokens": 4, "best_of": 2}},
              "unknown key(s) best_of in sampling_parameters"),
             ({"text_input": "hi", "sampling_parameters": {"temperature": -1}},
              "sampling_parameters.temperature must be a number >= 0"),
             ({"text_input": "hi", "sampling_parameters": {"skipdecode": {"max_layers": 99}}}, "skipdecode"),
             ({"text_input": "hi", "sampling_parameters": {"max_tokens": 1000}}, "positions"),
             ({"text_input": "hi", "input_ids": [2, 5]}, "exactly one of text_input"),
             ({"input_ids": [2, 10**9]}, "outside the vocabulary")]
    for body, message in cases:
        if body.get("sampling_parameters") == "{not json":
            request = urllib.request.Request(f"{triton.http_url}/v2/models/tiny/generate",
                                             data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=30)
            status, answer = info.value.code, json.loads(info.value.read().decode())
        else:
            status, answer = post(triton, "tiny", "generate", body)
        assert status == 400 and message in answer["error"] and "\n" not in answer["error"], (body, answer)
    assert triton.ready()
    status, body = post(triton, "tiny", "generate", {"input_ids": [2, 5], "sampling_parameters": {"max_tokens": 3}})
    assert status == 200 and len(body["output_ids"]) == 5
    assert "refused request" in triton.log() and metric(triton, "skipdeploy_requests_refused_total",
                                                        code="invalid_arg") >= len(cases)


@pytest.mark.slow
def test_cancelled_requests_leave_the_batch(triton):
    import tritonclient.grpc as grpcclient

    def inputs(ids, tokens):
        tensors = [grpcclient.InferInput("input_ids", [len(ids)], "INT64"), grpcclient.InferInput("stream", [1], "BOOL"),
                   grpcclient.InferInput("sampling_parameters", [1], "BYTES")]
        tensors[0].set_data_from_numpy(np.array(ids, dtype=np.int64))
        tensors[1].set_data_from_numpy(np.array([True]))
        tensors[2].set_data_from_numpy(np.array([json.dumps({"max_tokens": tokens, **GREEDY}).encode()],
                                                dtype=np.object_))
        return tensors

    def finished(*reasons) -> float:
        return sum(metric(triton, "skipdeploy_requests_finished_total", reason=r) for r in reasons)

    before = finished("cancelled")
    ended_before = finished("eos", "stop", "length", "error")
    got: queue.Queue = queue.Queue()
    busy = grpcclient.InferenceServerClient(triton.grpc_url)     # fills all 8 slots
    waiting = grpcclient.InferenceServerClient(triton.grpc_url)  # one more: it waits for a slot
    busy.start_stream(callback=lambda result, error: got.put(error))
    waiting.start_stream(callback=lambda result, error: None)
    try:
        for i in range(8):
            busy.async_stream_infer("tiny", inputs([2, 40 + i], 120), request_id=f"busy{i}")
        got.get(timeout=60)  # the batch runs
        waiting.async_stream_infer("tiny", inputs([2, 99], 120), request_id="waiting")
        time.sleep(0.01)
        waiting.stop_stream(cancel_requests=True)
        busy.stop_stream(cancel_requests=True)
    finally:
        busy.close()
        waiting.close()
    # Each of the 9 requests leaves the engine: cancelled, or (when a loaded machine lets 120 tiny
    # tokens outrun the cancel's trip through gRPC and the stub) finished; none may stay behind.
    deadline = time.monotonic() + 30
    while True:
        cancelled = finished("cancelled") - before
        accounted = cancelled + finished("eos", "stop", "length", "error") - ended_before
        if accounted >= 9 and metric(triton, "skipdeploy_requests_running") == 0 \
                and metric(triton, "skipdeploy_requests_waiting") == 0:
            break
        assert time.monotonic() < deadline, "cancelled requests still in the engine"
        time.sleep(0.05)
    assert (cancelled == 0 or "cancelled" in triton.log()) and triton.ready()


@pytest.mark.slow
def test_the_server_stops_cleanly(triton):
    assert triton.stop(timeout=60) == 0
    log = triton.log()
    assert "stopped;" in log and "successfully unloaded 'tiny'" in log

