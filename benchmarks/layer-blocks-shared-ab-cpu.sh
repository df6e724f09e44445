#!/bin/bash
# one block without (a: the tree of commit b8561b4, extracted with git archive to /tmp/noh-tree) and with (b: this
# tree) the layers' repeated work moved to the outer graph; run from the repository root; exports as in BENCHMARKS.md
for exp in /tmp/bench/smollm2-sd3 /tmp/bench/smollm2-q2/int4 /tmp/bench/opt125-sd /tmp/bench/opt125-q2/int4; do
  for B in 1 8; do
    echo "== $exp batch $B"
    python tools/ab_decode.py --a /tmp/noh-tree:$exp --b .:$exp --batch $B --threads 2 --rounds 7 2>&1 | tail -3
  done
done
