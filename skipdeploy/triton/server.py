"""Find and start a Triton Inference Server for a model repository (tests, benchmarks, local runs).

On NVIDIA's ``tritonserver`` container image nothing here is needed: run ``tritonserver
--model-repository=REPO`` there (docs/triton.md). Elsewhere, the ``nvidia-pytriton`` wheel ships a
complete server (``pytriton/tritonserver/bin/tritonserver`` 2.51, the Python backend, one backend
stub per Python version, and its shared libraries in ``nvidia_pytriton.libs``). Install it without
its dependencies (they pin numpy < 2 for pytriton's own Python API, which is not used here), then
give the stub its Python once (see "numpy" below)::

    python -m skipdeploy.triton.server --setup     # pip install --no-deps nvidia-pytriton, and the overlay

and serve a repository written by ``skipdeploy triton`` in the foreground with::

    python -m skipdeploy.triton.server REPO [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

What makes the wheel's server run a model that imports skipdeploy (``TritonServer`` does all of it):

* a writable backend directory holding the Python backend and the stub built for this
  interpreter's version (``prepare_backends``);
* ``LD_LIBRARY_PATH``: this interpreter's own ``libpython`` directory first (else the stub may
  load another patch release of libpython from the system), then the wheel's libraries;
* ``PATH``: the stub starts its embedded Python (isolated: ``PYTHONPATH`` is not read) from the
  first ``python3`` on PATH, whose environment's site-packages it then uses;
* a unique shared-memory prefix per server, so that several servers can run side by side, and
  so that the stubs and ``/dev/shm`` regions a server leaves behind when it fails are found and
  removed (``supervision``; ``stop`` does it, also after a failed start).

numpy: the stub of Triton 2.51 is built with pybind11 2.10, which reads numpy's C structures in
their 1.x layout: under numpy 2 every tensor that crosses into or out of ``model.py`` is garbled
(input ids arrive as copies of their first element, text input crashes the stub). The model's
interpreter therefore needs numpy 1.x while this environment keeps numpy 2. ``--setup``
(``setup_stub_python``) writes a small overlay environment, ``<this venv>/triton-python``: a
virtual environment holding only numpy < 2, whose site-packages then chains to this environment's
(``site.addsitedir``, so editable installs work): the model imports the same skipdeploy,
onnxruntime and tokenizers, with numpy 1.26 (which all of them support). ``TritonServer`` puts the
overlay's ``python3`` first on PATH whenever this environment has numpy >= 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError
from . import supervision

INSTALL_HINT = "pip install --no-deps nvidia-pytriton~=0.7.0"  # tritonserver 2.51, whose stub needs numpy < 2


@dataclass(frozen=True)
class TritonInstall:
    """Where the parts of a Triton server are."""

    binary: Path
    python_backend: Path        # libtriton_python.so and triton_python_backend_utils.py
    stub: Path                  # triton_python_backend_stub for this Python version
    libraries: Path | None      # shared libraries the binary and the stub need (the wheel's)
    caches: Path | None


def find_tritonserver(python_version: str | None = None) -> TritonInstall:
    """The server of the ``nvidia-pytriton`` wheel installed for this interpreter, or a
    BackendError that says how to install it."""
    version = python_version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    import importlib.util

    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"no Triton server found: {INSTALL_HINT} (or use NVIDIA's tritonserver image)")
    root = Path(list(spec.submodule_search_locations)[0])
    dist = root / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    backend = dist / "backends" / "python"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    for path in (binary, backend / "libtriton_python.so"):
        if not path.is_file():
            raise BackendError(f"the nvidia-pytriton install at {root} has no {path.relative_to(root)}; "
                               f"reinstall it: {INSTALL_HINT}")
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").glob("*"))
        raise BackendError(f"nvidia-pytriton has no Python backend stub for Python {version} "
                           f"(it has {', '.join(have) or 'none'})")
    libraries = root.parent / "nvidia_pytriton.libs"
    caches = dist / "caches"
    return TritonInstall(binary, backend, stub, libraries if libraries.is_dir() else None,
                         caches if caches.is_dir() else None)


def available() -> bool:
    try:
        find_tritonserver()
    except BackendError:
        return False
    return True


def prepare_backends(install: TritonInstall, directory: str | Path) -> Path:
    """A backend directory (``DIRECTORY/python``) with the Python backend and this interpreter's
    stub, as ``--backend-directory`` wants it; returns ``directory``."""
    directory = Path(directory)
    python = directory / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(install.python_backend / name, python / name)
    shutil.copy2(install.stub, python / "triton_python_backend_stub")
    return directory


STUB_NUMPY = "numpy>=1.24,<2"
OVERLAY_PTH = "skipdeploy_chain.pth"


def numpy_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("numpy").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


def overlay_directory() -> Path:
    """Where ``setup_stub_python`` writes the stub's overlay environment: inside this virtual
    environment (or beside this interpreter's prefix), so it goes with it."""
    return Path(sys.prefix) / "triton-python"


def _site_packages(prefix: Path) -> Path:
    return prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def stub_python(overlay: str | Path | None = None) -> Path:
    """The interpreter the Python backend stub should run: this one where numpy < 2, else the
    overlay's (a BackendError naming the setup command if it is missing)."""
    if numpy_major() < 2:
        return Path(sys.executable)
    overlay = Path(overlay) if overlay else overlay_directory()
    python = overlay / "bin" / "python3"
    if not python.exists() or not (_site_packages(overlay) / OVERLAY_PTH).is_file():
        raise BackendError("the Python backend of tritonserver 2.51 needs numpy < 2 in the model's interpreter and "
                           f"this environment has numpy 2; run once: {sys.executable} -m skipdeploy.triton.server "
                           "--setup (an overlay with numpy < 2 that leaves this environment's numpy alone)")
    return python


def setup_stub_python(overlay: str | Path | None = None, numpy_spec: str = STUB_NUMPY, log=print) -> Path:
    """Write the overlay environment (see the module's docstring) and return its ``python3``:
    a virtual environment of this interpreter with ``numpy_spec`` (pip, from the package index)
    and a .pth file that appends this environment's site-packages. Idempotent."""
    import site

    overlay = Path(overlay) if overlay else overlay_directory()
    base = Path(getattr(sys, "_base_executable", sys.executable))
    if not (overlay / "bin" / "python3").exists():
        log(f"creating {overlay}")
        subprocess.run([str(base), "-m", "venv", "--without-pip", str(overlay)], check=True)
    target = _site_packages(overlay)
    target.mkdir(parents=True, exist_ok=True)
    log(f"installing {numpy_spec} into {target}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--upgrade", "--target", str(target), numpy_spec], check=True)
    chained = [p for p in site.getsitepackages() if Path(p).resolve() != target.resolve()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in chained)
    (target / OVERLAY_PTH).write_text(lines)
    python = overlay / "bin" / "python3"
    check = subprocess.run([str(python), "-c", "import numpy, skipdeploy, onnxruntime; print(numpy.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise BackendError(f"the overlay at {overlay} does not import skipdeploy:\n{check.stderr.strip()}")
    log(f"the stub's Python: {python} (numpy {check.stdout.strip()}, skipdeploy from this environment)")
    return python


def server_environment(install: TritonInstall | None = None, python: str | Path | None = None,
                       base: dict | None = None) -> dict:
    """The environment the server and its stub processes need (see the module's docstring);
    ``python``: the stub's interpreter (``stub_python()``)."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(python or stub_python()).parent)
    env["PATH"] = os.pathsep.join([bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir])
    libs = []
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            libs.append(libdir)
    if install is not None and install.libraries is not None:
        libs.append(str(install.libraries))
    libs += [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p not in libs]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env.pop("PYTHONHOME", None)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """A ``tritonserver`` process serving ``repository`` on local ports (free ones unless given).

        with TritonServer("repo") as server:           # started and ready
            requests.post(f"{server.http_url}/v2/models/opt/generate", json={...})
        server.returncode                              # 0 after a clean SIGTERM stop

    The log goes to ``workdir/tritonserver.log`` (``log()`` reads it). ``stop()`` sends SIGTERM
    to the server's pid and waits for it (it kills it only past ``timeout``), then kills the
    backend stubs it left and removes its shared memory. A start that fails raises one line that
    says why (``supervision.failure_reason``) and where the log is; ``cleanup()`` keeps that log.
    """

    def __init__(self, repository: str | Path, *, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, workdir: str | Path | None = None,
                 install: TritonInstall | None = None, python: str | Path | None = None, exit_timeout: int = 5,
                 verbose: int = 0, extra_args: tuple[str, ...] = ()) -> None:
        self.repository = Path(repository).resolve()
        self.install = install or find_tritonserver()
        self.python = Path(python) if python else stub_python()
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="skipdeploy-triton-"))
        self.exit_timeout, self.verbose, self.extra_args = exit_timeout, verbose, tuple(extra_args)
        self.log_path = self.workdir / "tritonserver.log"
        # The stubs' shared-memory regions start with it, and their command lines name it.
        self.shm_prefix = f"skipdeploy-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.failed = False

    # -- addresses -------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self, backends: Path) -> list[str]:
        args = [str(self.install.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                "--allow-gpu-metrics=false", "--allow-cpu-metrics=false", "--pinned-memory-pool-byte-size=0",
                f"--exit-timeout-secs={self.exit_timeout}", f"--log-verbose={self.verbose}"]
        if self.install.caches is not None:
            args.append(f"--cache-directory={self.install.caches}")
        return args + list(self.extra_args)

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> "TritonServer":
        if self.process is not None:
            raise BackendError("this server was started already")
        backends = prepare_backends(self.install, self.workdir / "backends")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(backends), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_environment(self.install, self.python),
                                            cwd=self.workdir)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 120.0) -> "TritonServer":
        """Wait until the server and every model in the repository are ready. If the server exits
        or ``timeout`` seconds pass first: stop it and what it left (``stop``), and raise a
        one-line BackendError with the reason from its log and the log's path."""
        if self.process is None:
            raise BackendError("this server was not started")
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                self.stop()
                raise self._failure(f"tritonserver exited (status {self.returncode}) before it was ready")
            if time.monotonic() > deadline:
                self.stop()
                raise self._failure(f"tritonserver was not ready within {timeout:.0f} s")
            time.sleep(0.1)
        return self

    def _failure(self, what: str) -> BackendError:
        self.failed = True
        return BackendError(f"{what}: {supervision.failure_reason(self.log())} (log: {self.log_path})")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the server's pid, then wait (SIGKILL past ``timeout``); then kill the stubs
        it left and remove its shared memory (a clean stop leaves neither; a failed start or a
        crash may). Returns the server's exit status; safe to call again."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.returncode = self.process.returncode
        supervision.stop_stubs(self.shm_prefix)
        supervision.remove_shm(self.shm_prefix)
        return self.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def cleanup(self) -> None:
        """Remove the work directory if this server made it; after a failed start keep the log,
        which the error named."""
        if not self._own_workdir:
            return
        if not self.failed:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        for path in self.workdir.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path != self.log_path:
                path.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """``python -m skipdeploy.triton.server REPO``: serve a repository in the foreground until
    Ctrl-C or SIGTERM (which stop the server cleanly). It says where the server listens once the
    server and every model are ready; a start that fails is one line (why, and where the log is)
    and exit status 1."""
    parser = argparse.ArgumentParser(prog="python -m skipdeploy.triton.server",
                                     description="Serve a model repository with the tritonserver of nvidia-pytriton.")
    parser.add_argument("repository", nargs="?")
    parser.add_argument("--setup", action="store_true", help="Install nvidia-pytriton's tritonserver (without its "
                        "dependencies) if missing, write the stub's overlay environment (numpy < 2) into this "
                        "environment, and exit (needs the package index once).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on [default: 127.0.0.1].")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="Give up if the server and its models are not ready by then [default: 600].")
    args = parser.parse_args(argv)
    try:
        if args.setup:
            if not available():
                print(f"installing the tritonserver of nvidia-pytriton: {INSTALL_HINT}", file=sys.stderr)
                subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                *INSTALL_HINT.split()[2:]], check=True)
            find_tritonserver()
            setup_stub_python(log=lambda m: print(m, file=sys.stderr))
            return 0
        if not args.repository:
            parser.error("give a model repository (or --setup)")
        if not Path(args.repository).is_dir():
            raise BackendError(f"model repository {args.repository} is not a directory")
        server = TritonServer(args.repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, verbose=args.log_verbose)
    except (BackendError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # SIGTERM and Ctrl-C take the same way out, also while the models load.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    code = 0
    try:
        server.start()
        print(f"tritonserver (pid {server.pid}) is loading {server.repository}; log: {server.log_path}",
              file=sys.stderr)
        server.wait_ready(args.ready_timeout)
        print(f"tritonserver (pid {server.pid}) ready on {server.http_url} (HTTP), {server.grpc_url} (gRPC), "
              f"{server.metrics_url}", file=sys.stderr, flush=True)
        while server.process.poll() is None:
            time.sleep(0.2)
        server.stop()
        raise server._failure(f"tritonserver exited (status {server.returncode})")
    except KeyboardInterrupt:
        pass
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    finally:
        interrupts = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stopped = server.stop()
        finally:
            signal.signal(signal.SIGINT, interrupts)
            signal.signal(signal.SIGTERM, previous)
    if code == 0:
        print(f"tritonserver stopped (status {stopped})", file=sys.stderr)
        code = stopped or 0
    server.cleanup()
    return code


if __name__ == "__main__":
    sys.exit(main())
