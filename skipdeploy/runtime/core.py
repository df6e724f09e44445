"""The engine core under both decoding paths: ``Runtime`` (static batches, with ``Generator``) and
``ServingEngine`` (in-flight batching) open an export, check their options and requests, load the
tokenizer and budget cache memory through this one module, so that every door (Python, CLI,
OpenAI server, Triton, C) gets the same rules and the same one-line refusals.

- :func:`open_engine`: the options checked (``threads`` bounded by the machine's cores), the
  manifest read (with the files' sha256 when ``check_files``), the backend engine created
  (``engines.create_engine`` holds the backend/device rules; ``inflight`` picks the interface).
- :class:`EngineCore`: a manifest and its engine, the memory limit, the tokenizer (read once, on
  first use), ``check_request`` and ``check_fits`` (the memory budget).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engines import Engine, create_engine
from ..errors import BackendError, CapacityError, InputError
from ..manifest import Manifest, read_manifest
from ..request_params import schedule_of
from ..schedule import LayerSchedule
from .inputs import check_positions, check_schedule, eos_ids, prompt_rows, request_config
from .kv import format_bytes
from .sampling import GenerationConfig
from .tokenizer import Tokenizer


def machine_cores() -> int:
    """The CPU cores this machine has (``os.cpu_count()``): the most ``threads`` may ask for."""
    return os.cpu_count() or 1


def check_integer(name: str, value, low: int) -> int:
    """``value`` as an int >= ``low``, or one line naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"{name} must be an integer >= {low} (got {value!r})")
    return int(value)


def check_threads(threads) -> int | None:
    """``threads`` (None: every core) refused above the machine's cores: more threads than cores
    only add memory and contention (100000 grew memory by 60 MB/s; 256 took 54 s for two tokens)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InputError(f"threads must be an integer >= 1 (got {threads!r}); leave it out to use every core")
    cores = machine_cores()
    if threads > cores:
        raise InputError(f"threads must be at most {cores}, the CPU cores this machine has (os.cpu_count()); "
                         f"got {threads}")
    return int(threads)


def check_memory_limit(limit) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise InputError(f"memory_limit must be a number of bytes >= 1 (got {limit!r})")
    return None if limit is None else int(limit)


def open_engine(directory: str | Path, *, backend: str = "onnxruntime", device: str | None = None,
                inflight: bool = False, threads: int | None = None, check_files: bool = True,
                max_length: int | None = None, **options) -> tuple[Manifest, Engine]:
    """The export's manifest and a backend engine for it: static (``skipdeploy.load``) or
    in-flight (``ServingEngine``). Options are checked before anything is read, and
    ``max_length`` (positions per request) against the export before the engine loads."""
    threads = check_threads(threads)
    if not isinstance(check_files, bool):
        raise InputError(f"check_files must be true or false (got {check_files!r})")
    if max_length is not None:
        check_integer("max_length", max_length, 2)
    manifest = read_manifest(directory, verify=check_files)
    if max_length is not None and max_length > manifest.max_length:
        raise InputError(f"max_length must be an integer in [2, {manifest.max_length}], the positions the export "
                         f"{manifest.directory} was sized for (got {max_length}); re-export with a larger "
                         "--max-length")
    return manifest, create_engine(backend, manifest, device=device, inflight=inflight, threads=threads, **options)


@dataclass
class CheckedRequest:
    """A request after every check: its knobs, schedule, prompts (plain ints) and EOS ids."""

    config: GenerationConfig
    schedule: LayerSchedule
    rows: list[list[int]]
    eos: set[int]


class EngineCore:
    """An export and its backend engine, as both decoding paths hold them. ``inflight`` says which
    interface the engine must have (an in-flight engine cannot decode static batches, and back)."""

    def __init__(self, manifest: Manifest, engine: Engine, memory_limit: int | None = None,
                 inflight: bool = False) -> None:
        if engine.inflight != inflight:
            raise BackendError(f"this {engine.name} engine serves "
                               f"{'in-flight batching (ServingEngine)' if engine.inflight else 'static batches'}; "
                               f"{'ServingEngine' if inflight else 'Runtime'} needs one made with "
                               f"create_engine(inflight={inflight})")
        self.manifest, self.engine, self.spec = manifest, engine, manifest.model
        self.memory_limit = check_memory_limit(memory_limit)
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The export's tokenizer, read on first use; one line when the export has none."""
        if self._tokenizer is None:
            path = self.manifest.tokenizer_path
            if path is None:
                raise InputError(f"the export {self.manifest.directory} has no tokenizer (its checkpoint had "
                                 "none): pass token ids instead of text")
            self._tokenizer = Tokenizer(path)
        return self._tokenizer

    def check_request(self, input_ids, max_new_tokens: int | None, schedule,
                      config: GenerationConfig | None, knobs: dict, eos_token_id, *, default_schedule: LayerSchedule,
                      max_length: int, holder: str, max_batch: int | None = None) -> CheckedRequest:
        """Every check of a request before it runs: knobs, schedule, prompts, batch and positions."""
        config = request_config(config, max_new_tokens, knobs, self.spec.vocab_size)
        schedule = check_schedule(schedule_of(schedule, self.spec.num_layers, default_schedule, config.max_new_tokens),
                                  self.spec.num_layers)
        rows = prompt_rows(input_ids, self.spec.vocab_size)
        if max_batch and len(rows) > max_batch:
            raise CapacityError(f"batch of {len(rows)} exceeds the {max_batch} rows this export was sized for; "
                                "re-export with a larger --max-batch")
        check_positions(max(len(r) for r in rows), config.max_new_tokens, max_length, holder)
        return CheckedRequest(config, schedule, rows, eos_ids(eos_token_id, self.spec.eos_token_id))

    def check_fits(self, need: int, needs: str, advice: str) -> None:
        """Refuse up front a cache of ``need`` bytes that the device (or ``memory_limit``) cannot
        hold: the one memory budget of both paths. ``needs`` says what needs it, with ``{need}``
        where the bytes go."""
        available = self.engine.available_memory()
        if self.memory_limit is not None:
            available = min(self.memory_limit, available) if available is not None else self.memory_limit
        if available is not None and need > available:
            raise CapacityError(f"{needs.format(need=format_bytes(need))} and only {format_bytes(available)} is "
                                f"available; {advice}")

    def close(self) -> None:
        self.engine.close()


__all__ = ["CheckedRequest", "EngineCore", "check_integer", "check_memory_limit", "check_threads", "machine_cores",
           "open_engine"]
