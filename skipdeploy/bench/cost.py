"""What a decode step costs, from the model's shapes and the export's files.

Cost model (multiply-adds per generated token and row; E hidden, F ffn, V vocabulary, W
word-embedding width, S keys attended, A = heads x head_dim, K = kv heads x head_dim, M = 2 for
an MLP of two matrices (OPT) and 3 for a gated one (the Llama family)):
    embed  = E*W if W != E (project_in) else 0        (the lookups are free)
    layer  = 2*E*A + 2*E*K + M*E*F + 2*S*A            (q and out, k and v projections; the MLP;
                                                       scores and weighted values)
    head   = W*V + E*W if W != E (project_out)        (final LayerNorm not counted)
A step that runs the layer set ``Ls`` costs embed + sum over Ls of layer + head, and a schedule's
cost-model speedup is the full schedule's cost over its own, summed over the decode steps
measured. For an opt-125m shape the head (38.6 M) is 5.5 layers' worth (7.1 M each), so halving
the layers is a 1.53x speedup by the cost model, not 2x; the layer speedup (all layers over the
mean layers run, ``LayerSchedule.layer_speedup``) is reported next to it.

Bytes: what a decode step reads, the weights of the layers it runs and of the head plus the keys
and values it attends to; against the measured memory bandwidth it gives a time floor.
"""

from __future__ import annotations

from ..manifest import Manifest, ModelSpec
from ..numerics import itemsize
from ..schedule import LayerSchedule


def cost_model(spec: ModelSpec) -> dict[str, int]:
    """Multiply-adds per row of one decode step, by component; ``layer`` excludes attention
    (``attention_per_key`` times the keys attended is added per layer)."""
    from ..families import for_model_type

    E, F, V, W = spec.hidden_size, spec.ffn_dim, spec.vocab_size, spec.word_embed_proj_dim
    A, K = spec.attention_dim, spec.kv_dim
    mlp = for_model_type(spec.model_type).MLP_MATRICES
    return {"embed": E * W if W != E else 0, "layer": 2 * E * A + 2 * E * K + mlp * E * F,
            "attention_per_key": 2 * A, "head": W * V + (E * W if W != E else 0)}


def step_macs(spec: ModelSpec, layers: int, keys: int) -> int:
    """Multiply-adds per row of a decode step that runs ``layers`` layers over ``keys`` keys."""
    c = cost_model(spec)
    return c["embed"] + layers * (c["layer"] + c["attention_per_key"] * keys) + c["head"]


def cost_model_speedup(spec: ModelSpec, schedule: LayerSchedule, prompt_length: int, new_tokens: int) -> float:
    """The full schedule's cost over ``schedule``'s, over the decode steps 0 .. new_tokens-2 (the
    forwards that produce generated tokens 1 .. new_tokens-1; token 0 comes from the prefill)."""
    steps = range(max(1, new_tokens - 1))
    full = sum(step_macs(spec, spec.num_layers, prompt_length + s + 1) for s in steps)
    mine = sum(step_macs(spec, schedule.count(s), prompt_length + s + 1) for s in steps)
    return full / mine


def graph_bytes(manifest: Manifest) -> dict[str, int]:
    """Bytes of each graph's file plus the external data it reads (≈ its weights)."""
    def size(entry: dict) -> int:
        return sum((manifest.directory / name).stat().st_size for name in [entry["file"], *entry.get("data", [])])

    out = {"embed": size(manifest.graphs["embed"]), "head": size(manifest.graphs["head"])}
    for i, entry in enumerate(manifest.graphs["layers"]):
        out[f"layer_{i:02d}"] = size(entry)
    return out


def weight_bytes(manifest: Manifest) -> int:
    """Bytes of every graph and data file of the export, each file once (shared data counted once)."""
    names = set()
    for entry in [manifest.graphs["embed"], manifest.graphs["head"], *manifest.graphs["layers"]]:
        names.update([entry["file"], *entry.get("data", [])])
    return sum((manifest.directory / n).stat().st_size for n in names)


def bytes_per_token(manifest: Manifest, schedule: LayerSchedule, batch: int, prompt_length: int,
                    new_tokens: int) -> float:
    """Mean bytes a decode step reads: the weights of the layers it runs and of the head (the
    embedding reads a row per token: not counted), plus the keys and values it attends to."""
    sizes = graph_bytes(manifest)
    spec = manifest.model
    size = itemsize(manifest.dtype)
    steps = range(max(1, new_tokens - 1))
    total = 0.0
    for s in steps:
        kv = 2 * (prompt_length + s) * batch * spec.kv_dim * size
        total += sum(sizes[f"layer_{i:02d}"] + kv for i in schedule.layers(s)) + sizes["head"]
    return total / len(steps)
