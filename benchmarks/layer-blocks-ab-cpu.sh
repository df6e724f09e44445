#!/bin/bash
# a session per layer (block_layers=1) against one block (the default), same tree and exports, rounds alternated
# run from the repository root with the package installed; exports made as in BENCHMARKS.md (/tmp/bench/...)
for exp in /tmp/bench/smollm2-sd3 /tmp/bench/smollm2-q/int4 /tmp/bench/opt125-sd /tmp/bench/opt125-q/int4; do
  for B in 1 8; do
    for layers in 99 $( [[ $exp == *opt125* ]] && echo 6 || echo 15 ); do
      echo "== $exp batch $B layers $layers"
      python tools/ab_decode.py --a .:$exp --b .:$exp --load-a block_layers=1 --batch $B --threads 2 --rounds 7 --layers $layers 2>&1 | tail -3
    done
  done
done
