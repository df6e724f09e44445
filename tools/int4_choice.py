"""Choose the int4 and int8 block size and accuracy_level by measurement (DESIGN.md, quantization).

For each weight width (``--bits``: 4 and 8, MatMulNBits), block size (32/64/128) and
``accuracy_level`` (0: float activations; 4: int8 activations inside MatMulNBits), symmetric
unless ``--asymmetric`` adds those rows too, this quantizes a float32 export and measures:
- the per-graph error against float32 (what the manifest records: max over outputs, relative to
  max(1, |reference|), on random inputs): the worst layer and the head;
- greedy agreement with float32, teacher-forced: at each of ``--agree-tokens`` steps, whether the
  quantized export's token is float32's argmax after the same prefix (the quantized export's own);
- decode time per token at batch 1 and 8 (``Runtime.stream``, ``--threads`` threads, prefill
  excluded), median over rounds; every contender runs once per round, so drift hits all alike.
float32 and int8-dynamic exports are measured alongside as references. Make the export first:

    python tools/make_random_checkpoint.py --shape opt-125m --out /tmp/opt125-ckpt
    skipdeploy export /tmp/opt125-ckpt --out /tmp/opt125-sd --no-check
    nice python tools/int4_choice.py /tmp/opt125-sd
    nice python tools/int4_choice.py /tmp/opt125-sd --bits 8 --block-sizes 32,128 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import skipdeploy
from skipdeploy.exporter.quantize import quantize_export


def quantized(source: Path, root: Path, name: str, **options):
    started = time.perf_counter()
    m = quantize_export(source, root / name, progress=False, log=lambda msg: None, **options)
    return m, time.perf_counter() - started


def agreement(rt, reference, prompts, steps: int) -> tuple[int, int]:
    got = rt.generate(prompts, steps, eos_token_id=None).tokens
    agree = total = 0
    for step in range(steps):
        want = reference.generate([p + t[:step] for p, t in zip(prompts, got)], 1, eos_token_id=None).tokens
        agree += sum(w[0] == g[step] for w, g in zip(want, got))
        total += len(prompts)
    return agree, total


def ms_per_token(rt, prompts, new_tokens: int) -> float:
    marks = [time.perf_counter() for _ in rt.stream(prompts, new_tokens, eos_token_id=None)]
    return 1e3 * (marks[-1] - marks[0]) / (len(marks) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="a float32 export")
    parser.add_argument("--bits", default="4", help="MatMulNBits weight widths to measure: 4, 8 or 4,8")
    parser.add_argument("--block-sizes", default="32,64,128")
    parser.add_argument("--accuracy-levels", default="0,4")
    parser.add_argument("--asymmetric", action="store_true", help="also measure asymmetric weights (zero points)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--agree-tokens", type=int, default=16, help="0: skip the agreement (timing only)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    source = skipdeploy.load(args.export, threads=args.threads)
    vocab = source.spec.vocab_size
    prompts = {b: np.random.default_rng(b).integers(4, vocab, (b, args.prompt_length)).tolist() for b in (1, 8)}
    rows = []  # (label, manifest or None, runtime)
    with tempfile.TemporaryDirectory(prefix="int4-choice-") as tmp:
        root = Path(tmp)
        rows.append(("float32", None, source, 0.0))
        m, took = quantized(args.export, root, "int8-dynamic", weights="int8-dynamic")
        rows.append(("int8-dynamic", m, skipdeploy.load(m.directory, threads=args.threads), took))
        for bits in map(int, args.bits.split(",")):
            for sym in [True, False] if args.asymmetric else [True]:
                for bs in map(int, args.block_sizes.split(",")):
                    for level in map(int, args.accuracy_levels.split(",")):
                        m, took = quantized(args.export, root, f"int{bits}-{bs}-{level}-{sym}", weights=f"int{bits}",
                                            block_size=bs, accuracy_level=level, symmetric=sym)
                        label = f"int{bits} bs {bs} acc {level}{'' if sym else ' asym'}"
                        rows.append((label, m, skipdeploy.load(m.directory, threads=args.threads), took))
                        print(f"quantized {label} in {took:.0f} s", file=sys.stderr, flush=True)
        agree = {label: agreement(rt, source, prompts[8], args.agree_tokens) if m and args.agree_tokens else None
                 for label, m, rt, _ in rows}
        times = {(label, b): [] for label, *_ in rows for b in (1, 8)}
        for _ in range(max(1, args.rounds)):
            for b in (1, 8):
                for label, _m, rt, _t in rows:
                    ms_per_token(rt, [p[:4] for p in prompts[b]], 2)  # warm: this batch's buffers
                    times[(label, b)].append(ms_per_token(rt, prompts[b], args.new_tokens))
            print("round done", file=sys.stderr, flush=True)

    header = (f"{'weights':<22} {'layer err':>9} {'head err':>9} {'agree':>7} {'MB':>6} "
              f"{'ms/tok b1':>9} {'ms/tok b8':>9} {'x dyn b1':>9} {'x dyn b8':>9}")
    print(header)
    int8 = {b: statistics.median(times[("int8-dynamic", b)]) for b in (1, 8)}
    for label, m, _rt, _t in rows:
        q = (m.quantization if m else None) or {}
        errors = q.get("max_error_vs_float", {})
        head = m.graphs["head"]["file"] if m else None
        layer_err = max((e for g, e in errors.items() if g != head), default=0.0)
        head_err = errors.get(head, 0.0)
        size = sum((q.get("weight_bytes") or {}).get(k, 0) for k in ("int8", "int4", "int8-dynamic")) or \
            (rows[1][1].quantization["weight_bytes"]["float32"])
        a = agree[label]
        b1, b8 = (statistics.median(times[(label, b)]) for b in (1, 8))
        print(f"{label:<22} {layer_err:>9.2e} {head_err:>9.2e} {f'{a[0]}/{a[1]}' if a else '-':>7} {size / 1e6:>6.1f} "
              f"{b1:>9.2f} {b8:>9.2f} {int8[1] / b1:>9.2f} {int8[8] / b8:>9.2f}")
    print(f"({args.rounds} rounds, {args.new_tokens} new tokens after a {args.prompt_length}-token prompt, "
          f"{args.threads} threads; agree: teacher-forced greedy tokens equal to float32's, batch 8 x "
          f"{args.agree_tokens} steps; MB: layer and head weights, the head's tied matrix included; x dyn: "
          f"int8-dynamic's time / this one's)")


if __name__ == "__main__":
    main()
