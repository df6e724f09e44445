"""The model that ships inside the package: a small OPT trained on Python's standard library.

12 layers, hidden 192, ~7M parameters, float16 safetensors with its byte-level BPE tokenizer,
pretrained and then SkipDecode-fine-tuned by ``tools/train_stdlib_opt.py`` (figures in EVAL.md).
``skipdeploy demo`` exports it and completes a Python prompt with and without skipping, offline.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from .errors import InputError

ASSET = Path(__file__).resolve().parent / "assets" / "stdlib-opt"
DEFAULT_PROMPT = "class Stack:\n    def __init__(self):\n        self."
# The model is small and briefly trained: plain greedy decoding loops; a mild penalty keeps it moving.
REPETITION_PENALTY = 1.2


def bundled_model() -> Path | None:
    """The bundled checkpoint directory, or None when this installation lacks it."""
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    return ASSET if all((ASSET / f).is_file() for f in needed) else None


def run_demo(workdir: Path | None, prompt: str | None, max_new_tokens: int | None, target_speedup: float | None,
             echo: Callable[..., None], random: bool = False) -> dict:
    """Export the bundled model (or, with ``random`` or when it is absent, a random 8-layer one),
    then complete ``prompt`` with the full schedule and a SkipDecode one, side by side. Without
    ``workdir`` the files go to a temporary directory that is removed at the end."""
    # Given values are checked, never replaced by a default (a falsy 0 or "" is a mistake to report).
    if prompt is not None and not prompt.strip():
        raise InputError("--prompt is empty; give some text to complete")
    if max_new_tokens is not None and max_new_tokens < 2:
        raise InputError(f"--max-new-tokens must be at least 2: the speedup is measured over decode steps "
                         f"(got {max_new_tokens})")
    if target_speedup is not None and not target_speedup > 1:
        raise InputError(f"--target-speedup must be above 1 (got {target_speedup:g})")
    if workdir is not None:
        return _demo(Path(workdir), prompt, max_new_tokens, target_speedup, echo, random, kept=True)
    with tempfile.TemporaryDirectory(prefix="skipdeploy-demo-") as tmp:
        return _demo(Path(tmp), prompt, max_new_tokens, target_speedup, echo, random, kept=False)


def _demo(workdir: Path, prompt: str | None, max_new_tokens: int | None, target_speedup: float | None,
          echo: Callable[..., None], random: bool, kept: bool) -> dict:
    from . import export
    from .runtime import load
    from .schedule import Schedule

    checkpoint = None if random else bundled_model()
    bundled = checkpoint is not None
    if bundled:
        prompt, max_new_tokens = prompt or DEFAULT_PROMPT, max_new_tokens or 64
        target_speedup, knobs = target_speedup or 3.0, {"repetition_penalty": REPETITION_PENALTY}
        echo(f"1/3 bundled model: OPT trained on Python's standard library, SkipDecode fine-tuned ({checkpoint})")
    else:
        from .random_checkpoint import make_checkpoint

        prompt, max_new_tokens = prompt or "def greet(name):", max_new_tokens or 24
        target_speedup, knobs = target_speedup or 2.0, {}
        checkpoint = make_checkpoint(workdir / "checkpoint", "small", weight_scale=3.0)
        echo(f"1/3 random 8-layer OPT checkpoint (its text is noise; the layers saved are real) -> {checkpoint}")
    # The decay spans the decode steps generated, so that the speedup in the label is the one
    # measured over them (as `generate --target-speedup` does).
    decay = max(1, max_new_tokens - 1)
    out = workdir / "export"
    start = time.perf_counter()
    manifest = export(checkpoint, out, force=True, progress=False, log=lambda m: echo(f"    {m}"))
    spec = manifest.model
    where = "" if kept else " (a temporary directory, removed at the end; --workdir DIR keeps it)"
    echo(f"2/3 exported {spec.num_layers} layers (hidden {spec.hidden_size}) to {out}{where} in "
         f"{time.perf_counter() - start:.1f} s")
    runtime = load(out)
    L = spec.num_layers
    skip = Schedule.target_speedup(L, target_speedup, decay_tokens=decay)
    how = ", ".join(["greedy"] + [f"repetition penalty {v:g}" for v in knobs.values()])
    echo(f"3/3 complete {prompt!r} ({max_new_tokens} new tokens, {how})")
    results = {}
    for label, sched in (("full", Schedule.full(L)), (f"skipdecode {target_speedup:g}x", skip)):
        runtime.generate_text([prompt], max_new_tokens, schedule=sched, **knobs)  # warm-up
        r = min((runtime.generate_text([prompt], max_new_tokens, schedule=sched, **knobs) for _ in range(3)),
                key=lambda r: r.decode_seconds)
        results[label] = r
        echo(f"\n--- {label}: {r.mean_layers_per_token:.2f} of {L} layers per token "
             f"(layer speedup {r.layer_speedup:.2f}x), {1e3 * _per_step(r):.2f} ms/token")
        echo(prompt + r.text[0])
    full, skipped = results.values()
    speed = _per_step(full) / _per_step(skipped)
    same = sum(a == b for a, b in zip(full.tokens[0], skipped.tokens[0])) / max(1, len(full.tokens[0]))
    echo(f"\nlayers run per token: {full.mean_layers_per_token:.2f} -> {skipped.mean_layers_per_token:.2f} "
         f"(layer speedup {skipped.layer_speedup:.2f}x); measured decode speedup {speed:.2f}x (the embedding and "
         f"the LM head run at every step); {100 * same:.0f}% of tokens identical to the full model's")
    echo(f"schedule: {skip.describe()}")
    if kept:
        echo(f"next: skipdeploy generate {out} --prompt 'import os' --target-speedup {target_speedup:g}")
    elif bundled:
        echo(f"next: skipdeploy export bundled --out stdlib-opt-sd, then skipdeploy generate stdlib-opt-sd "
             f"--prompt 'import os' --target-speedup {target_speedup:g}")
    else:
        echo("next: skipdeploy demo --workdir DIR keeps the checkpoint and the export in DIR")
    return {"export": out, "speedup": speed, "full": full, "skip": skipped}


def _per_step(result) -> float:
    return result.decode_seconds / max(1, len(result.layers_per_step))
