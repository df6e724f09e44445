"""The results of ``run_bench`` for people: a text table and a PNG plot."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import SkipDeployError
from .probes import MEMORY_HEADROOM


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _percent(value) -> str:
    return _fmt(None if value is None else 100 * value, ".0f", "%")


def format_table(results: dict[str, Any]) -> str:
    cfg, env = results["config"], results["environment"]
    bw = [x for samples in (results.get("bandwidth_bytes_per_s") or {}).values() for x in samples]
    lines = [
        f"skipdeploy bench {results['export']}: {results['model']['layers']} layers, hidden "
        f"{results['model']['hidden']}, vocab {results['model']['vocab']}, {results['model']['dtype']}; "
        f"{env['threads']} threads on {env['cpu']}",
        f"prompt {cfg['prompt_length']} tokens, {cfg['new_tokens']} new tokens, batch sizes "
        f"{','.join(map(str, cfg['batch_sizes']))}; {cfg['repeats']} alternated rounds after {cfg['warmup']} warm-up"
        + (f"; weights stream at {min(bw) / 1e9:.0f}-{max(bw) / 1e9:.0f} GB/s (probe after each round)" if bw else ""),
        "",
        f"{'batch':>5}  {'contender':<14} {'layers':>6} {'TTFT':>7} {'ms/token':>8} {'p90':>6} {'p99':>6} "
        f"{'tok/s':>7} {'speedup':>7} {'cost model':>10} {'of cost model':>13} {'vs HF':>6} {'floor':>6} "
        f"{'of floor':>8}",
    ]
    for row in results["rows"]:
        ms = row["ms_per_token"]
        lines.append(
            f"{row['batch']:>5}  {row['contender']:<14} {row['layers_per_token']:>6.2f} {row['ttft_ms']:>7.1f} "
            f"{ms['median']:>8.2f} {ms['p90']:>6.2f} {ms['p99']:>6.2f} {row['tokens_per_s']:>7.1f} "
            f"{_fmt(row['speedup_vs_full'], '.2f', 'x'):>7} {_fmt(row['cost_model_speedup'], '.2f', 'x'):>10} "
            f"{_percent(row['fraction_of_cost_model']):>13} "
            f"{_fmt(row['vs_hf'], '.2f', 'x'):>6} {_fmt(row['memory_floor_ms_per_token'], '.2f'):>6} "
            f"{_percent(row['fraction_of_floor']):>8}")
    lines.append("")
    lines.append("TTFT, ms/token (median), p90, p99 and floor in ms; tok/s = output tokens/s after warm-up; speedup "
                 "against the full schedule (for a peer: its tok/s over the full schedule's) and vs HF are medians "
                 "of per-round ratios; cost model = the speedup "
                 "the multiply-add cost model predicts, of cost model = speedup / cost model; floor = weight + KV "
                 "bytes per token / probe bandwidth (median), of floor = floor / time per token, per round against "
                 "that round's probe (100% = bandwidth-bound).")
    for a in results.get("agreement", []):
        lines.append(f"agreement {a['contender']} vs {a['reference']}, batch {a['batch']}: "
                     f"{100 * a['positions_equal']:.1f}% of tokens equal, {100 * a['rows_equal']:.0f}% of rows "
                     f"identical, first difference after {100 * a['prefix_before_first_difference']:.0f}% of a row on average")
    for row in results["rows"]:
        if row.get("speedup_vs_export_full") is not None and row["target_speedup"] is not None:
            lines.append(f"{row['contender']}, batch {row['batch']}: {row['speedup_vs_export_full']:.2f}x its own "
                         f"export's full schedule (layer speedup {row['layer_speedup']:.2f}x)")
    for s in (results.get("peers") or {}).get("skipped", []):
        lines.append(f"skipped {s['contender']}: {s['reason']}")
    for m in results.get("memory", []):
        lines.append(f"memory {m['export']}, batch {m['batch']}: peak RSS {m['peak_rss_bytes'] / 1e6:.0f} MB; weights "
                     f"{m['weights_bytes'] / 1e6:.0f} MB + KV cache {m['kv_cache_bytes'] / 1e6:.1f} MB + "
                     f"{MEMORY_HEADROOM / 1e6:.0f} MB = {m['budget_bytes'] / 1e6:.0f} MB budget: "
                     f"{'within' if m['within_budget'] else 'OVER'}")
    for error in results.get("errors", []):
        lines.append(f"error: {error}")
    load = [env.get("load_average_before"), env.get("load_average_after")]
    cores = env.get("cores") or 1
    # The benchmark's own threads add up to `threads` to the load average after it.
    own = [0, env.get("threads") or cores]
    if any(v is not None and v > base + 0.5 * cores for v, base in zip(load, own)):
        lines.append(f"note: load average {_fmt(load[0], '.1f')} before, {_fmt(load[1], '.1f')} after on "
                     f"{env.get('cores')} cores: other work shared the machine; trust the ratios more than the times")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | os.PathLike) -> None:
    """PNG: ms/token per schedule and batch size (Hugging Face, the peers and the memory floor as lines), and
    the measured speedup next to the cost model's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SkipDeployError("--plot needs matplotlib: pip install 'skipdeploy[plot]'") from None
    rows = results["rows"]
    batches = results["config"]["batch_sizes"]
    labels = [r["contender"] for r in rows if r["batch"] == batches[0] and r["kind"] == "skipdeploy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(batches)
    xs = np.arange(len(labels))
    for i, batch in enumerate(batches):
        mine = {r["contender"]: r for r in rows if r["batch"] == batch}
        ms = [mine[label]["ms_per_token"]["median"] for label in labels]
        bars = left.bar(xs + i * width, ms, width, label=f"batch {batch}")
        color = bars[0].get_facecolor()
        hf = mine.get("hf generate")
        if hf is not None:
            left.axhline(hf["ms_per_token"]["median"], color=color, linestyle="--", linewidth=1,
                         label=f"HF generate, batch {batch}")
        peers = [r for r in rows if r["batch"] == batch and r["kind"] == "peer"]
        for peer, style in zip(peers, [":", "-.", (0, (1, 3)), (0, (5, 2, 1, 2))] * 2):
            left.axhline(peer["ms_per_token"]["median"], color=color, linestyle=style, linewidth=1,
                         label=f"{peer['contender']}, batch {batch}")
        floors = [mine[label]["memory_floor_ms_per_token"] for label in labels]
        if all(f is not None for f in floors):
            left.scatter(xs + i * width, floors, marker="_", s=300, color="black",
                         label="memory floor" if i == 0 else None, zorder=3)
        sched = [label for label in labels if mine[label]["cost_model_speedup"] is not None]
        sx = [labels.index(label) for label in sched]
        right.plot(sx, [mine[label]["speedup_vs_full"] for label in sched], "o-", color=color,
                   label=f"measured, batch {batch}")
        right.plot(sx, [mine[label]["cost_model_speedup"] for label in sched], "s--", color=color, alpha=0.6,
                   label=f"cost model (multiply-adds), batch {batch}")
    first = {r["contender"]: r for r in rows if r["batch"] == batches[0]}
    sched = [label for label in labels if first[label]["cost_model_speedup"] is not None]
    sx = [labels.index(label) for label in sched]
    right.plot(sx, [first[label]["layer_speedup"] for label in sched], ":", color="gray",
               label="layer speedup (layer-count ratio)")
    left.set(xticks=xs + width * (len(batches) - 1) / 2, xticklabels=labels, ylabel="ms per output token",
             title="decode time per token (median)")
    if len(labels) > 4:  # quantized exports' rows: the names overlap side by side
        left.tick_params(axis="x", labelrotation=45)
        for tick in left.get_xticklabels():
            tick.set_horizontalalignment("right")
    left.legend(fontsize=7)
    right.set(xticks=sx, xticklabels=sched, ylabel="speedup over the full schedule",
              title="SkipDecode speedup: measured and cost model")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
