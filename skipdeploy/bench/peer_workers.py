"""The peers of ``run_bench`` (``--peers``): each in a worker process of its own.

Engines in one process disturb each other (loading a CTranslate2 int8 model slowed a float32 one
in the same process by half), so every peer is converted, loaded and timed in a process of its
own (``python -m skipdeploy.bench.peer_workers``), which sends back each :class:`Run` with the
times taken there: the pipe is outside the timing. Before a worker is started, the parent checks
what it can without importing the peer's library (which would load its thread pools here): the
checkpoint, the model family, and whether the library is installed. A peer that cannot run is
skipped with one line per reason, and the rest of the benchmark runs.

Protocol (pickles): parent -> worker ``{name, checkpoint, work_root, threads, new_tokens}``, then
prompts, one batch a message; worker -> parent ``("log", line)`` any time, ``("ready", info)`` or
``("skip", reason)`` once, then ``("ok", Run)`` or ``("error", line)`` per batch. The worker's own
stdout goes to stderr, so that nothing a library prints can break the protocol.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import BackendError, SkipDeployError
from .runners import Contender, Run

Log = Callable[[str], None]


def default_work_dir(checkpoint: str | os.PathLike) -> Path:
    """Where conversions of ``checkpoint`` are cached when ``--work-dir`` is not given."""
    path = Path(checkpoint).expanduser().resolve()
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "skipdeploy" / "peers" / f"{path.name}-{tag}"


def precision_of(name: str) -> str:
    """``ct2-fp32`` -> ``float32``, ``ortgenai-int4`` -> ``int4``, ``llamacpp-file`` -> ``gguf`` (the
    file's own types): the ``export`` field of its rows."""
    suffix = name.rsplit("-", 1)[-1]
    return {"fp32": "float32", "f32": "float32", "file": "gguf"}.get(suffix, suffix)


def importable(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def reason_of(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, SkipDeployError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


def cannot_run(name: str, checkpoint: Path | None) -> str | None:
    """Why peer ``name`` cannot run on ``checkpoint``, found without importing its library; or None."""
    from .peers import PEERS

    if checkpoint is None or not checkpoint.is_dir():
        return (f"the peers convert a local checkpoint and {checkpoint} is not a directory; pass --checkpoint DIR"
                if checkpoint is not None else "no checkpoint to convert; pass --checkpoint DIR")
    cls, options = PEERS[name]
    try:
        runner = cls(checkpoint, checkpoint, **options)  # reads config.json only
    except SkipDeployError as exc:
        return reason_of(exc)
    reason = runner.unsupported()
    if reason is None and not importable(cls.module):
        reason = f"{cls.module} is not installed; {cls.install} (or pip install 'skipdeploy[bench]')"
    return reason


class PeerWorker:
    """One peer in its own process: ``start`` converts and loads it there, ``run`` times a batch."""

    def __init__(self, name: str, checkpoint: Path, work_root: Path, threads: int, new_tokens: int, log: Log) -> None:
        self.name, self.log = name, log
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.send({"name": name, "checkpoint": str(checkpoint), "work_root": str(work_root), "threads": threads,
                   "new_tokens": new_tokens})

    def send(self, message: Any) -> None:
        pickle.dump(message, self.proc.stdin)
        self.proc.stdin.flush()

    def receive(self) -> tuple:
        while True:
            try:
                message = pickle.load(self.proc.stdout)
            except (EOFError, pickle.UnpicklingError):
                self.proc.wait()
                return ("error", f"its worker process exited with code {self.proc.returncode}")
            if message[0] != "log":
                return message
            self.log(message[1])

    def run(self, prompts: list[list[int]]) -> Run:
        try:
            self.send(prompts)
        except (BrokenPipeError, OSError):
            raise BackendError(f"{self.name}: its worker process is gone (exit code {self.proc.poll()})") from None
        message = self.receive()
        if message[0] != "ok":
            raise BackendError(f"{self.name}: {message[1]}")
        return message[1]

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # the worker's end of input: it exits
            except OSError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


class Peers:
    """The peers of one benchmark: ``contenders`` that run, ``skipped`` (name and reason) and
    ``prepared`` (per peer: conversion and load seconds, the worker's resident memory, the
    library's version). ``close()`` ends the workers."""

    def __init__(self, names: list[str], checkpoint: str | os.PathLike | None, work_dir: str | os.PathLike | None,
                 threads: int, new_tokens: int, log: Log) -> None:
        self.contenders: list[Contender] = []
        self.skipped: list[dict[str, str]] = []
        self.prepared: dict[str, dict[str, Any]] = {}
        self.workers: list[PeerWorker] = []
        ckpt = Path(checkpoint).expanduser() if checkpoint else None
        reasons = {name: cannot_run(name, ckpt) for name in names}
        for reason in dict.fromkeys(r for r in reasons.values() if r):  # one line per reason
            self.skip([n for n in names if reasons[n] == reason], reason, log)
        root = Path(work_dir).expanduser() if work_dir else (default_work_dir(ckpt) if ckpt else None)
        self.work_root = root
        try:
            for name in [n for n in names if not reasons[n]]:
                worker = PeerWorker(name, ckpt.resolve(), root, threads, new_tokens, log)
                self.workers.append(worker)  # from its start: an interrupted conversion's process is reaped too
                message = worker.receive()
                if message[0] != "ready":
                    self.workers.remove(worker)
                    worker.close()
                    self.skip([name], message[1], log)
                    continue
                self.prepared[name] = message[1]
                self.contenders.append(Contender(name, "peer", worker.run, export=precision_of(name)))
        except BaseException:
            self.close()
            raise

    def skip(self, names: list[str], reason: str, log: Log) -> None:
        log(f"{', '.join(names)} skipped: {reason}")
        self.skipped += [{"contender": n, "reason": reason} for n in names]

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = []

    @staticmethod
    def versions() -> dict[str, str]:
        from .peers import peer_versions

        return peer_versions()


def rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def serve() -> int:
    """The worker's side (``python -m skipdeploy.bench.peer_workers``)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(message: Any) -> None:
        pickle.dump(message, out)
        out.flush()

    try:
        config = pickle.load(sys.stdin.buffer)
    except EOFError:
        return 0
    from .peers import peer

    start = time.perf_counter()
    try:
        runner = peer(config["name"], config["checkpoint"], config["work_root"],
                      threads=config["threads"], log=lambda line: send(("log", line)))
    except Exception as exc:  # whatever stops the peer skips it, with its one line
        send(("skip", reason_of(exc)))
        return 0
    send(("ready", {"prepare_s": time.perf_counter() - start, "worker_rss_mb": rss_mb(),
                    "library": getattr(runner.lib, "__version__", None)}))
    while True:
        try:
            prompts = pickle.load(sys.stdin.buffer)
        except EOFError:
            return 0
        try:
            send(("ok", runner.run(prompts, config["new_tokens"])))
        except Exception as exc:  # the parent stops the benchmark with this line
            send(("error", reason_of(exc)))


if __name__ == "__main__":
    sys.exit(serve())
