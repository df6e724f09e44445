"""In-flight batching (``ServingEngine``) and, with the ``serve`` extra, the OpenAI-compatible server."""

from .engine import POLICIES, QueueFullError, ServingEngine
from .request import Request

__all__ = ["POLICIES", "QueueFullError", "Request", "ServingEngine"]
