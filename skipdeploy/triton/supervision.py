"""What ``TritonServer`` does around a ``tritonserver`` process besides starting it: find the
Python backend stubs and shared-memory regions it leaves behind, and read why it failed from its log.

Leftovers: each model instance runs in a ``triton_python_backend_stub`` process that the server
forks, talking to it through a ``/dev/shm`` region named by ``--backend-config=python,
shm-region-prefix-name=PREFIX``. When the server exits without unloading its models (a port
already taken, a crash, SIGKILL) the stubs are reparented to pid 1 and may outlive it, each
holding its model's memory (an opt-125m engine: ~900 MB) and deaf to SIGTERM, and the region stays
in ``/dev/shm``. The stub's command line names the region (``stub MODEL.py PREFIX<uuid> ...
PARENT_PID ...``), so a prefix unique to one server finds exactly the stubs that server caused,
even once their parent is gone.

Reasons: Triton logs why a model did not load on one line (``failed to load 'NAME' version 1:
...``) among hundreds, then exits saying only "failed to load all models"; ``failure_reason``
picks the lines that say why.
"""

from __future__ import annotations

import os
import re
import select
import signal
import time
from pathlib import Path

STUB = "triton_python_backend_stub"
SHM = Path("/dev/shm")


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _state(pid: int) -> str:
    """The process's state letter (``Z``: a zombie, holding nothing but its pid), or "" if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]


def is_stub_of(argv: list[str], prefix: str) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == STUB and any(a.startswith(prefix) for a in argv[1:])


def stub_pids(prefix: str) -> list[int]:
    """Live (not zombie) stub processes whose shared-memory region starts with ``prefix``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_stub_of(_argv(int(entry.name)), prefix) and _state(int(entry.name)) not in "ZX":
            found.append(int(entry.name))
    return found


def stop_stubs(prefix: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL the stubs of ``prefix`` (SIGTERM is not enough: see the module's docstring) and
    wait until they are gone; returns their pids. Only for a server that has exited: its stubs
    have nobody left to answer."""
    killed = []
    for pid in stub_pids(prefix):
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already
            continue
        try:
            # The pidfd pins the process: checking its command line again rules out a reused pid.
            if not is_stub_of(_argv(pid), prefix):
                continue
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            killed.append(pid)
            poller = select.poll()
            poller.register(fd, select.POLLIN)  # readable once the process has exited
            poller.poll(int(timeout * 1000))
        except OSError:
            pass
        finally:
            os.close(fd)
    # Exited means a zombie at worst (reaped by pid 1); its memory is already freed.
    deadline = time.monotonic() + timeout
    while any(_state(pid) not in "ZX" for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def shm_regions(prefix: str) -> list[Path]:
    try:
        return sorted(p for p in SHM.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def remove_shm(prefix: str) -> list[Path]:
    """Unlink the shared-memory regions of ``prefix`` (once no stub maps them)."""
    removed = []
    for path in shm_regions(prefix):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


# -- the log -------------------------------------------------------------------------------------
_LINE = re.compile(r"^([IWE])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ([^\]\s]+)\] (.*)$")
_NOISE = ("CudaDriverHelper has not been initialized",)  # logged by every CPU-only start


def _first_line(text: str) -> str:
    """A log message's first line: Triton quotes messages and writes their newlines as ``\\n``."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return text.split("\\n", 1)[0].replace('\\"', '"').replace("\\'", "'").strip()


def failure_reason(log: str) -> str:
    """Why a server failed, in one line, from its log: each model's load error, else its first
    error, else its last words (``error: ...``)."""
    loads, errors, last = [], [], ""
    for line in log.splitlines():
        match = _LINE.match(line)
        if match is None:
            if line.startswith("error: "):
                last = line[len("error: "):].strip()
            continue
        level, _, text = match.groups()
        text = _first_line(text)
        if text.startswith("failed to load '"):
            loads.append(text)
        elif level == "E" and text and not any(noise in text for noise in _NOISE):
            errors.append(text)
    # Each failed model gets a line with the reason and a bare "failed to load 'NAME'": keep the first.
    loads = [text for text in dict.fromkeys(loads) if not any(o != text and o.startswith(text) for o in loads)]
    reasons = loads or errors[:1] or ([last] if last else [])
    return " ".join("; ".join(reasons).split()) or "its log gives no reason"
