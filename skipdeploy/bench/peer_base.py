"""What every peer engine of ``bench --peers`` shares: :class:`PeerRunner` (convert once into a
work directory, stamped with what it was made from; load; run batches of token-id prompts) and
its small helpers. The engines are ``peers`` (CTranslate2, onnxruntime-genai) and ``llamacpp``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import BackendError, CheckpointError, InputError
from .runners import Run

STAMP = "skipdeploy-peer.json"  # written last into a converted directory: what it was made from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def require(module: str, install: str):
    """Import ``module`` or raise BackendError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(f"{module} is not installed ({exc}); {install} "
                           "(or pip install 'skipdeploy[bench]')") from None


def checkpoint_config(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``config.json``; CheckpointError if it has none."""
    path = Path(checkpoint) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint} is not a Hugging Face checkpoint directory ({exc})") from None


def fingerprint(checkpoint: str | os.PathLike) -> list[list[Any]]:
    """Name, size and modification time of every file of a checkpoint directory (but the record of
    the GGUF file it came from, which is written after the conversion and changes no weights)."""
    from ..gguf import SOURCE_RECORD

    root = Path(checkpoint)
    return sorted([p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in root.iterdir()
                  if p.is_file() and p.name != SOURCE_RECORD)


def equal_lengths(prompts: list[list[int]]) -> int:
    if not prompts or not prompts[0]:
        raise InputError("prompts must be a non-empty batch of non-empty token-id lists")
    length = len(prompts[0])
    if any(len(p) != length for p in prompts):
        raise InputError("the peer runners take prompts of equal length (the benchmark's prompts are)")
    return length


class PeerRunner:
    """``prepare()`` once (convert/build into ``work_dir`` unless it holds this checkpoint's
    conversion already, then load), then ``run(prompts, max_new_tokens)`` as often as wanted."""

    kind = "peer"
    module = ""   # the library to import
    install = ""  # how to install it
    title = ""    # the engine, for people

    def __init__(self, checkpoint: str | os.PathLike, work_dir: str | os.PathLike, *, threads: int | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.checkpoint = Path(checkpoint).expanduser().resolve()
        self.work_dir = Path(work_dir).expanduser()
        self.threads = threads or os.cpu_count() or 1
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.config = checkpoint_config(self.checkpoint)
        self.vocab_size = int(self.config["vocab_size"])
        self.lib = None

    # -- what subclasses provide ---------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """What, besides the checkpoint and the library's version, the conversion depends on."""
        return {}

    def convert(self, out: Path) -> None:
        raise NotImplementedError

    def load(self, out: Path) -> None:
        raise NotImplementedError

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> Run:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------
    def unsupported(self) -> str | None:
        """Why this checkpoint cannot run here, or None."""
        return None

    def stamp(self) -> dict[str, Any]:
        return {"runner": type(self).__name__, "library": getattr(self.lib, "__version__", "?"),
                "checkpoint": str(self.checkpoint), "files": fingerprint(self.checkpoint), "options": self.options()}

    def prepare(self) -> "PeerRunner":
        reason = self.unsupported()
        if reason:
            raise BackendError(reason)
        self.lib = require(self.module, self.install)
        out = self.work_dir
        stamp = self.stamp()
        try:
            cached = json.loads((out / STAMP).read_text()) == stamp
        except (OSError, ValueError):
            cached = False
        if not cached:
            if out.exists():
                if not (out / STAMP).is_file() and any(out.iterdir()):
                    raise BackendError(f"{out} exists and holds no conversion made here ({STAMP}); remove it or "
                                       "pick another work directory")
                shutil.rmtree(out)  # a stale conversion of ours
            out.parent.mkdir(parents=True, exist_ok=True)
            self.log(f"{self.title}: converting {self.checkpoint} into {out} (once: reused while the checkpoint's "
                     "files are unchanged)")
            start = time.perf_counter()
            try:
                self.convert(out)
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)  # no half conversion left behind
                raise
            (out / STAMP).write_text(json.dumps(stamp, indent=1))
            self.log(f"{self.title}: converted in {time.perf_counter() - start:.1f} s")
        else:
            self.log(f"{self.title}: reusing the conversion in {out}")
        self.load(out)
        return self

    def runner(self, max_new_tokens: int) -> Callable[[list[list[int]]], Run]:
        """``run`` with the token count bound: the shape of :class:`~skipdeploy.bench.runners.Contender.run`."""
        return lambda prompts: self.run(prompts, max_new_tokens)
