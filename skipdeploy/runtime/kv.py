"""KV-cache planning: how many positions each layer's cache needs under a schedule, and its bytes.

The schedule is known before decoding, so each layer is sized for exactly the positions it will
hold: a middle layer that the schedule drops stops growing, and its buffer is that much shorter.
"""

from __future__ import annotations

from ..errors import SkipDeployError
from ..schedule import LayerSchedule


def plan_capacities(schedule: LayerSchedule, prompt_len: int, max_new_tokens: int) -> list[int]:
    """Positions each layer's cache must hold: the prompt (if the layer runs on it) plus one per
    decode step that runs the layer. The last generated token is never fed back."""
    caps = [0] * schedule.num_layers
    for layer in schedule.prompt_layers():
        caps[layer] = prompt_len
    for step in range(max_new_tokens - 1):
        for layer in schedule.layers(step):
            caps[layer] += 1
    return caps


def cache_bytes(capacities: list[int], batch: int, heads: int, head_dim: int, itemsize: int) -> int:
    return 2 * sum(capacities) * batch * heads * head_dim * itemsize


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_cached(layer: int, held: int, expected: int, owner: str = "") -> None:
    """Every layer a position runs was run by every earlier position (the top block only shrinks),
    so the positions a layer holds must be exactly those before the new ones."""
    if held != expected:
        raise SkipDeployError(f"internal error: {owner + ' ' if owner else ''}layer {layer} holds {held} cached "
                              f"positions, expected {expected}; the schedule is not monotone")
