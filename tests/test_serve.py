"""``skipdeploy serve``: the OpenAI-compatible server in a real process, driven by the official
``openai`` client (and urllib for raw HTTP). Outputs must equal ``Runtime.generate`` of each
request alone; errors must have OpenAI's body; SIGTERM must drain and exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import PROMPTS

openai = pytest.importorskip("openai", reason="the serve tests use the openai client (pip install 'skipdeploy[test]')")
pytest.importorskip("fastapi", reason="serve needs the serve extra (pip install 'skipdeploy[serve]')")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import skipdeploy  # noqa: E402
from skipdeploy.request_params import schedule_from_options  # noqa: E402
from skipdeploy.serving import openai_api as api  # noqa: E402
from skipdeploy.runtime.text import CompletionText  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny-sd"
SKIP = {"max_layers": 3, "min_layers": 1, "decay_tokens": 4}


# -- a server process ------------------------------------------------------------------------------
class Server:
    def __init__(self, export, *args, log_path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from skipdeploy.cli.serve import command; command()", str(export),
             "--port", str(self.port), "--log-level", "warning", *map(str, args)],
            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env={**os.environ, "SKIPDEPLOY_API_KEY": ""})
        deadline = time.monotonic() + 60
        while self.get("/health")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not become ready:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def call(self, method, path, body=None, headers=None, raw=None):
        """(status, headers, parsed JSON or text); never raises on an HTTP status."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, head, text = resp.status, resp.headers, resp.read().decode()
        except urllib.error.HTTPError as err:
            status, head, text = err.code, err.headers, err.read().decode()
        except (ConnectionError, urllib.error.URLError):
            return None, {}, None
        try:
            return status, head, json.loads(text)
        except ValueError:
            return status, head, text

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, body, key=KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.call("POST", "/v1/completions", body, headers=headers, **kw)

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        status, _, text = self.get("/metrics")
        assert status == 200
        return {name: float(value) for name, value in
                (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}

    def stop(self, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the server ignored SIGTERM for {timeout} s:\n{self.log()}")


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    srv = Server(exports["tiny"], "--api-key", KEY, "--model-name", MODEL, "--max-batch", "4",
                 log_path=tmp_path_factory.mktemp("serve") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def reference(exports):
    return skipdeploy.load(exports["tiny"])


def expected(reference, prompt, max_tokens, skipdecode=None, **knobs):
    schedule = schedule_from_options(skipdecode or {}, reference.spec.num_layers, reference.manifest.schedule,
                                     max_tokens - 1)
    result = reference.generate([prompt], max_tokens, schedule, **knobs)
    return result.tokens[0], [result.prompt_layers, *result.layers_per_step]


def extension(choice) -> dict:
    return choice.model_dump()["skipdecode"]


# -- requests and outputs --------------------------------------------------------------------------
@pytest.mark.slow
def test_health_models_and_auth(server):
    assert server.get("/health")[:3:2] == (200, {"status": "ready"})
    assert [m.id for m in server.client().models.list()] == [MODEL]
    assert server.get(f"/v1/models/{MODEL}", headers={"Authorization": f"Bearer {KEY}"})[2]["id"] == MODEL
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, _, body = server.get("/v1/models", headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert server.post({"prompt": "x"}, key="wrong")[0] == 401
    assert server.get("/metrics")[0] == 200  # only /v1/* is guarded


@pytest.mark.slow
def test_concurrent_mixed_requests_equal_generate_alone(server, reference):
    """Greedy and seeded sampling, full and skipping schedules, in flight together."""
    cases = []
    for i, prompt in enumerate(PROMPTS * 2):
        skipdecode = [None, SKIP, {"full": True}][i % 3]
        knobs = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.9, "top_p": 0.95, "seed": 100 + i}
        cases.append((prompt, 6 + 2 * i, skipdecode, knobs))
    client = server.client()

    def ask(case):
        prompt, max_tokens, skipdecode, knobs = case
        extra = {"skipdecode": skipdecode} if skipdecode else None
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, extra_body=extra, **knobs)

    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(ask, cases))
    for (prompt, max_tokens, skipdecode, knobs), resp in zip(cases, responses):
        tokens, layers = expected(reference, prompt, max_tokens, skipdecode, **knobs)
        choice = resp.choices[0]
        assert extension(choice)["token_ids"] == tokens, (prompt, skipdecode, knobs)
        assert extension(choice)["layers_per_token"] == layers
        assert choice.text == reference.tokenizer.decode(tokens)
        assert choice.finish_reason == ("stop" if tokens[-1] == 2 else "length")
        assert resp.object == "text_completion" and resp.model == MODEL and resp.id.startswith("cmpl-")
        assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == len(tokens)
        assert resp.usage.total_tokens == len(prompt) + len(tokens)
        schedule = resp.model_dump()["skipdecode"]["schedule"]
        assert (schedule["max_layers"], schedule["min_layers"]) == ((3, 1) if skipdecode == SKIP else (4, 4))


@pytest.mark.slow
def test_n_choices_with_derived_seeds_and_several_prompts(server, reference):
    prompts = [PROMPTS[0], PROMPTS[1]]
    resp = server.client().completions.create(model=MODEL, prompt=prompts, n=3, max_tokens=8, temperature=1.0,
                                              seed=41, extra_body={"skipdecode": SKIP})
    assert [c.index for c in resp.choices] == list(range(6))
    for c in resp.choices:  # choice i (prompt-major) draws from seed + i
        tokens, _ = expected(reference, prompts[c.index // 3], 8, SKIP, temperature=1.0, seed=41 + c.index)
        assert extension(c)["token_ids"] == tokens
    assert resp.usage.prompt_tokens == len(prompts[0]) + len(prompts[1])
    assert resp.usage.completion_tokens == sum(len(extension(c)["token_ids"]) for c in resp.choices)


@pytest.mark.slow
def test_text_prompt_echo_and_stop(server, reference):
    prompt = "def greet(name):"
    tokens, _ = expected(reference, reference.tokenizer.encode(prompt), 12, temperature=0.0)
    text = reference.tokenizer.decode(tokens)
    assert len(text) >= 4
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert plain.choices[0].text == prompt + text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=12, temperature=0, stop=[stop, "\x00"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_stream_joins_to_the_whole_response(server):
    client = server.client()
    for prompt, extra in ((PROMPTS[2], {"skipdecode": SKIP}), ("class Point:", {})):
        args = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, extra_body=extra)
        whole = client.completions.create(**args).choices[0]
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
        *steps, last = [ch.choices[0] for ch in chunks if ch.choices]
        assert len(steps) == len(extension(whole)["token_ids"])  # one chunk per token, then the finish
        assert last.finish_reason == whole.finish_reason and steps[-1].finish_reason is None
        # Text, token ids and layers are deltas that join to the whole response's.
        assert "".join(c.text for c in steps) + last.text == whole.text
        for key in ("token_ids", "layers_per_token"):
            assert sum((extension(c)[key] for c in [*steps, last]), []) == extension(whole)[key]
        assert extension(last)["mean_layers"] == extension(whole)["mean_layers"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(extension(whole)["token_ids"])
    # Raw SSE: data lines, ending with [DONE].
    status, head, text = server.post({"prompt": [2, 5], "max_tokens": 3, "stream": True})
    assert status == 200 and head["content-type"].startswith("text/event-stream")
    events = [line for line in text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


@pytest.mark.slow
def test_errors_have_the_openai_body(server):
    long_prompt = list(range(3, 3 + 130))
    cases = [  # body, status, param
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ({"prompt": [2, 3], "max_tokens": 10**6}, 400, "max_tokens"),
        ({"prompt": long_prompt, "max_tokens": 1}, 400, "max_tokens"),
        ({"prompt": [2, 3], "max_tokens": "5"}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": "1"}, 400, "temperature"),
        ({"prompt": "x", "temperature": -0.1}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ({"prompt": "x", "skipdecode": {"speedup": 2}}, 400, "skipdecode"),
        ({"prompt": "x", "skipdecode": {"max_layers": 9}}, 400, "skipdecode"),
        ({"prompt": "x", "skipdecode": {"max_layers": -1}}, 400, "skipdecode.max_layers"),
        ({"prompt": "x", "skipdecode": "fast"}, 400, "skipdecode"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": [1.5, 2]}, 400, "prompt"),
        ({"prompt": ["a", [2]]}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": [2, 99999]}, 400, "prompt"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
        ({"prompt": "x", "logprobs": 1}, 400, "logprobs"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ]
    for body, status, param in cases:
        got, _, error = server.post(body)
        assert got == status, (body, error)
        assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["param"] == param, body
    for raw in (b"{not json", b"[1, 2]", b""):
        got, _, error = server.post(None, raw=raw)
        assert got == 400 and error["error"]["message"], raw
    assert server.post({"prompt": "x", "unknown_field": 1, "user": "u", "max_tokens": 1})[0] == 200  # ignored
    got, _, error = server.post({"prompt": "x" * (1 << 20)})
    assert got == 413 and error["error"]["code"] == "body_too_large"
    assert server.get("/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})[0] == 404


@pytest.mark.slow
def test_metrics_count_what_happens(server):
    before = server.metrics()
    server.client().completions.create(model=MODEL, prompt=[2, 7, 8], max_tokens=5, temperature=0)
    after = server.metrics()

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta('skipdeploy_requests_total{outcome="length"}') + delta('skipdeploy_requests_total{outcome="eos"}') == 1
    assert 1 <= delta("skipdeploy_generated_tokens_total") <= 5
    assert delta("skipdeploy_time_to_first_token_seconds_count") == 1
    assert delta("skipdeploy_layers_per_iteration_count") >= 1
    assert after['skipdeploy_layers_per_iteration_bucket{le="4.0"}'] == after["skipdeploy_layers_per_iteration_count"]
    for name in ("skipdeploy_queue_depth", "skipdeploy_running_requests", "skipdeploy_cache_bytes_in_use",
                 "skipdeploy_time_per_output_token_seconds_count",
                 'skipdeploy_rejected_requests_total{reason="invalid"}'):
        assert name in after, name
    assert after["skipdeploy_running_requests"] == 0 and after["skipdeploy_cache_bytes_in_use"] == 0


# -- a busy server: queue full, disconnects, drain -------------------------------------------------
@pytest.fixture(scope="module")
def long_export(tmp_path_factory):
    """The tiny shape with 2048 positions: a request of 2000 tokens runs for seconds (random
    weights written without torch: what runs here is the server, not the model's math)."""
    from .numpy_export import random_export

    return random_export(tmp_path_factory.mktemp("long") / "export", "tiny", seed=2,
                         overrides={"max_position_embeddings": 2048}).directory


@pytest.fixture(scope="module")
def busy(long_export, tmp_path_factory):
    srv = Server(long_export, "--max-batch", "2", "--max-queue", "0", "--drain-timeout", "2", "--api-key", KEY,
                 "--model-name", MODEL, log_path=tmp_path_factory.mktemp("busy") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


def hold(server, max_tokens=2000):
    """A streaming request that is running (its first chunk has come)."""
    stream = server.client().completions.create(model=MODEL, prompt=[2, 45, 67], max_tokens=max_tokens,
                                                temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)
    return stream, chunks


def wait_for(predicate, timeout=15):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_queue_full_is_429_and_a_client_that_leaves_cancels(busy):
    held = [hold(busy), hold(busy)]
    status, head, error = busy.post({"prompt": [2, 5], "max_tokens": 2})
    assert status == 429 and head["Retry-After"] and error["error"]["type"] == "rate_limit_error"
    cancelled = 'skipdeploy_requests_total{outcome="cancelled"}'
    before = busy.metrics()[cancelled]
    for stream, _ in held:
        stream.close()
    wait_for(lambda: busy.metrics()[cancelled] == before + 2)
    wait_for(lambda: busy.metrics()["skipdeploy_running_requests"] == 0)
    assert busy.metrics()['skipdeploy_rejected_requests_total{reason="queue_full"}'] == 1
    # Not streaming: a client that hangs up while it waits cancels too.
    body = json.dumps({"prompt": [2, 45, 67], "max_tokens": 2000, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", busy.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: busy.metrics()["skipdeploy_running_requests"] == 1)
    wait_for(lambda: busy.metrics()[cancelled] == before + 3)
    assert busy.metrics()["skipdeploy_running_requests"] == 0


@pytest.mark.slow
def test_sigterm_drains_then_exits_0(busy):
    (_, short), (_, long) = hold(busy, 100), hold(busy, 2040)
    busy.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: busy.get("/health")[:3:2] == (503, {"status": "draining"}))
    status, _, error = busy.post({"prompt": [2, 5], "max_tokens": 2})
    assert status == 503 and error["error"]["code"] == "unavailable"
    choices = [c.choices[0] for c in short if c.choices]  # hold() read the first token's chunk
    assert choices[-1].finish_reason == "length" and sum(len(extension(c)["token_ids"]) for c in choices) == 99
    with pytest.raises(openai.APIError, match="shut down"):  # past --drain-timeout: cancelled
        list(long)
    assert busy.proc.wait(20) == 0, busy.log()


# -- without a server ------------------------------------------------------------------------------
def test_health_is_starting_until_the_engine_loads_and_failed_if_it_cannot():
    import threading

    from skipdeploy.serving.metrics import Metrics
    from skipdeploy.serving.server import ServerState

    gate = threading.Event()

    def broken(observer):
        gate.wait(10)
        raise skipdeploy.CapacityError("no room")

    state = ServerState(broken, Metrics(4), "m", drain_timeout=1)
    state.start_loading()
    assert state.status == "starting"
    with pytest.raises(api.APIError) as refused:
        state.ready_engine()
    assert refused.value.status == 503 and refused.value.headers["Retry-After"]
    gate.set()
    wait_for(lambda: state.status == "failed")
    assert state.load_error == "no room"


def test_parse_defaults_and_derived_seeds():
    params = api.parse_completion({"prompt": [1, 2], "seed": 7, "n": 2})
    assert params.prompts == [[1, 2]] and params.max_tokens == 16 and params.sampling.temperature == 1.0
    assert [params.knobs(i)["seed"] for i in range(2)] == [7, 8]
    assert api.parse_completion({"prompt": [[1], [2]], "temperature": 0}).sampling.temperature == 0.0
    with pytest.raises(api.APIError, match="not supported"):
        api.parse_completion({"prompt": "x", "presence_penalty": 0.5})


def test_completion_text_holds_back_a_possible_stop():
    pieces = {1: "ab", 2: "c", 3: "X", 4: "Yz"}

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    text = CompletionText(decode, stop=("XY",))
    deltas = [text.add(t) for t in (1, 2, 3)]
    assert deltas == ["ab", "c", ""]  # "X" may start the stop string
    assert text.add(4) == "" and text.rest() == "" and text.text() == "abc"
    half = CompletionText(lambda ids: "ab\ufffd"[:len(ids) + 1])
    assert half.add(1) == "ab" and half.add(2) == "" and half.rest() == "\ufffd"


@pytest.mark.slow
def test_load_benchmark_runs_and_reports_its_ratios(exports, tmp_path):
    """tools/serve_bench.py end to end on the tiny export (one round, two clients): structure and
    arithmetic only, never timings."""
    out = tmp_path / "serve.json"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "tools" / "serve_bench.py"), str(exports["tiny"]),
                           "--clients", "2", "--requests", "3", "--single-requests", "1", "--max-tokens", "3,5",
                           "--prompt-tokens", "2,4", "--policies", "continuous,drain", "--rounds", "1", "--ramp", "0",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    rows = {(r["schedule"], r["contender"]): r for r in results["rows"]}
    assert set(rows) == {(s, c) for s in ("full", "2x") for c in ("server continuous, 2 clients",
                                                                  "server drain, 2 clients", "server, one at a time",
                                                                  "static batches of 2")}
    for (schedule, contender), row in rows.items():
        assert row["tokens_per_s"] > 0 and row["ttft_ms"]["p50"] <= row["ttft_ms"]["p99"]
        assert row["requests"] == (1 if "one at a time" in contender else 3)
    assert rows["full", "server continuous, 2 clients"]["layers_per_iteration"] == 4.0  # every layer, every row
    assert rows["2x", "server continuous, 2 clients"]["layers_per_iteration"] < 4.0
    first = lambda key: rows[key]["tokens_per_s_rounds"][0]  # noqa: E731
    assert results["ratios"]["2x / full, continuous"] == pytest.approx(
        first(("2x", "server continuous, 2 clients")) / first(("full", "server continuous, 2 clients")))


# -- refused before anything loads ------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (("--max-length", "100000"), "--max-length 100000 exceeds the export's limit of"),
    (("--drain-timeout", "nan"), "--drain-timeout must be a finite number"),
    (("--drain-timeout", "inf"), "--drain-timeout must be a finite number"),
    (("--api-key", ""), "--api-key is empty"),
])
def test_serve_refuses_bad_values_up_front(exports, args, words):
    from .conftest import run_cli

    out = run_cli("serve", exports["tiny"], "--port", "0", *args)
    assert out.exit_code == 1 and words in out.output and "Traceback" not in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1


def test_create_app_refuses_an_empty_key_and_a_non_finite_drain_timeout():
    from skipdeploy.serving.server import create_app

    with pytest.raises(skipdeploy.SkipDeployError, match="api_key is empty"):
        create_app(lambda observer: None, model_name="m", num_layers=4, api_key="")
    with pytest.raises(skipdeploy.SkipDeployError, match="drain_timeout must be a finite number"):
        create_app(lambda observer: None, model_name="m", num_layers=4, drain_timeout=float("nan"))


def test_serving_a_checkpoint_says_to_export_it_first(checkpoints):
    from .conftest import run_cli

    out = run_cli("serve", checkpoints["tiny"])
    assert out.exit_code == 1 and "is a model checkpoint, not an export" in out.output
    assert f"skipdeploy export {checkpoints['tiny']} --out DIR" in out.output


def test_a_port_in_use_is_reported_before_the_model_loads(exports):
    from .conftest import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = run_cli("serve", exports["tiny"], "--port", taken.getsockname()[1])
    assert out.exit_code == 1 and "cannot listen on 127.0.0.1:" in out.output and "in use" in out.output
    assert "ready: serving" not in out.output and len(out.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_ready_is_logged_once_loaded_and_chat_gets_a_json_404(exports, tmp_path):
    srv = Server(exports["tiny"], "--log-level", "info", log_path=tmp_path / "server.log")
    try:
        log = srv.log()
        assert "Uvicorn running" not in log
        assert log.index(f"listening on http://127.0.0.1:{srv.port}") < log.index("ready: serving")
        for method in ("POST", "GET"):
            status, _, body = srv.call(method, "/v1/chat/completions", {"messages": []} if method == "POST" else None)
            assert status == 404 and body["error"]["code"] == "not_found"
            assert "only the completions API (POST /v1/completions" in body["error"]["message"]
    finally:
        assert srv.stop() == 0, srv.log()
