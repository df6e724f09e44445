"""Write a randomly initialised checkpoint with a real model's shape (for benchmarks; no download).

Shapes cover OPT (opt-125m, opt-350m, opt-1.3b), Llama (smollm2-135m, smollm2-360m, tinyllama-1.1b,
llama-3.2-1b) and Qwen2 (qwen2.5-0.5b), plus the tiny test shapes; see skipdeploy/random_checkpoint.py.

    python tools/make_random_checkpoint.py --shape opt-125m --out /tmp/opt-125m-random
    python tools/make_random_checkpoint.py --shape smollm2-135m --out /tmp/smollm2-135m-random
"""

import argparse

from skipdeploy.random_checkpoint import SHAPES, make_checkpoint

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shape", choices=sorted(SHAPES), default="opt-125m")
parser.add_argument("--out", required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--weight-scale", type=float, default=1.0,
                    help="Multiply 2-D weights (wider logit margins for token comparisons).")
args = parser.parse_args()
path = make_checkpoint(args.out, args.shape, seed=args.seed, weight_scale=args.weight_scale)
family = SHAPES[args.shape].get("family", "opt")
print(f"wrote a random {args.shape}-shaped {family} checkpoint to {path}")
