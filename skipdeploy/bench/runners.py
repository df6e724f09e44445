"""The contenders of a benchmark: a skipdeploy runtime with a schedule, or Hugging Face ``generate``.

A runner takes a batch of prompts, generates a fixed number of tokens (EOS ignored) and returns
a :class:`Run`: the time to the first token and between consecutive tokens, and the tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..manifest import Manifest
from ..schedule import LayerSchedule


@dataclass
class Run:
    ttft: float                 # seconds from the call to the first generated token
    token_times: list[float]    # seconds between consecutive generated tokens
    tokens: list[list[int]]

    @property
    def decode_seconds(self) -> float:
        return float(sum(self.token_times))

    def tokens_per_s(self, batch: int) -> float:
        return batch * len(self.token_times) / self.decode_seconds if self.token_times else 0.0


@dataclass
class Contender:
    label: str
    kind: str                              # "skipdeploy", "peer" (peer_workers) or "hf"
    run: Callable[[list[list[int]]], Run]
    export: str = "float32"
    schedule: LayerSchedule | None = None
    target: float | None = None
    manifest: Manifest | None = None
    runs: dict[int, list[Run]] = field(default_factory=dict)


def prompts_for(batch: int, prompt_length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random prompts of token ids above OPT's specials (0..3), one seed per batch size."""
    rng = np.random.default_rng(seed + 1000 * batch)
    return rng.integers(4, max(5, min(vocab_size, 50_000)), size=(batch, prompt_length)).tolist()


def skipdeploy_runner(runtime, schedule: LayerSchedule, new_tokens: int) -> Callable[[list[list[int]]], Run]:
    """Steps the runtime's :class:`~skipdeploy.runtime.Generator`, time-stamping every token."""
    def run(prompts: list[list[int]]) -> Run:
        marks: list[float] = []
        start = time.perf_counter()
        with runtime.generator(prompts, new_tokens, schedule, eos_token_id=None) as gen:
            while not gen.is_done():
                gen.generate_next_token()
                marks.append(time.perf_counter())
            result = gen.result()
        return Run(marks[0] - start, list(np.diff(marks)), result.tokens)
    return run


def hf_runner(model, new_tokens: int, pad_token_id: int) -> Callable[[list[list[int]]], Run]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Time stamps of every ``put``: the prompt first, then one per generated token."""

        def __init__(self) -> None:
            self.marks: list[float] = []

        def put(self, value) -> None:
            self.marks.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(prompts: list[list[int]]) -> Run:
        ids = torch.tensor(prompts, dtype=torch.long)
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
                                 streamer=clock)
        marks = clock.marks[1:]  # the first put is the prompt
        return Run(marks[0] - start, list(np.diff(marks)), out[:, ids.shape[1]:].tolist())
    return run


def load_hf(checkpoint: str | None, manifest: Manifest, threads: int, log: Callable[[str], None]):
    """The transformers model of the export's checkpoint, or None (with the reason logged)."""
    source = checkpoint or manifest.source
    if not source:
        log("Hugging Face baseline skipped: the manifest names no checkpoint (pass --checkpoint)")
        return None
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        log("Hugging Face baseline skipped: transformers/torch are not installed")
        return None
    if checkpoint is None and not Path(source).expanduser().is_dir():
        log(f"Hugging Face baseline: {source} is not a local directory; trying the hub "
            "(pass --checkpoint DIR to use a local copy)")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    try:
        return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    except Exception as exc:  # a missing or unreachable checkpoint must not end the benchmark
        log(f"Hugging Face baseline skipped: cannot load {source} ({str(exc).splitlines()[0] if str(exc) else exc})")
        return None
