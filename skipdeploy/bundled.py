"""The model that ships inside the package: a small OPT trained on Python's standard library.

12 layers, hidden 192, ~7M parameters, float16 safetensors with its byte-level BPE tokenizer,
pretrained and then SkipDecode-fine-tuned by ``tools/train_stdlib_opt.py`` (figures in EVAL.md).
``skipdeploy demo`` exports it and completes a Python prompt with and without skipping, offline.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

ASSET = Path(__file__).resolve().parent / "assets" / "stdlib-opt"
DEFAULT_PROMPT = "class Stack:\n    def __init__(self):\n        self."
# The model is small and briefly trained: plain greedy decoding loops; a mild penalty keeps it moving.
REPETITION_PENALTY = 1.2


def bundled_model() -> Path | None:
    """The bundled checkpoint directory, or None when this installation lacks it."""
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    return ASSET if all((ASSET / f).is_file() for f in needed) else None


def trained_decay_tokens(checkpoint: Path, default: int = 128) -> int:
    info = json.loads((checkpoint / "config.json").read_text()).get("skipdecode") or {}
    return int((info.get("schedule") or {}).get("decay_tokens") or default)


def run_demo(workdir: Path | None, prompt: str | None, max_new_tokens: int, target_speedup: float,
             echo: Callable[..., None]) -> dict:
    """Export the bundled model, then complete ``prompt`` with the full and a SkipDecode schedule."""
    from . import export
    from .runtime import load
    from .schedule import Schedule

    checkpoint = bundled_model()
    if checkpoint is None:
        raise FileNotFoundError(ASSET)
    prompt = prompt or DEFAULT_PROMPT
    workdir = workdir or Path(tempfile.mkdtemp(prefix="skipdeploy-demo-"))
    out = workdir / "export"
    echo(f"1/3 bundled model: OPT trained on Python's standard library, SkipDecode fine-tuned ({checkpoint})")
    start = time.perf_counter()
    manifest = export(checkpoint, out, force=True, progress=False, log=lambda m: echo(f"    {m}"))
    spec = manifest.model
    echo(f"2/3 exported {spec.num_layers} layers (hidden {spec.hidden_size}) to {out} in "
         f"{time.perf_counter() - start:.1f} s")
    runtime = load(out)
    L = spec.num_layers
    skip = Schedule.target_speedup(L, target_speedup, decay_tokens=trained_decay_tokens(checkpoint))
    echo(f"3/3 complete {prompt!r} ({max_new_tokens} new tokens, greedy, repetition penalty {REPETITION_PENALTY:g})")
    results = {}
    for label, sched in (("full", Schedule.full(L)), (f"skipdecode {target_speedup:g}x", skip)):
        knobs = dict(schedule=sched, repetition_penalty=REPETITION_PENALTY)
        runtime.generate_text([prompt], max_new_tokens, **knobs)  # warm-up
        r = min((runtime.generate_text([prompt], max_new_tokens, **knobs) for _ in range(3)),
                key=lambda r: r.decode_seconds)
        results[label] = r
        ms = 1e3 * r.decode_seconds / max(1, len(r.layers_per_step))
        echo(f"\n--- {label}: {r.mean_layers_per_token:.2f} of {L} layers per token "
             f"(ideal speedup {r.ideal_speedup:.2f}x), {ms:.2f} ms/token")
        echo(prompt + r.text[0])
    full, skipped = results.values()
    speed = (full.decode_seconds / max(1, len(full.layers_per_step))) / \
        (skipped.decode_seconds / max(1, len(skipped.layers_per_step)))
    same = sum(a == b for a, b in zip(full.tokens[0], skipped.tokens[0])) / max(1, len(full.tokens[0]))
    echo(f"\nlayers run per token: {full.mean_layers_per_token:.2f} -> {skipped.mean_layers_per_token:.2f}; "
         f"measured decode speedup {speed:.2f}x (ideal {skipped.ideal_speedup:.2f}x); "
         f"{100 * same:.0f}% of tokens identical to the full model's")
    echo(f"schedule: {skip.describe()}")
    echo(f"next: skipdeploy generate {out} --prompt 'import os' --target-speedup {target_speedup:g} "
         f"--decay-tokens {skip.decay_tokens}")
    return {"export": out, "speedup": speed, "full": full, "skip": skipped}
