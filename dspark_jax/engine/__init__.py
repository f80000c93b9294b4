"""The serving engine: continuous batching over fixed slots, one round in flight."""

from dspark_jax.engine.engine import Engine
from dspark_jax.engine.policies import POLICIES, SCHEDULED, drafter_has_confidence
from dspark_jax.engine.results import EngineMetrics, RequestResult

__all__ = ["Engine", "EngineMetrics", "POLICIES", "RequestResult", "SCHEDULED", "drafter_has_confidence"]
