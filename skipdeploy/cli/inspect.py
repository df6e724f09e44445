"""``skipdeploy inspect``: summarize an export directory and check its files."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import format_size, json_option


@click.command("inspect")
@click.argument("directory", metavar="EXPORT", type=click.Path(path_type=Path))
@json_option("the manifest")
@click.option("--no-verify", is_flag=True, help="Check file sizes only, not sha256 checksums.")
def command(directory: Path, as_json: bool, no_verify: bool) -> None:
    """Summarize an export directory (and verify its files' checksums)."""
    from ..manifest import read_manifest
    from ..numerics import itemsize

    m = read_manifest(directory, verify=not no_verify)
    if as_json:
        click.echo(json.dumps(m.raw, indent=2))
        return
    s = m.model
    check = m.raw.get("check", {}).get("max_abs_error") or {}
    rows = [
        ("export", f"{m.directory} (format {m.raw['format_version']}, skipdeploy {m.tools.get('skipdeploy', '?')})"),
        ("model", f"{s.model_type}, {s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} heads x {s.head_dim}"
                  f"{f' ({s.kv_heads} key/value heads)' if s.kv_heads != s.num_heads else ''}, ffn {s.ffn_dim}, "
                  f"vocab {s.vocab_size}, {s.max_positions} positions, "
                  f"{_positions(s)}"),
        ("KV cache", f"{format_size(2 * s.num_layers * s.kv_dim * itemsize(m.dtype))} per token and row with every "
                     "layer run (a schedule's skipped layers hold none)"),
        ("graphs", f"{m.dtype}, opset {m.opset}, KV {m.raw.get('kv_contract')} ({m.raw.get('kv_layout')})"),
        *([("weights", _describe_quantization(m.quantization)), ("bytes", _quantized_bytes(m)),
           ("error", _graph_errors(m.quantization))] if m.quantization else []),
        ("schedule", m.schedule.describe()),
        ("limits", f"max batch {m.limits.get('max_batch')}, max length {m.limits.get('max_length')}"),
        ("tokenizer", m.raw.get("tokenizer") or "none (use --input-ids)"),
        ("files", f"{len(m.files)} files, {format_size(m.total_bytes)} "
                  f"({'sizes checked' if no_verify else 'sha256 verified'})"),
        ("check", (f"max abs error vs PyTorch {max(check.values()):.1e}"
                   f"{' (float32 graphs, before quantization)' if m.quantization else ''}") if check else "not run"),
        ("source", m.source),
    ]
    for key, value in rows:
        click.echo(f"{key:<10} {value}")


def _positions(s) -> str:
    if s.rope:
        scaling = s.rope.get("rope_type", "default")
        theta = s.rope.get("rope_theta")
        return (f"RoPE theta {theta:g}{'' if scaling == 'default' else f' ({scaling} scaling)'}, "
                f"RMSNorm eps {s.norm_eps:g}")
    return f"learned positions, {s.layer_norm}-LayerNorm"


def _describe_quantization(q: dict) -> str:
    errors = q.get("max_error_vs_float") or {}
    worst = f"; max error vs float32 {max(errors.values()):.1e}" if errors else ""
    source = f"; from {q['source']}" if q.get("source") else ""
    if "block_size" in q:  # MatMulNBits: int4, int8
        how = (f"blocks of {q['block_size']}, {'symmetric' if q.get('symmetric', True) else 'with zero points'}, "
               f"accuracy_level {q.get('accuracy_level', 0)}")
    else:  # int8-dynamic (recorded as "int8" before issue 18)
        how = f"{'per channel' if q.get('per_channel') else 'per tensor'}, activations per call"
    from ..exporter.quantize import scheme_of

    return f"{scheme_of(q)} in {len(q.get('graphs', []))} graphs ({how}){worst}{source}"


def _quantized_bytes(m) -> str:
    """The quantized graphs' bytes (weights and all), next to the float32 bytes they replaced
    (recorded since int4; older int8, now int8-dynamic, manifests give the quantized side only)."""
    q = m.quantization
    now = sum(m.files[g]["size"] for g in q.get("graphs", []) if g in m.files)
    before = (q.get("weight_bytes") or {}).get("float32")
    ratio = f"; float32: {format_size(before)}, {before / now:.1f}x more" if before and now else ""
    return f"{format_size(now)} in the quantized layer and head graphs{ratio}"


def _graph_errors(q: dict) -> str:
    errors = q.get("max_error_vs_float") or {}
    if not errors:
        return "not recorded"
    return "vs float32, per graph: " + ", ".join(f"{g.removesuffix('.onnx')} {e:.1e}" for g, e in errors.items())
