"""Writing an export directory: staged in a hidden sibling, renamed into place, one writer at a time.

``export`` and ``quantize_export`` both write ``OUT`` through :func:`staging_directory`:

* an exclusive lock on the sibling file ``.OUT.lock`` (``flock``, non-blocking) is held from the
  start of staging until after the rename, so a second export to the same ``OUT`` is refused in
  one line instead of silently replacing the first one; "``OUT`` exists and no force" is checked
  under the lock, so it cannot race with the rename either. The lock is per thread: an export
  that writes ``OUT`` through ``quantize_export`` (``export --quantize``) takes it once.
* the export is written into ``.OUT.partial-PID-RANDOM``, removed if the block fails, on Ctrl-C
  and (main thread, default SIGTERM action) on SIGTERM, which exits with status 143 once the
  cleanup ran. What a SIGKILLed run leaves is removed by the next export to ``OUT``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ExportError

try:
    import fcntl
except ImportError:  # not on Windows: there an export takes no lock
    fcntl = None

_held = threading.local()  # .paths: lock file -> descriptor, for the locks this thread holds


def lock_file(out: Path) -> Path:
    """The sibling file whose ``flock`` says that an export is writing ``out``."""
    return out.parent.resolve() / f".{out.name}.lock"


@contextlib.contextmanager
def staging_directory(out: Path, *, force: bool = False) -> Iterator[Path]:
    """A hidden sibling of ``out`` to write an export into, removed if the block fails, while this
    thread holds ``out``'s lock; what killed runs left beside ``out`` goes first. The caller
    renames it into place (:func:`move_into_place`) inside the block."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_raises(), output_lock(out):
        if out.exists() and not force:
            raise ExportError(f"{out} already exists; pass force=True to replace it")
        _remove_stale_partials(out)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive lock on writing ``out``, or raise ExportError naming ``out`` when another
    export (process or thread) holds it. Re-entrant within a thread."""
    path = lock_file(out)
    if not hasattr(_held, "paths"):
        _held.paths = {}
    paths: dict[Path, int | None] = _held.paths
    if path in paths or fcntl is None:
        yield
        return
    fd = _acquire(path, out)
    paths[path] = fd
    try:
        yield
    finally:
        del paths[path]
        _release(path, fd)


def _acquire(path: Path, out: Path) -> int | None:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ExportError(f"cannot write {out}: cannot create {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ExportError(f"{out} is being written by another export{holder}; wait for it to finish "
                              "or write to another directory") from None
        except OSError:  # a file system without locks: export as before, unlocked
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one


def _holder(fd: int) -> str:
    try:
        return f" (process {int(os.pread(fd, 32, 0).decode().strip())})"
    except (OSError, ValueError):
        return ""


def _release(path: Path, fd: int | None) -> None:
    """Remove the lock file while still holding it (so nobody can lock the removed file after
    reading it as free; ``_acquire`` checks that the file it locked is still there), then unlock."""
    if fd is None:
        return
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """In the main thread, while SIGTERM has its default action (which kills the process without
    any cleanup), make it raise SystemExit(143) instead, so that ``finally`` blocks and the staging
    cleanup run; the previous handler comes back afterwards. A handler the application installed
    (or SIG_IGN) is left alone, as is every thread but the main one."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Run the block whole: a SIGINT or SIGTERM whose handler is Python code (and so would raise
    inside it) acts when the block ends. Main thread only (other threads cannot handle signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: dict[int, Callable] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(sig)):
            saved[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for signum in pending:
            saved[signum](signum, None)


def move_into_place(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an existing ``out`` is removed only after that succeeds.
    The two renames are not interrupted by Ctrl-C or SIGTERM (those act right after them)."""
    trash = None
    with _signals_held():
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
        try:
            os.replace(tmp, out)
        except OSError as exc:
            if trash is not None:
                os.replace(trash, out)
            raise ExportError(f"cannot move the export into {out}: {exc}") from None
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()


def _remove_stale_partials(out: Path) -> None:
    """Delete what killed exports to ``out`` left behind: partial directories whose process is
    gone, and replaced exports (``.OUT.old-*``) once ``out`` itself is in place. Called under
    ``out``'s lock, so no other export is between its two renames."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(partial.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue
    if out.exists():  # else a run killed between its renames left the only copy in .old-*
        for old in out.parent.glob(f".{out.name}.old-*"):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


__all__ = ["staging_directory", "output_lock", "move_into_place", "lock_file"]
