"""``skipdeploy finetune``: train a checkpoint (any supported family) with SkipDecode schedules in the
forward pass.

Each step draws a batch of chunks, one context length ``c`` in ``[seq_len/8, seq_len/2]``, one
schedule (when several are given) and, with ``full_share`` P > 0, whether the batch runs the full
schedule instead (probability P), all from ``numpy.random.default_rng([seed, step])``: the data
order is a pure function of the seed and the step, so a resumed run sees exactly the batches an
uninterrupted one would. The loss is next-token cross-entropy over the scored positions of
:func:`schedule_forward`: every position (``loss_positions="all"``: context positions keep the
full model honest, generated positions train the skip paths), or the generated ones only
(``"generated"``: the tokens ``eval`` scores). With ``distill`` W > 0 it is
``(1 - W) * CE + W * KL(teacher || student)`` over the same positions, where the teacher is a
frozen copy of the starting model run with the full schedule (self-distillation, as in CALM and
LayerSkip): the skip paths learn the full model's distribution, not only its argmax.

The output directory is a Hugging Face checkpoint (``save_pretrained``) whose ``config.json``
carries ``skipdecode = {"schedule": ..., "schedules": [...], ...}``; ``skipdeploy.export`` uses
``schedule`` as the export's default. ``trainer_state.pt`` (model and optimizer state, step,
torch RNG, the starting model's directory) is written every ``save_every`` steps; running the same
command again resumes from it, with the teacher rebuilt from the starting model, not from --out.
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
LOSS_POSITIONS = ("all", "generated")
# Settings added after trainer states were first written: a state without them had these values.
LATER_DEFAULTS = {"full_share": 0.0, "distill": 0.0, "loss_positions": "all"}


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
    full_share: float = 0.0           # share of batches trained with the full schedule
    distill: float = 0.0              # weight W of KL(teacher || student); 0 loads no teacher
    loss_positions: str = "all"       # "all" positions, or the "generated" ones only
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
        if {**LATER_DEFAULTS, **{k: v for k, v in state["config"].items() if k != "steps"}} != cfg.fingerprint():
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
    # The teacher is the model the run started from, also on resume (the state records where it
    # was read; a gguf: source's cache may have moved since, so the source is resolved again then).
    origin = state.get("origin") if state is not None else None
    origin = origin if origin and Path(origin, "config.json").is_file() else model_dir
    teacher = load_teacher(family, origin, model.dtype) if cfg.distill > 0 else None
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
                "data": list(cfg.data), "full_share": cfg.full_share, "distill": cfg.distill,
                "loss_positions": cfg.loss_positions}
        setattr(model.config, CONFIG_KEY, info)
        model.save_pretrained(out)
        tmp = state_path.with_suffix(".tmp")
        torch.save({"config": cfg.fingerprint(), "step": step, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "origin": str(origin),
                    "torch_rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, state_path)

    try:
        return _train(cfg, model, teacher, optimizer, schedules, train, lo, hi, step, save, progress, log, until)
    except BaseException:
        if created and not state_path.is_file():  # nothing resumable was written: leave no half-made --out
            shutil.rmtree(out, ignore_errors=True)
        raise


def load_teacher(family, source: str, dtype):
    """The frozen starting model: eval mode (no dropout), no gradients, never given to the optimizer."""
    teacher = family.hf_class().from_pretrained(source, dtype=dtype, attn_implementation="sdpa").eval()
    return teacher.requires_grad_(False)


def draw(cfg: FinetuneConfig, step: int, rows: int, lo: int, hi: int, schedules: list[LayerSchedule]):
    """Step ``step``'s batch rows, context length and schedule: a pure function of seed and step."""
    rng = np.random.default_rng([cfg.seed, step])
    picked = rng.integers(0, rows, cfg.batch_size)
    context = int(rng.integers(lo, hi + 1))
    sched = schedules[int(rng.integers(0, len(schedules)))]
    # Drawn only when asked for, so that runs without it keep the draws they always had.
    if cfg.full_share > 0 and rng.random() < cfg.full_share:
        sched = Schedule.full(sched.num_layers)
    return picked, context, sched


def schedule_loss(model, ids, context: int, sched: LayerSchedule, *, loss_positions: str = "all",
                  teacher=None, distill: float = 0.0):
    """``(loss, cross-entropy)`` of one batch: next-token CE over the scored positions, mixed with
    ``distill`` * KL(teacher's full schedule || student) when a teacher is given."""
    import torch
    import torch.nn.functional as F

    from .forward import schedule_forward

    # The last position predicts nothing; dropping it leaves every earlier position's logits as they
    # were (causal attention, and the layer extents of a shorter sequence are a prefix of these).
    inputs, first = ids[:, :-1], (context - 1 if loss_positions == "generated" else 0)
    targets = ids[:, first + 1:]
    logp = torch.log_softmax(schedule_forward(model, inputs, context, sched, first=first).float(), -1)
    ce = F.nll_loss(logp.reshape(-1, logp.shape[-1]), targets.reshape(-1))
    if teacher is None or distill == 0:
        return ce, ce
    with torch.no_grad():
        full = Schedule.full(sched.num_layers)
        target = torch.log_softmax(schedule_forward(teacher, inputs, context, full, first=first).float(), -1)
    kl = F.kl_div(logp, target, log_target=True, reduction="none").sum(-1).mean()
    return (1 - distill) * ce + distill * kl, ce


def _train(cfg, model, teacher, optimizer, schedules, train, lo, hi, step, save, progress, log, until) -> Path:
    import torch
    from tqdm.auto import tqdm

    out = Path(cfg.out).expanduser()
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="finetune", unit="step", file=sys.stderr,
               disable=None if progress is None else not progress, dynamic_ncols=True)
    ema = None
    started, first_step = time.perf_counter(), step
    while step < cfg.steps:
        rows, context, sched = draw(cfg, step, train.shape[0], lo, hi, schedules)
        ids = torch.from_numpy(train[rows])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss, ce = schedule_loss(model, ids, context, sched, loss_positions=cfg.loss_positions, teacher=teacher,
                                 distill=cfg.distill)
        if not torch.isfinite(loss):
            raise SkipDeployError(f"the loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        del loss, ce  # the graph goes now, not when the next step's forward rebinds the names
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", c=context, x=f"{sched.layer_speedup():.1f}")
        saving = step % cfg.save_every == 0 or step == cfg.steps or step == until
        if saving:
            save(step)
        if bar.disable and (saving or step % 10 == 0):  # no terminal: lines with the time left instead
            per_step = (time.perf_counter() - started) / (step - first_step)
            log(f"step {step}/{cfg.steps}: loss {ema:.3f} (lr {_lr_at(step - 1, cfg):.2e}, {per_step:.2f} s/step, "
                f"{_duration(per_step * (cfg.steps - step))} left{', saved' if saving else ''})")
        if step == until:
            bar.close()
            log(f"stopped at step {step} of {cfg.steps}; run again to resume")
            return out
    bar.close()
    log(f"fine-tuned {cfg.steps} steps (last loss {ema:.3f}) -> {out}")
    return out


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


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
    for name in ("full_share", "distill"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise InputError(f"{name} must be a number in [0, 1] (got {value!r})")
    if cfg.loss_positions not in LOSS_POSITIONS:
        raise InputError(f"loss_positions must be one of {', '.join(LOSS_POSITIONS)} (got {cfg.loss_positions!r})")


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
