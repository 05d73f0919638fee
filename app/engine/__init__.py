"""The batching engine: one loop owns the model and runs one forward per tick over all active rows."""

from app.engine.compute import SharedCompute, worker
from app.engine.engine import (
    Engine,
    EngineClosedError,
    EngineStats,
    Job,
    JobResult,
    NonFiniteError,
    QueueFullError,
)

__all__ = [
    "Engine",
    "EngineClosedError",
    "EngineStats",
    "Job",
    "JobResult",
    "NonFiniteError",
    "QueueFullError",
    "SharedCompute",
    "worker",
]
