"""The batching engine: one loop owns the model and runs one forward per tick over all active rows. The API talks
to it only through its client (app/engine/client.py), and reads back only plain outputs (app/engine/outputs.py)."""

from app.engine.admission import EngineClosedError
from app.engine.client import EngineClient, InProcessClient
from app.engine.compute import SharedCompute, worker
from app.engine.engine import Engine
from app.engine.outputs import (
    CurvePoint,
    EngineOutputs,
    EngineStats,
    Failed,
    FailureKind,
    Finished,
    Progress,
    ProgressEvent,
    RequestOutput,
    TraceRow,
)
from app.engine.policy import PRIORITIES
from app.engine.scheduler import ANONYMOUS

__all__ = [
    "ANONYMOUS",
    "PRIORITIES",
    "CurvePoint",
    "Engine",
    "EngineClient",
    "EngineClosedError",
    "EngineOutputs",
    "EngineStats",
    "Failed",
    "FailureKind",
    "Finished",
    "InProcessClient",
    "Progress",
    "ProgressEvent",
    "RequestOutput",
    "SharedCompute",
    "TraceRow",
    "worker",
]
