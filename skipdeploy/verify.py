"""``skipdeploy verify``: an export's runtime against the PyTorch reference.

Per graph: the backend's embed, layer and head outputs (hidden states and the keys and values
written into the cache) against the torch reference backend on the same inputs, or, with a
checkpoint, against the transformers modules themselves. Per schedule: logits and greedy tokens
of a whole generation, for the full schedule and the export's default (transformers ``generate``
is the reference for the full schedule when a checkpoint is given).

A quantized (int8, int4 or int8-dynamic) export is checked against the float32 export it was quantized from,
with tolerances sized for its weights; tokens are then compared where the reference's top-2
margin exceeds twice the measured logits error (where rounding cannot decide the argmax).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, SkipDeployError
from .manifest import MANIFEST, Manifest, read_manifest
from .numerics import GRAPH_TOLERANCE, LOGITS_TOLERANCE, MASK_VALUE, numpy_dtype, relative_error
from .runtime import load
from .schedule import Schedule

NEAR_TIE = 1e-3
# int4 weights (MatMulNBits, blocks of 32, int8 activations): one rounding step is 1/8 of a
# block's largest |weight|, so a graph's outputs move ~10% of their scale (int8: ~1%). Measured
# by verify (relative to max(1, |reference|), as every tolerance here; seeds 0-5): per graph
# 0.08-0.18 on the tiny test exports, 0.08-0.21 on the random opt-125m-shaped one (its layer 0
# the worst); logits over a generation 0.10-0.33 (tiny, tiny-post-ln) and 0.26-0.30 (opt-125m
# shape). The tolerances leave 1.5x over those; one matrix with its scales doubled gives 0.65.
INT4_GRAPH_TOLERANCE = 0.3
INT4_LOGITS_TOLERANCE = 0.5
# int8 weights (MatMulNBits, blocks of 32, int8 activations): one step is 1/128 of a block's largest
# |weight|. Measured by verify: per graph 0.009-0.014 on the tiny test exports (seeds 0-3) and
# 0.015 on the random opt-125m-shaped one (seeds 0-1), logits over a generation 0.008-0.025 and
# 0.024-0.026 (int8-dynamic on the tiny ones: 0.010-0.016 and 0.009-0.036); 2x over those.
INT8_GRAPH_TOLERANCE = 3e-2
INT8_LOGITS_TOLERANCE = 5e-2
# int8-dynamic keeps the tolerances int8 had before issue 18 (numerics: "int8").
GRAPH_TOLERANCES = {**GRAPH_TOLERANCE, "int8-dynamic": GRAPH_TOLERANCE["int8"], "int8": INT8_GRAPH_TOLERANCE,
                    "int4": INT4_GRAPH_TOLERANCE}
LOGITS_TOLERANCES = {**LOGITS_TOLERANCE, "int8-dynamic": LOGITS_TOLERANCE["int8"], "int8": INT8_LOGITS_TOLERANCE,
                     "int4": INT4_LOGITS_TOLERANCE}


@dataclass
class Check:
    name: str
    error: float
    tolerance: float
    reference: str
    tokens: str = ""  # "agreeing/compared" for decode checks

    @property
    def ok(self) -> bool:
        agree, _, total = self.tokens.partition("/")
        return self.error <= self.tolerance and agree == total


@dataclass
class Report:
    directory: str
    backend: str
    graphs: list[Check] = field(default_factory=list)
    decode: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.graphs + self.decode)

    def to_dict(self) -> dict:
        return {"directory": self.directory, "backend": self.backend, "ok": self.ok,
                "graphs": [{**asdict(c), "ok": c.ok} for c in self.graphs],
                "decode": [{**asdict(c), "ok": c.ok} for c in self.decode]}

    def table(self) -> str:
        lines = [f"{'graph':<16} {'max error':>13} {'tolerance':>10}  reference        result"]
        for c in self.graphs:
            lines.append(f"{c.name:<16} {c.error:>13.2e} {c.tolerance:>10.0e}  {c.reference:<16} "
                         f"{'ok' if c.ok else 'FAIL'}")
        lines.append("")
        lines.append(f"{'schedule':<16} {'logits error':>13} {'tolerance':>10}  reference        tokens    result")
        for c in self.decode:
            lines.append(f"{c.name:<16} {c.error:>13.2e} {c.tolerance:>10.0e}  {c.reference:<16} "
                         f"{c.tokens:<9} {'ok' if c.ok else 'FAIL'}")
        return "\n".join(lines)


def verify(directory: str | Path, model: str | Path | None = None, backend: str = "onnxruntime",
           max_new_tokens: int = 16, seed: int = 0, reference: str | Path | None = None) -> Report:
    """``reference``: the float32 export a quantized export came from [default: the one its manifest
    names, or a temporary export of ``model``]."""
    try:
        import torch  # noqa: F401  (the reference backend needs it)
    except ImportError:
        raise SkipDeployError("verify compares against PyTorch: pip install 'skipdeploy[export]'") from None
    runtime = load(directory, backend=backend)
    manifest = runtime.manifest
    from .exporter.quantize import scheme_of

    precision = scheme_of(manifest.quantization) or manifest.dtype
    with _float_reference(manifest, reference, model) as float_directory:
        return _verify(runtime, backend, load(float_directory, backend="torch", check_files=False), precision,
                       model, max_new_tokens, seed)


@contextlib.contextmanager
def _float_reference(manifest: Manifest, given: str | Path | None, model: str | Path | None):
    """The export whose float weights the torch reference backend runs."""
    if not manifest.quantization:
        if given is not None:
            raise InputError("--reference is for quantized exports; this one has float weights")
        yield manifest.directory
        return
    from .exporter.quantize import is_quantized_from

    recorded = manifest.quantization.get("source")
    if given is not None:
        source = read_manifest(given, verify=False)
        unrecorded = "source_manifest_sha256" not in manifest.quantization  # from `export --quantize`
        if not (is_quantized_from(manifest, source) or (unrecorded and source.model == manifest.model)):
            raise InputError(f"{manifest.directory} was not quantized from {given} (its manifest differs)")
        yield Path(given)
        return
    if recorded and (Path(recorded) / MANIFEST).is_file() and is_quantized_from(manifest, read_manifest(recorded)):
        yield Path(recorded)
        return
    if model is None:
        where = f"{recorded}, missing or changed" if recorded else "not recorded"
        raise InputError(f"{manifest.directory} has {manifest.quantization.get('weights')} weights: verify compares "
                         f"it with the float32 export it was quantized from ({where}); "
                         "pass that export with --reference DIR, or the checkpoint with --model")
    from .exporter.export import export

    with tempfile.TemporaryDirectory(prefix="skipdeploy-verify-") as tmp:
        print(f"exporting a float32 reference from {model}", file=sys.stderr)
        yield export(model, Path(tmp) / "float32", check_graphs=False, progress=False, log=lambda m: None).directory


def _verify(runtime, backend: str, reference, precision: str, model, max_new_tokens: int, seed: int) -> Report:
    manifest = runtime.manifest
    report = Report(str(manifest.directory), backend)
    hf_model = _hf_model(model, manifest) if model is not None else None
    tol = GRAPH_TOLERANCES[precision]
    if backend == "tensorrt":  # each engine against onnxruntime running the same ONNX graph
        report.graphs = _engines_against_onnxruntime(runtime.engine, seed, tol)
    elif hf_model is not None and backend == "onnxruntime":
        report.graphs = _graphs_against_transformers(manifest, hf_model, tol, seed)
    else:
        report.graphs = _graphs_against_reference(runtime.engine, reference.engine, manifest, tol, seed)

    prompts = _prompts(manifest, seed)
    schedules = [("full", Schedule.full(manifest.model.num_layers)), ("default", manifest.schedule)]
    if manifest.schedule.is_full():
        try:
            schedules[1] = ("skip 2x", Schedule.target_speedup(manifest.model.num_layers, 2.0,
                                                               decay_tokens=max_new_tokens))
        except SkipDeployError:
            schedules.pop()
    for label, sched in schedules:
        got = runtime.generate(prompts, max_new_tokens, sched, output_logits=True, eos_token_id=None)
        if label == "full" and hf_model is not None:
            want_tokens, want_logits = _hf_generate(hf_model, prompts, max_new_tokens, manifest.model.pad_id)
            ref_name = "transformers"
        else:
            want = reference.generate(prompts, max_new_tokens, sched, output_logits=True, eos_token_id=None)
            want_tokens, want_logits, ref_name = want.tokens, want.logits, "torch backend"
        report.decode.append(_compare_decode(label, got, want_tokens, want_logits, LOGITS_TOLERANCES[precision],
                                             ref_name))
    return report


def _graphs_against_reference(engine, ref, manifest: Manifest, tol: float, seed: int) -> list[Check]:
    """Both engines on identical inputs: a 3-token chunk from an empty past, then 2 more tokens."""
    spec = manifest.model
    rng = np.random.default_rng(seed)
    B, T1, T2 = 2, 3, 2
    ids = rng.integers(0, spec.vocab_size, (B, T1 + T2))
    pos = np.tile(np.arange(T1 + T2), (B, 1))
    checks = []
    hidden = ref.to_numpy(ref.embed(ids, pos))
    checks.append(Check("embed.onnx", relative_error(engine.to_numpy(engine.embed(ids, pos)), hidden), tol,
                        "torch backend"))
    bias = np.zeros((B, T1 + T2), np.float32)
    bias[1, 0] = MASK_VALUE  # row 1 is left-padded by one position
    cache, ref_cache = engine.allocate([T1 + T2] * spec.num_layers, B), ref.allocate([T1 + T2] * spec.num_layers, B)
    x = hidden
    for layer in range(spec.num_layers):
        errors, outs = [], []
        for start, stop in ((0, T1), (T1, T1 + T2)):
            chunk = np.ascontiguousarray(x[:, start:stop])
            b = np.ascontiguousarray(bias[:, :stop])
            p = np.ascontiguousarray(pos[:, start:stop])
            got = engine.to_numpy(engine.layer(layer, engine.from_numpy(chunk), cache, start, b, p))
            want = ref.to_numpy(ref.layer(layer, ref.from_numpy(chunk), ref_cache, start, b, p))
            errors.append(relative_error(got, want))
            outs.append(want)
        for buf, ref_buf in ((cache.keys, ref_cache.keys), (cache.values, ref_cache.values)):
            errors.append(relative_error(engine.to_numpy(buf[layer]), ref.to_numpy(ref_buf[layer])))
        checks.append(Check(f"layer_{layer:02d}.onnx", max(errors), tol, "torch backend"))
        x = np.concatenate(outs, axis=1)
    checks.append(Check("head.onnx", relative_error(engine.head(engine.from_numpy(x)), ref.head(ref.from_numpy(x))),
                        tol, "torch backend"))
    engine.release(cache)
    ref.release(ref_cache)
    return checks


def _engines_against_onnxruntime(engine, seed: int, tolerance: float, batch: int = 2) -> list[Check]:
    """Each graph of ``engine`` (TensorRT) against onnxruntime (CPU) running the same ONNX on the
    same random inputs: a prefill chunk from an empty cache, then a decode step, through the
    backend's own binding code (cache slots, the masked past slot). The worst output per graph."""
    import onnxruntime as ort

    manifest = engine.manifest
    spec, rng = manifest.model, np.random.default_rng(seed)
    E, T = spec.hidden_size, 3
    dtype = numpy_dtype(manifest.dtype)
    sessions = {name: ort.InferenceSession(str(manifest.directory / entry["file"]), providers=["CPUExecutionProvider"])
                for name, entry in [("embed", manifest.graphs["embed"]), ("head", manifest.graphs["head"])]
                + [(f"layer_{i:02d}", e) for i, e in enumerate(manifest.graphs["layers"])]}

    def check(graph: str, got: list, want: list) -> Check:
        return Check(f"{graph}.onnx", max(relative_error(engine.to_numpy(g), w) for g, w in zip(got, want)),
                     tolerance, "onnxruntime")

    ids = rng.integers(0, spec.vocab_size, (batch, T))
    pos = np.tile(np.arange(T), (batch, 1))
    embed_feeds = {"input_ids": ids, "position_ids": pos}
    checks = [check("embed", [engine.embed(ids, pos)],
                    sessions["embed"].run(None, {k: embed_feeds[k] for k in manifest.graphs["embed"]["inputs"]}))]
    for layer in range(spec.num_layers):
        name, worst = f"layer_{layer:02d}", None
        cache = engine.allocate([T + 1] * spec.num_layers, batch)
        for past, new in ((0, T), (T, 1)):  # a prefill chunk, then a decode step
            x = (rng.standard_normal((batch, new, E)) * 0.5).astype(np.float32)
            bias = np.zeros((batch, past + new), np.float32)
            bias[1, 0] = MASK_VALUE  # row 1 is left-padded by one position
            positions = np.tile(np.arange(past, past + new), (batch, 1))
            out = engine.layer(layer, engine.from_numpy(x), cache, past, bias, positions)
            keys, values = engine.to_numpy(cache.keys[layer]), engine.to_numpy(cache.values[layer])
            feeds = {"hidden": x.astype(dtype), "past_key": keys[:past].astype(dtype), "position_ids": positions,
                     "past_value": values[:past].astype(dtype), "attention_bias": bias}
            want = sessions[name].run(None, {k: feeds[k] for k in manifest.graphs["layers"][layer]["inputs"]})
            case = check(name, [out, keys[past:past + new], values[past:past + new]], want)
            worst = case if worst is None or case.error > worst.error else worst
        engine.release(cache)
        checks.append(worst)
    x = (rng.standard_normal((batch, 1, E)) * 0.5).astype(np.float32)
    checks.append(check("head", [engine.head(engine.from_numpy(x))],
                        sessions["head"].run(None, {"hidden": np.ascontiguousarray(x[:, -1]).astype(dtype)})))
    return checks


def _graphs_against_transformers(manifest: Manifest, hf_model, tol: float, seed: int) -> list[Check]:
    from .exporter import check

    spec, dtype = manifest.model, manifest.dtype
    checks = [Check("embed.onnx", check.check_embed(manifest.path("embed"), hf_model, spec, seed), tol, "transformers")]
    for layer in range(spec.num_layers):
        err = check.check_layer(manifest.layer_path(layer), hf_model, layer, spec, dtype, seed + layer)
        checks.append(Check(f"layer_{layer:02d}.onnx", err, tol, "transformers"))
    checks.append(Check("head.onnx", check.check_head(manifest.path("head"), hf_model, spec, dtype, seed), tol,
                        "transformers"))
    return checks


def _hf_model(model, manifest: Manifest):
    from .exporter.checkpoint import load_model

    spec, hf_model = load_model(model)
    shape = ("model_type", "num_layers", "hidden_size", "num_heads", "kv_heads", "head_dim", "ffn_dim", "vocab_size")
    differ = [f"{k} {getattr(spec, k)} vs {getattr(manifest.model, k)}" for k in shape
              if getattr(spec, k) != getattr(manifest.model, k)]
    if differ:
        raise InputError(f"{model} is not the checkpoint {manifest.directory} was exported from: {', '.join(differ)}")
    return hf_model


def _prompts(manifest: Manifest, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    spec = manifest.model
    first = spec.bos_token_id if spec.bos_token_id is not None else 0
    return [[first, *rng.integers(4, spec.vocab_size, n).tolist()] for n in (5, 1, 8)]


def _hf_generate(model, prompts, max_new_tokens: int, pad: int):
    import torch

    B, Tp = len(prompts), max(map(len, prompts))
    ids = torch.full((B, Tp), pad)
    mask = torch.zeros(B, Tp, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, Tp - len(p):] = torch.tensor(p)
        mask[r, Tp - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, Tp:].tolist(), [s.float().numpy() for s in out.logits]


def _compare_decode(label: str, got, want_tokens, want_logits, tol: float, reference: str) -> Check:
    """Logits are compared while both sides have fed the same tokens; tokens up to the first
    step whose reference top-2 gap is a near-tie: under ``NEAR_TIE``, or under twice that step's
    logits error, where the two argmaxes may differ without either side being wrong."""
    error, agree, compared = 0.0, 0, 0
    for row in range(len(want_tokens)):
        for step, want in enumerate(want_tokens[row]):
            top2 = np.sort(want_logits[step][row])[-2:]
            step_error = float(np.max(np.abs(np.asarray(got.logits[step][row], np.float32) - want_logits[step][row])))
            error = max(error, relative_error(got.logits[step][row], want_logits[step][row]))
            if top2[1] - top2[0] < max(NEAR_TIE, 2 * step_error):
                break
            compared += 1
            if step >= len(got.tokens[row]) or got.tokens[row][step] != want:
                break
            agree += 1
    return Check(label, error, tol, reference, f"{agree}/{compared}")


__all__ = ["Check", "Report", "verify"]
