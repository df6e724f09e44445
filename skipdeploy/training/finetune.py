"""``skipdeploy finetune``: train a checkpoint (any supported family) with SkipDecode schedules in the
forward pass.

Each step draws a batch of chunks, one context length ``c`` in ``[seq_len/8, seq_len/2]`` and
one schedule (when several are given), all from ``numpy.random.default_rng([seed, step])``: the
data order is a pure function of the seed and the step, so a resumed run sees exactly the
batches an uninterrupted one would. The loss is next-token cross-entropy over every position of
:func:`schedule_forward` (context positions keep the full model honest, generated positions
train the skip paths).

The output directory is a Hugging Face checkpoint (``save_pretrained``) whose ``config.json``
carries ``skipdecode = {"schedule": ..., "schedules": [...], ...}``; ``skipdeploy.export`` uses
``schedule`` as the export's default. ``trainer_state.pt`` (model and optimizer state, step,
torch RNG) is written every ``save_every`` steps; running the same command again resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError, SkipDeployError
from ..schedule import LayerSchedule, Schedule
from . import data as data_mod

STATE_FILE = "trainer_state.pt"
CONFIG_KEY = "skipdecode"


@dataclass
class FinetuneConfig:
    model: str
    data: list[str]
    out: str
    schedules: list[dict]             # LayerSchedule.to_dict() each; one is drawn per batch
    steps: int = 500
    lr: float = 3e-4
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0
    warmup_steps: int = 0             # linear LR warm-up, then cosine decay to 10%
    weight_decay: float = 0.01
    save_every: int = 100
    min_context: int | None = None    # default seq_len // 8
    max_context: int | None = None    # default seq_len // 2
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> dict:
        """Settings a resumed run must share (``steps`` may change: the LR schedule follows it)."""
        keep = asdict(self)
        for key in ("save_every", "out", "steps"):
            keep.pop(key)
        return keep


def default_decay_tokens(seq_len: int, max_context: int | None = None) -> int:
    """Decay horizon tied to the training length: the shortest generated span a batch can have."""
    return max(1, seq_len - (max_context or seq_len // 2))


def stored_schedules(config) -> list[LayerSchedule]:
    """The schedules a checkpoint was fine-tuned with (``config.skipdecode``), default first."""
    info = getattr(config, CONFIG_KEY, None)
    if not isinstance(info, dict):
        return []
    items = info.get("schedules") or ([info["schedule"]] if info.get("schedule") else [])
    return [LayerSchedule.from_dict(s) for s in items]


def _lr_at(step: int, cfg: FinetuneConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def finetune(cfg: FinetuneConfig, *, progress: bool | None = None, log: Callable[[str], None] | None = None,
             force: bool = False, until: int | None = None) -> Path:
    """Run (or resume) a fine-tune; returns the output checkpoint directory.

    ``until`` stops (after a resumable save) at that step, as an interruption would.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from ..exporter.checkpoint import load_config, local_source
    from ..families import for_config

    hf_logging.disable_progress_bar()
    log = log or (lambda m: print(m, file=sys.stderr))
    check_config(cfg)
    schedules = [LayerSchedule.from_dict(s) for s in cfg.schedules]
    if not schedules:
        raise InputError("give at least one schedule")
    lo = cfg.min_context or max(1, cfg.seq_len // 8)
    hi = cfg.max_context or max(lo, cfg.seq_len // 2)
    if not 1 <= lo <= hi < cfg.seq_len:
        raise InputError(f"context lengths [{lo}, {hi}] must lie within [1, seq_len={cfg.seq_len})")

    out = Path(cfg.out).expanduser()
    state_path = out / STATE_FILE
    state = None
    if state_path.is_file() and not force:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if {k: v for k, v in state["config"].items() if k != "steps"} != cfg.fingerprint():
            raise SkipDeployError(f"{out} holds a fine-tune with other settings; use another --out, or --force "
                                  "to start over")
        if state["step"] >= cfg.steps:
            log(f"{out} is already fine-tuned for {cfg.steps} steps")
            return out
        log(f"resuming from step {state['step']} ({state_path})")
    elif out.exists() and any(out.iterdir()) and not force:
        raise SkipDeployError(f"{out} exists and holds no resumable fine-tune; use another --out, or --force")

    model_dir = local_source(cfg.model, log)  # gguf:FILE -> its converted checkpoint
    source = str(out) if state is not None else model_dir
    config = load_config(source)
    family = for_config(config, source)
    spec = family.spec(config, source)
    for s in schedules:
        if s.num_layers != spec.num_layers:
            raise InputError(f"a schedule is for {s.num_layers} layers, the model has {spec.num_layers}")
    if cfg.seq_len > spec.max_positions:
        raise InputError(f"--seq-len {cfg.seq_len} exceeds the model's {spec.max_positions} positions")
    model = family.hf_class().from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer_dir = Path(model_dir).expanduser()
    tokenizer = data_mod.load_tokenizer(out) if state is not None else _source_tokenizer(model_dir)
    bos = spec.bos_token_id if spec.bos_token_id is not None else 2
    t0 = time.perf_counter()
    train = data_mod.load_chunks(cfg.data, tokenizer, cfg.seq_len, bos)
    log(f"data: {train.shape[0]} chunks of {cfg.seq_len} tokens ({train.size / 1e6:.2f}M tokens, "
        f"{time.perf_counter() - t0:.1f} s to tokenize)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    step = 0
    created = state is None and not out.exists()  # removed again if the run fails before its first save
    if state is not None:
        if "model" in state:  # the weights saved with this state (model.safetensors may be newer)
            model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
    else:
        torch.manual_seed(cfg.seed)
        out.mkdir(parents=True, exist_ok=True)
        _copy_tokenizer(tokenizer_dir, out)
        if not (out / "tokenizer.json").is_file():  # converted from vocab.json + merges.txt, or a hub id's
            tokenizer.save(str(out / "tokenizer.json"))

    def save(step: int) -> None:
        info = {"schedule": schedules[0].to_dict(), "schedules": [s.to_dict() for s in schedules],
                "seq_len": cfg.seq_len, "context": [lo, hi], "steps": step, "source": str(cfg.model),
                "data": list(cfg.data)}
        setattr(model.config, CONFIG_KEY, info)
        model.save_pretrained(out)
        tmp = state_path.with_suffix(".tmp")
        torch.save({"config": cfg.fingerprint(), "step": step, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, state_path)

    try:
        return _train(cfg, model, optimizer, schedules, train, lo, hi, step, save, state_path, progress, log, until)
    except BaseException:
        if created and not state_path.is_file():  # nothing resumable was written: leave no half-made --out
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg, model, optimizer, schedules, train, lo, hi, step, save, state_path, progress, log, until) -> Path:
    import torch
    from tqdm.auto import tqdm

    from .forward import schedule_forward

    out = Path(cfg.out).expanduser()
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="finetune", unit="step", file=sys.stderr,
               disable=None if progress is None else not progress, dynamic_ncols=True)
    ema = None
    while step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, step])
        rows = rng.integers(0, train.shape[0], cfg.batch_size)
        context = int(rng.integers(lo, hi + 1))
        sched = schedules[int(rng.integers(0, len(schedules)))]
        ids = torch.from_numpy(train[rows])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        logits = schedule_forward(model, ids, context, sched)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise SkipDeployError(f"the loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", c=context, x=f"{sched.layer_speedup():.1f}")
        if step % cfg.save_every == 0 or step == cfg.steps or step == until:
            save(step)
            if bar.disable:  # no terminal: a line per checkpoint instead of the bar
                log(f"step {step}/{cfg.steps}: loss {ema:.3f} (lr {_lr_at(step - 1, cfg):.2e}, saved)")
        if step == until:
            bar.close()
            log(f"stopped at step {step} of {cfg.steps}; run again to resume")
            return out
    bar.close()
    log(f"fine-tuned {cfg.steps} steps (last loss {ema:.3f}) -> {out}")
    return out


def check_config(cfg: FinetuneConfig) -> None:
    """Every size and rate of ``cfg`` in range, before anything is read or written (one line each,
    naming the keyword)."""
    for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("save_every", 1), ("warmup_steps", 0)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low} (got {value!r})")
    for name in ("lr", "weight_decay"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0 or (name == "lr" and value == 0):
            raise InputError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'} (got {value!r})")


def _source_tokenizer(model: str):
    """The checkpoint's ``tokenizer.json`` read as is, else the tokenizer transformers builds from
    its ``vocab.json`` + ``merges.txt`` (the original OPT checkpoints have no tokenizer.json)."""
    from ..exporter.checkpoint import fast_tokenizer

    local = Path(str(model)).expanduser()
    if (local / "tokenizer.json").is_file():
        return data_mod.load_tokenizer(local)
    tokenizer = fast_tokenizer(model)
    if tokenizer is None:
        raise InputError(f"{model} has no tokenizer: training on text needs the model's tokenizer "
                         "(tokenizer.json, or vocab.json and merges.txt)")
    return tokenizer


def _copy_tokenizer(source: Path, out: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (source / name).is_file() and source.resolve() != out.resolve():
            shutil.copy2(source / name, out / name)


def schedules_from_options(num_layers: int, target_speedups: list[float] | None, *, max_layers=None,
                           min_layers=None, warmup_layers: int | None = None, decay_tokens: int,
                           prompt: str | None = None, full: bool = False) -> list[LayerSchedule]:
    """The schedules a fine-tune trains with; a speedup of 1 means ``Schedule.full``."""
    common = dict(decay_tokens=decay_tokens, warmup_layers=1 if warmup_layers is None else warmup_layers,
                  prompt=prompt or "full")
    if full:
        return [Schedule.full(num_layers)]
    if target_speedups:
        return [Schedule.full(num_layers) if k == 1 else Schedule.target_speedup(num_layers, k, **common)
                for k in target_speedups]
    if max_layers is not None or min_layers is not None:
        return [Schedule(num_layers, max_layers, min_layers, **common)]
    return [Schedule.full(num_layers)]


def config_json(cfg: FinetuneConfig) -> str:
    return json.dumps(asdict(cfg))
