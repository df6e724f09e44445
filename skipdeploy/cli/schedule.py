"""``skipdeploy schedule``: the layers a schedule runs at each step."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import ScheduleError, SkipDeployError
from ..schedule import MAX_LAYERS, MAX_POSITIONS, LayerSchedule, format_layers
from .options import json_option, pop_schedule_options, schedule_from, schedule_options


@click.command("schedule")
@click.option("--layers", "num_layers", type=click.IntRange(min=1), required=True,
              help=f"Decoder layers in the model (at most {MAX_LAYERS}).")
@schedule_options
@click.option("--steps", type=click.IntRange(min=1), help="Decode steps to show and to average over [default: "
              f"the schedule's horizon (--decay-tokens), showing one step past it; at most {MAX_POSITIONS}].")
@json_option("the per-step layer sets")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG of layers per step.")
def command(num_layers: int, steps: int | None, as_json: bool, plot: Path | None, **kwargs) -> None:
    """Show the layers a schedule runs at each generation step, and its layer speedup.

    The layer speedup is all layers over the mean layers run per decode step (decoder layers
    only: the embedding and the LM head run at every step, so wall-clock gains are smaller). The
    step is the generation step shared by the whole batch (step 0 is the forward pass of the
    first generated token), not a row's absolute position: with left padding all rows of a batch
    are at the same step.
    """
    if num_layers > MAX_LAYERS:  # before any schedule is built: the schedule options are checked against it
        raise ScheduleError(f"--layers must be <= {MAX_LAYERS}, more layers than any model has (got {num_layers})")
    if steps is not None and steps > MAX_POSITIONS:
        raise ScheduleError(f"--steps must be <= {MAX_POSITIONS}, more positions than any model has (got {steps})")
    sched = schedule_from(pop_schedule_options(kwargs), num_layers, None, None)
    # The default average is over the horizon, the same figure describe() prints; the table shows
    # one more step, where the floor holds.
    shown, steps = (steps, steps) if steps else (sched.horizon + 1, sched.horizon)
    summary = {"schedule": sched.to_dict(), "prompt_layers": list(sched.prompt_layers()),
               "mean_layers_per_token": sched.mean_layers(steps), "layer_speedup": sched.layer_speedup(steps)}
    if plot:
        _plot_schedule(sched, steps, plot)
    if as_json:  # one row per step, written as made: a long horizon must not be held in memory at once
        head = json.dumps({**summary, "steps": []})
        click.echo(head[:-2], nl=False)
        for s in range(shown):
            row = {"step": s, "top": sched.top(s), "layers": list(sched.layers(s))}
            click.echo(("" if s == 0 else ", ") + json.dumps(row), nl=False)
        click.echo(head[-2:])
        return
    click.echo(sched.describe())
    click.echo(f"prompt     {len(sched.prompt_layers())} layers [{format_layers(sched.prompt_layers())}]")
    click.echo(f"{'step':>6} {'top':>4} {'run':>4}  layers")
    previous = None
    for step in range(shown):  # a row where the layer set changes, and the last
        key = (sched.top(step), sched.count(step))
        if key == previous and step != shown - 1:
            continue
        previous = key
        click.echo(f"{step:>6} {key[0]:>4} {key[1]:>4}  {format_layers(sched.layers(step))}")
    click.echo(f"over {steps} decode steps: {summary['mean_layers_per_token']:.2f} of {num_layers} layers per token, "
               f"layer speedup {summary['layer_speedup']:.2f}x")
    if plot:
        click.echo(f"plot written to {plot}")


def _plot_schedule(sched: LayerSchedule, steps: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SkipDeployError("--plot needs matplotlib: pip install 'skipdeploy[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = list(range(steps))
    ax.step(xs, [sched.count(s) for s in xs], where="post", label="layers run")
    ax.step(xs, [sched.top(s) for s in xs], where="post", linestyle="--", label="top block")
    ax.set(xlabel="generation step", ylabel="layers", ylim=(0, sched.num_layers + 0.5),
           title=f"SkipDecode schedule, layer speedup {sched.layer_speedup(steps):.2f}x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
