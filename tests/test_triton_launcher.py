"""``python -m skipdeploy.triton.server`` and ``TritonServer``: what a start that fails leaves and
says, and when the foreground server announces itself (issue 17's Triton items 1 and 2).

Each test starts the real ``tritonserver`` of the nvidia-pytriton wheel (skipped, saying why,
where it is not installed) on a repository of the tiny export, and stops what it started by pid.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.test_triton import _server_or_skip, run_triton

pytestmark = pytest.mark.slow


def _stubs_of(pid: int) -> list[int]:
    """Live Python backend stubs whose parent was the server ``pid`` (the stub's command line names
    its parent's pid: ``stub MODEL.py SHM SIZE GROWTH PARENT_PID ...``), wherever they were reparented."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 5 and argv[5] == str(pid).encode() \
                and state not in "ZX":
            found.append(int(entry.name))
    return found


def _shm(pid: int = os.getpid()) -> set:
    """This process's servers' shared-memory regions (``TritonServer`` names them skipdeploy-PID-...)."""
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"skipdeploy-{pid}-")}


def test_a_failed_start_leaves_no_stub_and_no_shared_memory(exports, tmp_path):
    """A port already taken: Triton loads the model (a stub process), fails to listen and exits."""
    from skipdeploy.errors import BackendError

    server_mod = _server_or_skip()
    assert run_triton(exports["tiny"], "--out", tmp_path / "repo").exit_code == 0
    before = _shm()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = server_mod.TritonServer(tmp_path / "repo", http_port=taken.getsockname()[1], workdir=tmp_path / "w")
        try:
            with pytest.raises(BackendError) as info:
                with server:
                    pass
        finally:
            server.stop()
    message = str(info.value)
    assert "already in use" in message and "\n" not in message and str(server.log_path) in message
    assert "successfully loaded 'tiny'" in server.log()  # the stub was running when the server gave up
    assert _stubs_of(server.pid) == [] and _shm() - before == set()


def test_a_model_that_fails_to_load_says_why_and_keeps_the_log(exports, tmp_path, capsys):
    """The export moved after the repository was written: the one-line error is the model's load
    error from Triton's log, whose path it gives; nothing is announced as listening."""
    server_mod = _server_or_skip()
    export = tmp_path / "export"
    shutil.copytree(exports["tiny"], export)
    assert run_triton(export, "--out", tmp_path / "repo", "--model-name", "gone").exit_code == 0
    export.rename(tmp_path / "moved")
    ports = [str(server_mod.free_port()) for _ in range(3)]
    code = server_mod.main([str(tmp_path / "repo"), "--http-port", ports[0], "--grpc-port", ports[1],
                            "--metrics-port", ports[2]])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "http://" not in err, err
    assert f"failed to load 'gone' version 1: Internal: ManifestError: export directory {export} does not " \
           "exist" in errors[0]
    log = Path(errors[0].rsplit("(log: ", 1)[1].rstrip(")"))
    try:
        assert "failed to load 'gone'" in log.read_text()
    finally:
        shutil.rmtree(log.parent, ignore_errors=True)


def test_the_foreground_server_announces_its_address_once_ready(exports, tmp_path):
    server_mod = _server_or_skip()
    assert run_triton(exports["tiny"], "--out", tmp_path / "repo").exit_code == 0
    ports = [str(server_mod.free_port()) for _ in range(3)]
    process = subprocess.Popen([sys.executable, "-m", "skipdeploy.triton.server", str(tmp_path / "repo"),
                                "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr] + [lines.put(None)],
                     daemon=True).start()
    try:
        line = lines.get(timeout=120)
        while line is not None and "http://" not in line:
            line = lines.get(timeout=120)
        assert line is not None and f"http://127.0.0.1:{ports[0]}" in line, process.poll()
        # Announced: so ready, at once.
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
