"""Tiny random exports without torch, for an install with the runtime's extras only.

The exporter reads checkpoints through transformers (torch), but it builds and writes every
graph from numpy weights (``exporter.writer``, torch-free). Here the weights are drawn with numpy,
in the layouts the family's ``*_weights`` methods return, and written by that same writer. What
is skipped is the per-graph check
against transformers, so the manifest's ``check`` records no errors, and such an export serves
to compare the runtime with itself (doors against ``Runtime.generate``), never to check the
model's math. ``test_torch_free.py`` checks, where torch is installed, that fed a checkpoint's
weights this writes the very files ``skipdeploy.export`` writes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx

import skipdeploy
from skipdeploy.families import for_model_type
from skipdeploy.exporter import writer
from skipdeploy.manifest import read_manifest, write_manifest
from skipdeploy.random_checkpoint import SHAPES, _train_bpe
from skipdeploy.schedule import LayerSchedule, Schedule

# What the config classes of transformers fill in for the keys ``SHAPES`` leaves out, and the
# special tokens ``make_checkpoint`` gives each family.
_CONFIG_DEFAULTS = {
    "opt": dict(activation_function="relu", do_layer_norm_before=True, bos_token_id=2, eos_token_id=2,
                pad_token_id=1),
    "llama": dict(hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=None, rms_norm_eps=1e-6),
}


def spec_of(shape: str, **overrides):
    """The ModelSpec of ``random_checkpoint.SHAPES[shape]`` (with ``overrides``, config keys as in
    ``make_checkpoint``), made by the family from a config."""
    params = {**SHAPES[shape], **overrides}
    model_type = params.pop("family", "opt")
    defaults = _CONFIG_DEFAULTS["opt" if model_type == "opt" else "llama"]
    config = SimpleNamespace(model_type=model_type, **{**defaults, **params})
    return for_model_type(model_type).spec(config, f"numpy:{shape}")


def random_weights(spec, seed: int = 0, weight_scale: float = 3.0) -> dict:
    """``{"embed": {...}, "layers": [{...}, ...], "head": {...}}``, named and laid out as the
    family's ``embed_weights``/``layer_weights``/``head_weights`` give them ([in, out]; a tied
    head is the embedding matrix itself). Matrices are normal(0, 0.02 * weight_scale), as
    transformers initialises them and ``make_checkpoint`` scales them; norms and biases are
    perturbed from 1 and 0 so that none of them is a no-op."""
    rng = np.random.default_rng(seed)
    E, Ew, V, F = spec.hidden_size, spec.word_embed_proj_dim, spec.vocab_size, spec.ffn_dim
    Dq, Dkv = spec.attention_dim, spec.kv_dim

    def matrix(*shape):
        return (rng.standard_normal(shape) * 0.02 * weight_scale).astype(np.float32)

    def vector(n, around=0.0):
        return (around + 0.1 * rng.standard_normal(n)).astype(np.float32)

    embed_tokens = matrix(V, Ew)
    if spec.model_type == "opt":
        embed = {"embed_tokens.weight": embed_tokens, "embed_positions.weight": matrix(spec.max_positions + 2, E),
                 "project_in.weight": matrix(Ew, E) if Ew != E else None}
        layers = [{"ln_attn.weight": vector(E, 1.0), "ln_attn.bias": vector(E),
                   "qkv.weight": matrix(E, 3 * E), "qkv.bias": vector(3 * E),
                   "out_proj.weight": matrix(E, E), "out_proj.bias": vector(E),
                   "ln_ffn.weight": vector(E, 1.0), "ln_ffn.bias": vector(E),
                   "fc1.weight": matrix(E, F), "fc1.bias": vector(F), "fc2.weight": matrix(F, E), "fc2.bias": vector(E)}
                  for _ in range(spec.num_layers)]
        head = {"lm_head.weight": embed_tokens, "project_out.weight": matrix(E, Ew) if Ew != E else None}
        if spec.layer_norm == "pre":  # OPT's post-LN models (OPT-350m) have no final norm
            head["final_layer_norm.weight"], head["final_layer_norm.bias"] = vector(E, 1.0), vector(E)
        return {"embed": embed, "layers": layers, "head": head}
    if (spec.rope or {}).get("rope_type", "default") != "default":
        raise ValueError(f"{spec.rope['rope_type']} RoPE: only the default frequencies are drawn here")
    D = spec.head_dim
    inv_freq = (1.0 / spec.rope["rope_theta"] ** (np.arange(0, D, 2) / D)).astype(np.float32)
    qkv_bias = spec.model_type == "qwen2"  # Qwen2's q/k/v projections have biases; Llama's and Mistral's none
    layers = [{"ln_attn.weight": vector(E, 1.0), "qkv.weight": matrix(E, Dq + 2 * Dkv),
               "qkv.bias": vector(Dq + 2 * Dkv) if qkv_bias else None,
               "out_proj.weight": matrix(Dq, E), "out_proj.bias": None, "ln_ffn.weight": vector(E, 1.0),
               "gate_up.weight": matrix(E, 2 * F), "gate_up.bias": None, "down.weight": matrix(F, E),
               "down.bias": None, "rope.inv_freq": inv_freq}
              for _ in range(spec.num_layers)]
    head = {"lm_head.weight": embed_tokens, "final_layer_norm.weight": vector(E, 1.0)}
    return {"embed": {"embed_tokens.weight": embed_tokens}, "layers": layers, "head": head}


def tokenizer(spec):
    """The byte-level BPE ``make_checkpoint`` trains for the family, as the export stores it."""
    from tokenizers import processors

    if spec.model_type == "opt":  # <s>=0, <pad>=1, </s>=2 (BOS and EOS), <unk>=3
        tok = _train_bpe(min(spec.vocab_size, 512), ["<s>", "<pad>", "</s>", "<unk>"])
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    else:  # <unk>=0, <s>=1 (BOS), </s>=2 (EOS)
        tok = _train_bpe(min(spec.vocab_size, 512), ["<unk>", "<s>", "</s>"], qwen2_split=True)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


class _Given:
    """``random_weights``' dict as the writer's weight source."""

    def __init__(self, weights: dict) -> None:
        self.weights = weights

    def embed(self) -> dict:
        return self.weights["embed"]

    def layer(self, index: int) -> dict:
        return self.weights["layers"][index]

    def head(self) -> dict:
        return self.weights["head"]


def write_export(out: str | Path, spec, weights: dict, *, tokenizer=None, schedule: LayerSchedule | None = None,
                 dtype: str = "float32", opset: int = 17, max_batch: int = 64, max_length: int | None = None,
                 source: str = "numpy"):
    """Write ``weights`` (``random_weights``' form) as an export at ``out`` with the exporter's own
    writer (``exporter.writer``), less its check against transformers; returns the Manifest."""
    out = Path(out)
    out.mkdir(parents=True)
    _, data = writer.write_graphs(out, spec, _Given(weights), dtype, opset, progress=False)
    if tokenizer is not None:
        tokenizer.save(str(out / writer.TOKENIZER_FILE))
    write_manifest(out, writer.manifest_body(
        out, spec, dtype=dtype, opset=opset, schedule=schedule or Schedule.full(spec.num_layers), max_batch=max_batch,
        max_length=max_length or writer.default_max_length(spec), data=data,
        tokenizer=writer.TOKENIZER_FILE if tokenizer is not None else None, errors={}, tools=_tool_versions(),
        source=source))
    manifest = read_manifest(out, verify=True)
    manifest.directory = out
    return manifest


def random_export(out: str | Path, shape: str, seed: int = 0, weight_scale: float = 3.0, *,
                  overrides: dict | None = None, **options):
    """``write_export`` of random weights of ``SHAPES[shape]`` (with config ``overrides``) with the
    family's test tokenizer."""
    spec = spec_of(shape, **(overrides or {}))
    return write_export(out, spec, random_weights(spec, seed, weight_scale), tokenizer=tokenizer(spec),
                        source=f"numpy:{shape} seed {seed}", **options)


def _tool_versions() -> dict[str, str]:
    import onnxruntime

    return {"skipdeploy": skipdeploy.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}
