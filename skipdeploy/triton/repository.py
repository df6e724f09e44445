"""Write a Triton model repository that serves a skipdeploy export (``skipdeploy triton``).

    REPO/
      NAME/
        config.pbtxt          Python backend, decoupled, the vLLM backend's inputs and outputs
        1/
          model.py            skipdeploy/triton/model.py, copied verbatim
          skipdeploy.json     the export's path and the engine's options
          export/             with copy_export: the export itself (the repository stands alone)

A repository holds any number of models, one directory each: writing NAME leaves the others
alone. Like an export, NAME is written into a hidden sibling (``REPO/.NAME.partial-*``) and
renamed into place when complete; an existing ``REPO/NAME`` is replaced only with ``force``.
The engine's options are checked here with the limits the engine applies when the model loads
(``check_engine_options``), so that a repository the server would refuse is not written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..errors import CapacityError, InputError, SkipDeployError
from ..manifest import Manifest, read_manifest
from ..schedule import LayerSchedule
from .parameters import CONFIG_FILE

FORMAT = 1
BACKENDS = ("onnxruntime", "torch")
# instance_group's count is an int32 in config.pbtxt; each instance is a process with its own
# engine, so memory (below) bounds it long before that.
MAX_INSTANCES = 1024
MAX_THREADS = 1024  # onnxruntime starts them all at load: beyond any machine's cores, only memory goes
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

INPUTS = [
    # name, data type, dims, optional
    ("text_input", "TYPE_STRING", "[ 1 ]", True),
    ("input_ids", "TYPE_INT64", "[ -1 ]", True),
    ("stream", "TYPE_BOOL", "[ 1 ]", True),
    ("sampling_parameters", "TYPE_STRING", "[ 1 ]", True),
    ("exclude_input_in_output", "TYPE_BOOL", "[ 1 ]", True),
    ("return_finish_reason", "TYPE_BOOL", "[ 1 ]", True),
    ("return_num_input_tokens", "TYPE_BOOL", "[ 1 ]", True),
    ("return_num_output_tokens", "TYPE_BOOL", "[ 1 ]", True),
]
OUTPUTS = [
    ("text_output", "TYPE_STRING", "[ -1 ]"),
    ("output_ids", "TYPE_INT64", "[ -1 ]"),
    ("finish_reason", "TYPE_STRING", "[ -1 ]"),
    ("num_input_tokens", "TYPE_UINT32", "[ 1 ]"),
    ("num_output_tokens", "TYPE_UINT32", "[ -1 ]"),
]


def model_source() -> Path:
    """The Python backend model that the repository gets (``model.py`` beside this module)."""
    return Path(__file__).with_name("model.py")


def default_model_name(export: str | Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(export).resolve().name).lstrip(".-") or "skipdeploy"
    return name


def config_pbtxt(name: str, instances: int, comment: str = "") -> str:
    """The model's config.pbtxt: Python backend, decoupled (responses as tokens come), no Triton
    batching (the engine batches in flight), ``instances`` CPU instances (each its own engine)."""
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    lines += [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
              "model_transaction_policy {", "  decoupled: true", "}", "input ["]
    for i, (iname, dtype, dims, optional) in enumerate(INPUTS):
        lines += ["  {", f'    name: "{iname}"', f"    data_type: {dtype}", f"    dims: {dims}"]
        if optional:
            lines.append("    optional: true")
        lines.append("  }," if i < len(INPUTS) - 1 else "  }")
    lines.append("]")
    lines.append("output [")
    for i, (oname, dtype, dims) in enumerate(OUTPUTS):
        lines += ["  {", f'    name: "{oname}"', f"    data_type: {dtype}", f"    dims: {dims}",
                  "  }," if i < len(OUTPUTS) - 1 else "  }"]
    lines.append("]")
    lines += ["instance_group [", "  {", f"    count: {instances}", "    kind: KIND_CPU", "  }", "]"]
    return "\n".join(lines) + "\n"


def _integer(name: str, value, least: int, most: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None and value > most):
        bound = f"in [{least}, {most}]" if most is not None else f">= {least}"
        raise InputError(f"{name} must be an integer {bound} (got {value!r}){why}")
    return value


def check_engine_options(manifest: Manifest, *, max_batch: int, max_queue: int, max_length: int | None,
                         prefill_chunk: int, threads: int | None, instances: int = 1, backend: str = "onnxruntime",
                         policy: str = "continuous", available: int | None = None) -> None:
    """Refuse (one line) engine options that ``ServingEngine`` would refuse when the model loads
    in the server: its ranges, ``max_length`` within the export's, and the KV cache of every
    instance within ``available`` bytes (default: this machine's available memory, which the
    engine checks against when it allocates the slots)."""
    from ..engines.base import host_available_memory
    from ..numerics import itemsize
    from ..runtime.kv import format_bytes
    from ..serving.engine import POLICIES

    _integer("max_batch", max_batch, 1)
    _integer("max_queue", max_queue, 0)
    _integer("prefill_chunk", prefill_chunk, 1)
    _integer("instances", instances, 1, MAX_INSTANCES)
    if max_length is not None:
        _integer("max_length", max_length, 2, manifest.max_length,
                 f"; the export allows {manifest.max_length} positions")
    if threads is not None:
        _integer("threads", threads, 1, MAX_THREADS)
    if backend not in BACKENDS:
        raise InputError(f"in-flight batching runs on {' and '.join(BACKENDS)} (got {backend!r})")
    if policy not in POLICIES:
        raise InputError(f"unknown admission policy {policy!r}; choose one of {', '.join(POLICIES)}")
    length = max_length or manifest.max_length
    spec = manifest.model
    need = instances * max_batch * 2 * spec.num_layers * length * spec.kv_dim * itemsize(manifest.dtype)
    available = host_available_memory() if available is None else available
    if available is not None and need > available:
        raise CapacityError(f"{instances} instance(s) x {max_batch} slots of {length} positions need "
                            f"{format_bytes(need)} of KV cache and this machine has {format_bytes(available)} "
                            "available; lower max_batch, max_length or instances")


def write_repository(export: str | Path, out: str | Path, *, model_name: str | None = None, max_batch: int = 16,
                     instances: int = 1, copy_export: bool = False, force: bool = False, max_queue: int = 64,
                     max_length: int | None = None, prefill_chunk: int = 64, threads: int | None = None,
                     backend: str = "onnxruntime", policy: str = "continuous",
                     schedule: LayerSchedule | None = None, log=None) -> Path:
    """Write the model ``NAME`` for ``export`` into the repository ``out`` (created if missing;
    its other models stay); returns the model's directory (``out/NAME``), which must not exist
    unless ``force``. ``schedule``: the default schedule of requests without a ``skipdecode``
    object (None: the export's). The engine options are those of ``ServingEngine``."""
    from ..exporter.staging import move_into_place, staging_directory

    log = log or (lambda message: None)
    export, out = Path(export), Path(out)
    manifest = read_manifest(export, verify=copy_export)
    name = model_name or default_model_name(export)
    if not _NAME.match(name):
        raise InputError(f"model name {name!r}: use letters, digits, '_', '.' and '-' (Triton's directory name)")
    check_engine_options(manifest, max_batch=max_batch, max_queue=max_queue, max_length=max_length,
                         prefill_chunk=prefill_chunk, threads=threads, instances=instances, backend=backend,
                         policy=policy)
    if schedule is not None and schedule.num_layers != manifest.model.num_layers:
        raise InputError(f"the schedule is for {schedule.num_layers} layers, the export has "
                         f"{manifest.model.num_layers}")
    if out.resolve() == export.resolve() or export.resolve() in out.resolve().parents:
        raise InputError(f"write the repository outside the export ({export})")
    if out.exists() and not out.is_dir():
        raise SkipDeployError(f"{out} exists and is not a directory (a model repository is one)")
    model_dir = out / name
    if model_dir.exists() and not force:
        raise SkipDeployError(f"{model_dir} already exists; pass --force to replace it (the repository's other "
                              "models stay)")

    from .. import __version__

    engine = {"backend": backend, "threads": threads, "max_batch": max_batch, "max_queue": max_queue,
              "max_length": max_length, "prefill_chunk": prefill_chunk, "policy": policy}
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with staging_directory(model_dir, force=force) as tmp:
            version = tmp / "1"
            version.mkdir()
            if copy_export:
                log(f"copying the export into {model_dir / '1' / 'export'}")
                shutil.copytree(export, version / "export", ignore=shutil.ignore_patterns(".*.lock"))
            config = {"format": FORMAT, "skipdeploy_version": __version__,
                      "export": "export" if copy_export else str(export.resolve()),
                      "engine": engine, "schedule": schedule.to_dict() if schedule is not None else None}
            (version / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            shutil.copyfile(model_source(), version / "model.py")
            comment = (f"Written by `skipdeploy triton` (skipdeploy {__version__}) for the export\n"
                       f"{export.resolve()}; the engine's options are in 1/{CONFIG_FILE}.")
            (tmp / "config.pbtxt").write_text(config_pbtxt(name, instances, comment))
            move_into_place(tmp, model_dir)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return model_dir
