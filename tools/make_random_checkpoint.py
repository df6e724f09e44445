"""Write a randomly initialised OPT checkpoint with real OPT shapes (for benchmarks; no download).

    python tools/make_random_opt.py --shape opt-125m --out /tmp/opt-125m-random
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
print(f"wrote a random {args.shape}-shaped OPT checkpoint to {path}")
