from .sampling import GenerationConfig
from .generator import GenerationResult, Runtime, Step, cache_bytes, load, plan_capacities

__all__ = ["GenerationConfig", "GenerationResult", "Runtime", "Step", "cache_bytes", "load", "plan_capacities"]
