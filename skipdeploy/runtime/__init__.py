from .generator import GenerationResult, Runtime, Step, cache_bytes, load, plan_capacities

__all__ = ["GenerationResult", "Runtime", "Step", "cache_bytes", "load", "plan_capacities"]
