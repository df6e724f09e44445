"""Perplexity against decode speedup, one line per model, from ``skipdeploy eval --json`` files.

    python tools/plot_eval.py --out EVAL.png original=eval-original.json tuned=eval-tuned.json

Each result of a file is a point (the schedule's measured speedup, or its layer speedup when
``--layer-speedup``; its perplexity); the y axis is logarithmic, as a model not fine-tuned with
the schedule is orders of magnitude off.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=FILE")
    parser.add_argument("--out", required=True)
    parser.add_argument("--layer-speedup", action="store_true", help="x = layer speedup instead of measured speedup")
    parser.add_argument("--title", default="perplexity against decode speedup")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in args.runs:
        label, _, path = run.partition("=")
        if not path:
            parser.error(f"{run}: give LABEL=FILE")
        results = json.load(open(path))["results"]
        key = "layer_speedup" if args.layer_speedup else "measured_speedup"
        points = sorted((r[key], r["perplexity"]) for r in results)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
        for r in results:
            ax.annotate(f"{r['target_speedup']:g}x", (r[key], r["perplexity"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel="layer speedup" if args.layer_speedup else "measured decode speedup (this CPU)",
           ylabel="held-out perplexity", yscale="log", title=args.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
