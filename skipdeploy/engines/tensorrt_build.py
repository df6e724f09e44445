"""Build TensorRT engines from an export's ONNX graphs, and find the ones that fit this machine.

``build_engines(DIR)`` (``skipdeploy build-engines DIR``, or ``skipdeploy export --tensorrt``)
parses every graph with TensorRT's ONNX parser and builds one plan per graph with optimization
profiles over batch, new tokens and past length, sharing one timing cache (the decoder-layer
graphs have one structure, so the first layer's timings serve the rest). Written for the
TensorRT 10 and 11 Python API: named I/O tensors, strongly typed networks (TensorRT 11 has no
``BuilderFlag.FP16``: fp16 engines come from an fp16 export, ``skipdeploy export --dtype float16``).

Engines are cache entries, not artifacts: ``OUT/engines/<key>/`` where the key names the GPU,
its compute capability, the TensorRT version, the dtype and a hash of the profile; its
``engines.json`` records those and the sha256 of every ONNX graph it was built from. The runtime
uses an entry only when all of them match this machine and export; anything else is one clear
error that says how to rebuild. Plans are executable: build them yourself, never load plans
from an untrusted source.

Layer profiles never take an empty past: the runtime keeps one masked position in front of every
layer's cache (``PAST_PAD``), so the past length the engine sees is at least 1 (profile minimums
of 0 are a known TensorRT hazard). Profile 0 serves decode steps (one new token, any past up
to ``max_length``), profile 1 serves prefill (up to ``max_prompt`` new tokens after at most
``max_prompt`` earlier positions).

Errors: TensorRT's Python bindings raise ``RuntimeError`` from some calls (e.g.
``set_optimization_profile_async`` in 10.16 and 11.1, ``IOptimizationProfile.set_shape``) and
report others by returning False or None; ``trt_call`` wraps each TensorRT call so that a
``RuntimeError`` becomes one ``BackendError`` line (what was being done, TensorRT's first line,
what to do), and the callers keep checking what is returned. Anything else a call raises is a
bug here and passes through. Builds run on the device asked for (``device_id``, N or "cuda:N"):
its identity keys the engines, and it is CUDA's current device while TensorRT builds.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TypeVar

from .. import __version__
from ..errors import BackendError
from ..manifest import Manifest, read_manifest, sha256_file

ENGINES_DIR = "engines"
METADATA = "engines.json"
ENGINE_FORMAT = 1
PAST_PAD = 1  # masked cache positions in front of position 0 (see the module docstring)
DECODE_PROFILE, PREFILL_PROFILE = 0, 1
REBUILD = "skipdeploy build-engines {dir}"
SEE_MESSAGES = "see TensorRT's messages above"
_T = TypeVar("_T")


def trt_call(what: str | Callable[[], str], fix: str, call: Callable[..., _T], *args,
             errors: tuple = (RuntimeError,), **kwargs) -> _T:
    """``call(*args, **kwargs)``, a TensorRT binding; an exception in ``errors`` becomes one
    BackendError line: "TensorRT failed <what>: <its first line>; <fix>". Only the binding runs
    inside, so a bug of ours is never dressed up as TensorRT's. ``what`` may be a function, for
    calls made every step (its text is made only on failure)."""
    try:
        return call(*args, **kwargs)
    except errors as exc:
        lines = str(exc).strip().splitlines()
        first = lines[0].strip().rstrip(".") if lines else type(exc).__name__
        raise BackendError(f"TensorRT failed {what() if callable(what) else what}: {first}; {fix}") from None


def import_tensorrt():
    """The tensorrt module, or a one-line BackendError."""
    try:
        import tensorrt
    except ImportError:
        raise BackendError("TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU); "
                           "use --backend onnxruntime or torch here") from None
    return tensorrt


def require_tensorrt(device_id: int | str = 0) -> None:
    """Fail early, in one line, when TensorRT or the GPU (N or "cuda:N") is missing."""
    from .cuda_memory import gpu_identity, parse_cuda_device

    device_id = parse_cuda_device(device_id)
    import_tensorrt()
    gpu_identity(device_id)


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


@dataclass(frozen=True)
class Profile:
    """The shape ranges engines are built for (part of the engine key)."""

    max_batch: int
    opt_batch: int
    max_length: int   # positions (prompt + generated) a request may reach
    max_prompt: int   # longest prefill chunk, and the past a prefill chunk may follow
    opt_past: int
    opt_prompt: int

    @classmethod
    def for_manifest(cls, manifest: Manifest, max_batch: int | None = None, max_length: int | None = None,
                     max_prompt: int | None = None, opt_batch: int | None = None) -> "Profile":
        limits = manifest.limits
        max_batch = max_batch or int(limits.get("max_batch") or 64)
        max_length = max_length or min(int(limits.get("max_length") or manifest.model.max_positions), 2048)
        max_prompt = max_prompt or min(max_length, 256)
        opt_batch = opt_batch or min(max_batch, 8)
        for name, value in (("max batch", max_batch), ("max length", max_length), ("max prompt", max_prompt),
                            ("opt batch", opt_batch)):
            if value < 1:
                raise BackendError(f"TensorRT profile: {name} must be >= 1 (got {value})")
        if max_prompt > max_length or opt_batch > max_batch:
            raise BackendError("TensorRT profile: need max prompt <= max length and opt batch <= max batch")
        return cls(max_batch, opt_batch, max_length, max_prompt, opt_past=min(max_length - 1, 128),
                   opt_prompt=min(max_prompt, 64))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]

    def shapes(self, kind: str, spec) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
        """Per optimization profile: input name -> (min, opt, max) shapes."""
        E, H, D = spec.hidden_size, spec.kv_heads, spec.head_dim
        from ..families import for_model_type

        rope = for_model_type(spec.model_type).rope  # layers take positions, the embedding none
        b = (1, self.opt_batch, self.max_batch)
        if kind == "embed":
            t = (1, 1, self.max_prompt)
            names = ("input_ids",) if rope else ("input_ids", "position_ids")
            return [{name: tuple((b[i], t[i]) for i in range(3)) for name in names}]
        if kind == "head":
            return [{"hidden": tuple((b[i], E) for i in range(3))}]
        pad = PAST_PAD
        # decode: one new token after a past of pad .. max_length - 1 + pad positions
        past = (pad, self.opt_past + pad, self.max_length - 1 + pad)
        decode = {"hidden": tuple((b[i], 1, E) for i in range(3)),
                  "past_key": tuple((past[i], b[i], H, D) for i in range(3)),
                  "past_value": tuple((past[i], b[i], H, D) for i in range(3)),
                  "attention_bias": tuple((b[i], past[i] + 1) for i in range(3))}
        if rope:
            decode["position_ids"] = tuple((b[i], 1) for i in range(3))
        # prefill: up to max_prompt new tokens after at most max_prompt - 1 earlier positions
        new = (1, self.opt_prompt, self.max_prompt)
        past = (pad, pad, self.max_prompt - 1 + pad)
        prefill = {"hidden": tuple((b[i], new[i], E) for i in range(3)),
                   "past_key": tuple((past[i], b[i], H, D) for i in range(3)),
                   "past_value": tuple((past[i], b[i], H, D) for i in range(3)),
                   "attention_bias": tuple((b[i], past[i] + new[i]) for i in range(3))}
        if rope:
            prefill["position_ids"] = tuple((b[i], new[i]) for i in range(3))
        return [decode, prefill]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def engine_key(identity: dict, trt_version: str, dtype: str, profile: Profile) -> str:
    cc = identity["compute_capability"].replace(".", "")
    return f"{_slug(identity['gpu'])}_sm{cc}_trt{_slug(trt_version)}_{dtype}_{profile.digest()}"


def _graphs(manifest: Manifest) -> list[tuple[str, str, Path]]:
    """(plan name, kind, ONNX path) for every graph of the export."""
    jobs = [("embed", "embed", manifest.path("embed"))]
    jobs += [(f"layer_{i:02d}", "layer", manifest.layer_path(i)) for i in range(manifest.model.num_layers)]
    jobs.append(("head", "head", manifest.path("head")))
    return jobs


def graph_digest(manifest: Manifest, path: Path) -> str:
    """sha256 of the graph, folded with its external data files' when it has any (the shared
    ``embeddings.bin``): new weights in either must invalidate the engine."""
    shas = []
    for name in manifest.graph_files(path):
        info = manifest.files.get(name)
        shas.append(info["sha256"] if info else sha256_file(manifest.directory / name))
    return shas[0] if len(shas) == 1 else hashlib.sha256("".join(shas).encode()).hexdigest()


# -- finding engines --------------------------------------------------------------------------------
@dataclass
class EngineSet:
    directory: Path
    metadata: dict

    def plan(self, name: str) -> Path:
        return self.directory / self.metadata["plans"][name]["file"]

    @property
    def profile(self) -> Profile:
        return Profile(**self.metadata["profile"])


def _describe(meta: dict) -> str:
    return (f"{meta.get('gpu', '?')} (sm{str(meta.get('compute_capability', '?')).replace('.', '')}), "
            f"TensorRT {meta.get('tensorrt', '?')}, {meta.get('dtype', '?')}")


def find_engines(manifest: Manifest, identity: dict, trt_version: str, verify: bool = True) -> EngineSet:
    """The engine set under ``DIR/engines`` built for this GPU, TensorRT and export, or a
    BackendError naming what is there and how to rebuild."""
    root = manifest.directory / ENGINES_DIR
    rebuild = REBUILD.format(dir=manifest.directory)
    here = {"gpu": identity["gpu"], "compute_capability": identity["compute_capability"],
            "tensorrt": trt_version, "dtype": manifest.dtype}
    entries = []
    if root.is_dir():
        for meta_path in sorted(root.glob(f"*/{METADATA}")):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(meta, dict) and meta.get("format") == ENGINE_FORMAT:
                entries.append(EngineSet(meta_path.parent, meta))
    if not entries:
        raise BackendError(f"{manifest.directory} has no TensorRT engines: build them on this machine with "
                           f"`{rebuild}`")
    matching = [e for e in entries if all(str(e.metadata.get(k)) == str(v) for k, v in here.items())]
    if not matching:
        built = "; ".join(sorted({_describe(e.metadata) for e in entries}))
        raise BackendError(f"the TensorRT engines in {root} were built for {built}, not for this machine's "
                           f"{_describe(here)}: rebuild them with `{rebuild}`")
    chosen = max(matching, key=lambda e: e.metadata.get("created", ""))
    for name, kind, path in _graphs(manifest):
        plan = chosen.metadata.get("plans", {}).get(name)
        if plan is None or plan.get("onnx_sha256") != graph_digest(manifest, path):
            changed = " or ".join(manifest.graph_files(path))
            raise BackendError(f"the TensorRT engines in {chosen.directory} were built from other ONNX graphs "
                               f"({changed} differs): rebuild them with `{rebuild} --force`")
        plan_path = chosen.directory / plan["file"]
        if not plan_path.is_file() or (verify and sha256_file(plan_path) != plan.get("sha256")):
            raise BackendError(f"{plan_path} is missing or does not match {METADATA}: rebuild the engines with "
                               f"`{rebuild} --force`")
    return chosen


# -- building ---------------------------------------------------------------------------------------
def build_engines(directory: str | os.PathLike, *, max_batch: int | None = None, max_length: int | None = None,
                  max_prompt: int | None = None, opt_batch: int | None = None, force: bool = False,
                  device_id: int | str = 0, log: Callable[[str], None] | None = None) -> EngineSet:
    """Build (or find up to date) the engines of the export at ``directory`` for CUDA device
    ``device_id`` (N or "cuda:N") of this machine."""
    from .cuda_memory import gpu_identity, parse_cuda_device, use_device

    device_id = parse_cuda_device(device_id)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    manifest = read_manifest(directory, verify=True)
    if manifest.raw.get("quantization"):  # refused first: no TensorRT install makes it buildable
        raise BackendError(f"{manifest.directory} is a quantized export ({manifest.raw['quantization'].get('weights')} "
                           "weights for the CPU); build TensorRT engines from the float16 export instead")
    trt = import_tensorrt()
    identity = gpu_identity(device_id)
    profile = Profile.for_manifest(manifest, max_batch, max_length, max_prompt, opt_batch)
    if manifest.dtype != "float16":
        log("note: this export is float32, so its engines are float32; export with --dtype float16 for fp16 "
            "engines (TensorRT 11 takes precision from the graphs)")
    key = engine_key(identity, trt.__version__, manifest.dtype, profile)
    root = manifest.directory / ENGINES_DIR
    target = root / key
    if target.exists() and not force:
        try:
            found = find_engines(manifest, identity, trt.__version__)
            if found.directory == target:
                log(f"TensorRT engines in {target} are up to date")
                return found
        except BackendError:
            pass
    root.mkdir(exist_ok=True)
    tmp = root / f".{key}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with use_device(device_id):
            metadata = _build_all(trt, manifest, profile, identity, tmp,
                                  root / f"timing-{key.rsplit('_', 2)[0]}.cache", device_id, log)
        metadata["key"] = key
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EngineSet(target, metadata)


def _check_graph_ops(path: Path) -> None:
    """TensorRT converts ``If``/``Loop`` poorly: refuse them up front (our graphs have none)."""
    try:
        import onnx
    except ImportError:
        return
    model = onnx.load(str(path), load_external_data=False)
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in ("If", "Loop", "Scan")})
    if bad:
        raise BackendError(f"{path.name} holds {', '.join(bad)} nodes, which TensorRT does not convert well; "
                           "re-export it with this skipdeploy")


def _build_all(trt, manifest: Manifest, profile: Profile, identity: dict, out: Path, timing_path: Path,
               device_id: int, log: Callable[[str], None]) -> dict:
    on = f"on cuda:{device_id} ({identity['gpu']})"
    logger = trt.Logger(trt.Logger.WARNING)
    # Builder and OnnxParser are pybind factories: a null object from TensorRT is a TypeError there.
    builder = trt_call(f"to create a builder {on}", "check the NVIDIA driver and that TensorRT supports this GPU",
                       trt.Builder, logger, errors=(RuntimeError, TypeError))
    flags = 0
    if trt_major(trt) < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # TensorRT 10: ask for strong typing (precision from the graph's types); 11 is always strongly typed.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    timing_cache = None
    plans = {}
    for name, kind, path in _graphs(manifest):
        _check_graph_ops(path)
        start = time.perf_counter()
        reexport = f"re-export {manifest.directory} with this skipdeploy, or {SEE_MESSAGES}"
        network = trt_call(f"to create a network for {path.name}", SEE_MESSAGES, builder.create_network, flags)
        parser = trt_call(f"to create an ONNX parser for {path.name}", SEE_MESSAGES, trt.OnnxParser, network, logger,
                          errors=(RuntimeError, TypeError))
        if not trt_call(f"to parse {path.name}", reexport, parser.parse_from_file, str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse {path.name}: {errors or 'unknown error'}")
        config = trt_call("to create a builder config", SEE_MESSAGES, builder.create_builder_config)
        if manifest.dtype == "float32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # float32 means float32 (TF32 would differ by ~1e-3)
        stale_cache = f"delete {timing_path} and build again"
        if timing_cache is None:
            data = timing_path.read_bytes() if timing_path.is_file() else b""
            timing_cache = trt_call(f"to read the timing cache {timing_path}", stale_cache,
                                    config.create_timing_cache, data)
            if timing_cache is None:
                raise BackendError(f"TensorRT cannot read the timing cache {timing_path}; {stale_cache}")
        if not trt_call(f"to use the timing cache {timing_path}", stale_cache,
                        config.set_timing_cache, timing_cache, False):
            raise BackendError(f"TensorRT refused the timing cache {timing_path}; {stale_cache}")
        for number, shapes in enumerate(profile.shapes(kind, manifest.model)):
            opt_profile = trt_call("to create an optimization profile", SEE_MESSAGES,
                                   builder.create_optimization_profile)
            for tensor, (lo, opt, hi) in shapes.items():
                trt_call(f"to set profile {number} of {path.name} for {tensor} to {lo} .. {hi}",
                         "pass other --max-batch/--max-length/--max-prompt", opt_profile.set_shape, tensor, lo, opt, hi)
            if trt_call(f"to add profile {number} of {path.name}", SEE_MESSAGES,
                        config.add_optimization_profile, opt_profile) < 0:
                raise BackendError(f"TensorRT refused optimization profile {number} of {path.name}; {SEE_MESSAGES}")
        serialized = trt_call(f"to build an engine for {path.name} {on}", SEE_MESSAGES,
                              builder.build_serialized_network, network, config)
        if serialized is None:
            raise BackendError(f"TensorRT could not build an engine for {path.name} {on} ({SEE_MESSAGES})")
        plan_file = f"{name}.plan"
        with open(out / plan_file, "wb") as fh:
            fh.write(serialized)
        plans[name] = {"file": plan_file, "onnx": path.name, "onnx_sha256": graph_digest(manifest, path),
                       "sha256": sha256_file(out / plan_file), "size": (out / plan_file).stat().st_size,
                       "profiles": len(profile.shapes(kind, manifest.model))}
        log(f"built {plan_file} in {time.perf_counter() - start:.1f} s")
    if timing_cache is not None:
        tmp = timing_path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(trt_call("to save the timing cache", SEE_MESSAGES, timing_cache.serialize))
        os.replace(tmp, timing_path)
    return {"format": ENGINE_FORMAT, **identity, "tensorrt": trt.__version__, "dtype": manifest.dtype,
            "profile": asdict(profile), "past_pad": PAST_PAD, "plans": plans, "skipdeploy": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


__all__ = ["EngineSet", "Profile", "build_engines", "engine_key", "find_engines", "import_tensorrt",
           "require_tensorrt", "trt_call"]
