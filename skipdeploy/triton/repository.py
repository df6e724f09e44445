"""Write a Triton model repository that serves a skipdeploy export (``skipdeploy triton``).

    REPO/
      NAME/
        config.pbtxt          Python backend, decoupled, the vLLM backend's inputs and outputs
        1/
          model.py            skipdeploy/triton/model.py, copied verbatim
          skipdeploy.json     the export's path and the engine's options
          export/             with copy_export: the export itself (the repository stands alone)

Like an export, the repository is written into a hidden sibling of REPO and renamed into place
when complete; an existing REPO is replaced only with ``force`` (an empty one is taken as is).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..errors import InputError, SkipDeployError
from ..manifest import read_manifest
from ..schedule import LayerSchedule
from .parameters import CONFIG_FILE

FORMAT = 1
BACKENDS = ("onnxruntime", "torch")
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


def write_repository(export: str | Path, out: str | Path, *, model_name: str | None = None, max_batch: int = 16,
                     instances: int = 1, copy_export: bool = False, force: bool = False, max_queue: int = 64,
                     max_length: int | None = None, prefill_chunk: int = 64, threads: int | None = None,
                     backend: str = "onnxruntime", policy: str = "continuous",
                     schedule: LayerSchedule | None = None, log=None) -> Path:
    """Write the model repository ``out`` for ``export``; returns the model's directory
    (``out/NAME``). ``schedule``: the default schedule of requests without a ``skipdecode``
    object (None: the export's). The engine options are those of ``ServingEngine``."""
    from ..exporter.staging import move_into_place, staging_directory
    from ..serving.engine import POLICIES

    log = log or (lambda message: None)
    export, out = Path(export), Path(out)
    manifest = read_manifest(export, verify=copy_export)
    name = model_name or default_model_name(export)
    if not _NAME.match(name):
        raise InputError(f"model name {name!r}: use letters, digits, '_', '.' and '-' (Triton's directory name)")
    for option, value, least in (("max_batch", max_batch, 1), ("instances", instances, 1),
                                 ("max_queue", max_queue, 0), ("prefill_chunk", prefill_chunk, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"{option} must be an integer >= {least} (got {value!r})")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise InputError(f"max_length must be an integer >= 2 (got {max_length!r})")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be an integer >= 1 (got {threads!r})")
    if backend not in BACKENDS:
        raise InputError(f"in-flight batching runs on {' and '.join(BACKENDS)} (got {backend!r})")
    if policy not in POLICIES:
        raise InputError(f"unknown admission policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if schedule is not None and schedule.num_layers != manifest.model.num_layers:
        raise InputError(f"the schedule is for {schedule.num_layers} layers, the export has "
                         f"{manifest.model.num_layers}")
    if out.resolve() == export.resolve() or export.resolve() in out.resolve().parents:
        raise InputError(f"write the repository outside the export ({export})")
    empty = out.is_dir() and not any(out.iterdir())
    if out.exists() and not (out.is_dir() or force):
        raise SkipDeployError(f"{out} exists and is not a directory; pass --force to replace it")
    if out.exists() and not empty and not force:
        raise SkipDeployError(f"{out} already exists and is not empty; pass --force (force=True) to replace it")

    from .. import __version__

    engine = {"backend": backend, "threads": threads, "max_batch": max_batch, "max_queue": max_queue,
              "max_length": max_length, "prefill_chunk": prefill_chunk, "policy": policy}
    with staging_directory(out, force=True) as tmp:
        version = tmp / name / "1"
        version.mkdir(parents=True)
        if copy_export:
            log(f"copying the export into {out / name / '1' / 'export'}")
            shutil.copytree(export, version / "export", ignore=shutil.ignore_patterns(".*.lock"))
        config = {"format": FORMAT, "skipdeploy_version": __version__,
                  "export": "export" if copy_export else str(export.resolve()),
                  "engine": engine, "schedule": schedule.to_dict() if schedule is not None else None}
        (version / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(model_source(), version / "model.py")
        comment = (f"Written by `skipdeploy triton` (skipdeploy {__version__}) for the export\n"
                   f"{export.resolve()}; the engine's options are in 1/{CONFIG_FILE}.")
        (tmp / name / "config.pbtxt").write_text(config_pbtxt(name, instances, comment))
        move_into_place(tmp, out)
    return out / name
