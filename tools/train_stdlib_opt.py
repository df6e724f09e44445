"""Reproducible recipe: a small OPT trained on Python's own standard library, then SkipDecode-fine-tuned.

    python tools/train_stdlib_opt.py --work /tmp/stdlib-opt            # ~45 min on 2 shared CPU cores
    python tools/train_stdlib_opt.py --work /tmp/stdlib-dry --dry-run  # a few steps of every stage

Stages (each is skipped when its output exists, so re-running resumes):
  1. tokenizer: byte-level BPE (vocab 8192, OPT specials <s>=0 <pad>=1 </s>=2 <unk>=3) on stdlib:train
  2. init:      a 12-layer OPT, hidden 192, 6 heads, ffn 768, 512 positions (~7M parameters), seed 0
  3. pretrain:  skipdeploy finetune with the full schedule (plain language-model training)
  4. finetune:  skipdeploy finetune with SkipDecode schedules at 2x, 3x and 5x (one drawn per batch)
  4b. control:  the same continued training with the full schedule only (separates the effect of
                the schedule from that of more training)
  5. eval:      skipdeploy eval before (pretrain), control and after (finetune) at 1x/2x/3x/5x on
                stdlib:heldout
  6. asset:     the fine-tuned model in float16 safetensors + tokenizer -> skipdeploy/assets/stdlib-opt
Everything runs through the skipdeploy API (the same code as the CLI commands printed below).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from skipdeploy.training import data  # noqa: E402

SHAPE = dict(num_hidden_layers=12, hidden_size=192, num_attention_heads=6, ffn_dim=768, vocab_size=8192,
             max_position_embeddings=512, word_embed_proj_dim=192)
SPEEDUPS = [2.0, 3.0, 5.0]


def stage(name: str) -> None:
    print(f"\n== {name} [{time.strftime('%H:%M:%S')}]", flush=True)


def train_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    files = data.stdlib_files("train")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((data.read_text(p) for p in files), trainer, length=len(files))
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(out)


def init_model(out: Path, tokenizer_dir: Path, seed: int) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1, dropout=0.0, attention_dropout=0.0,
                       **SHAPE)
    OPTForCausalLM(config).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="Working directory (resumable).")
    p.add_argument("--pretrain-steps", type=int, default=350)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-chunks", type=int, default=96)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--asset", type=Path, default=REPO / "skipdeploy" / "assets" / "stdlib-opt")
    p.add_argument("--dry-run", action="store_true", help="A few steps of every stage (checks the recipe).")
    p.add_argument("--stop-after", choices=["pretrain", "finetune", "eval"], help="Stop after this stage.")
    p.add_argument("--no-control", action="store_true", help="Skip the control run (4b) and its evaluation.")
    args = p.parse_args()
    if args.dry_run:
        args.pretrain_steps, args.finetune_steps, args.eval_chunks, args.eval_prompts = 3, 3, 4, 4
        if args.asset == p.get_default("asset"):
            args.asset = args.work / "asset"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    from skipdeploy.training.finetune import FinetuneConfig, default_decay_tokens, finetune, schedules_from_options
    from skipdeploy.schedule import Schedule

    L = SHAPE["num_hidden_layers"]
    decay = default_decay_tokens(args.seq_len)
    common = dict(data=["stdlib:train"], batch_size=args.batch_size, seq_len=args.seq_len, seed=0, save_every=50)

    stage("1/6 tokenizer")
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(tok_dir, SHAPE["vocab_size"])
    stage("2/6 init")
    init = work / "init"
    if not (init / "config.json").is_file():
        init_model(init, tok_dir, seed=0)

    stage("3/6 pretrain (full schedule)")
    print(f"  = skipdeploy finetune {init} --data stdlib:train --out {work / 'pretrained'} --full "
          f"--steps {args.pretrain_steps} --lr 1e-3 --warmup-steps 50 --batch-size {args.batch_size} "
          f"--seq-len {args.seq_len} --seed 0", flush=True)
    pretrained = finetune(FinetuneConfig(model=str(init), out=str(work / "pretrained"),
                                         schedules=[Schedule.full(L).to_dict()], steps=args.pretrain_steps,
                                         lr=1e-3, warmup_steps=min(50, args.pretrain_steps // 4), **common))
    if args.stop_after == "pretrain":
        return

    stage("4/6 finetune (SkipDecode schedules)")
    scheds = schedules_from_options(L, SPEEDUPS, decay_tokens=decay)
    print(f"  = skipdeploy finetune {pretrained} --data stdlib:train --out {work / 'skipdecode'} "
          f"--target-speedup {','.join(f'{k:g}' for k in SPEEDUPS)} --decay-tokens {decay} "
          f"--steps {args.finetune_steps} --lr 3e-4 --warmup-steps 20 --batch-size {args.batch_size} --seq-len {args.seq_len} "
          f"--seed 1", flush=True)
    tuned = finetune(FinetuneConfig(model=str(pretrained), out=str(work / "skipdecode"),
                                    schedules=[s.to_dict() for s in scheds], steps=args.finetune_steps, lr=3e-4,
                                    warmup_steps=min(20, args.finetune_steps // 4),
                                    **{**common, "seed": 1}))
    if args.stop_after == "finetune":
        return

    control = None
    if not args.no_control:
        stage("4b/6 control: the same continued training with the full schedule only")
        print(f"  = skipdeploy finetune {pretrained} --data stdlib:train --out {work / 'control'} --full "
              f"--steps {args.finetune_steps} --lr 3e-4 --warmup-steps 20 --batch-size {args.batch_size} --seq-len {args.seq_len} "
              f"--seed 1", flush=True)
        control = finetune(FinetuneConfig(model=str(pretrained), out=str(work / "control"),
                                          schedules=[Schedule.full(L).to_dict()], steps=args.finetune_steps, lr=3e-4,
                                          warmup_steps=min(20, args.finetune_steps // 4),
                                          **{**common, "seed": 1}))

    stage("5/6 eval")
    from skipdeploy.training.evaluate import evaluate

    reports = {}
    for name, model in (("before", pretrained), ("control", control), ("after", tuned)):
        if model is None:
            continue
        path = work / f"eval_{name}.json"
        if not path.is_file():
            print(f"  = skipdeploy eval {model} --data stdlib:heldout --target-speedup 1,2,3,5 "
                  f"--decay-tokens {decay} --seq-len {args.seq_len} --chunks {args.eval_chunks} "
                  f"--prompts {args.eval_prompts} --json", flush=True)
            report = evaluate(str(model), ["stdlib:heldout"], [1, 2, 3, 5], seq_len=args.seq_len,
                              decay_tokens=decay, chunks=args.eval_chunks, prompts=args.eval_prompts)
            path.write_text(json.dumps(report, indent=2))
        reports[name] = json.loads(path.read_text())
    print("\n| model | target | layer speedup | layers/token | measured speedup | perplexity | agreement |")
    print("|---|---|---|---|---|---|---|")
    for name, report in reports.items():
        for r in report["results"]:
            print(f"| {name} | {r['target_speedup']:g}x | {r['layer_speedup']:.2f}x | {r['layers_per_token']:.2f} | "
                  f"{r['measured_speedup']:.2f}x | {r['perplexity']:.3f} | {r['agreement']:.3f} |")
    if args.stop_after == "eval":
        return

    stage("6/6 asset (float16)")
    write_asset(tuned, args.asset)


def write_asset(checkpoint: Path, asset: Path) -> None:
    import torch
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(torch.float16)
    if asset.exists():
        shutil.rmtree(asset)
    model.save_pretrained(asset, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, asset / name)
    size = sum(f.stat().st_size for f in asset.iterdir())
    print(f"  asset {asset}: {size / 1e6:.1f} MB ({', '.join(sorted(f.name for f in asset.iterdir()))})")


if __name__ == "__main__":
    main()
