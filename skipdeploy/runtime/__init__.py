from .generator import GenerationResult, Generator, Step
from .kv import cache_bytes, plan_capacities
from .runtime import Runtime, load
from .sampling import GenerationConfig

__all__ = ["GenerationConfig", "GenerationResult", "Generator", "Runtime", "Step", "cache_bytes", "load",
           "plan_capacities"]
