"""The JSON bodies the routes send: a result with its images as base64 PNGs, a preview, a progress event.
The PNGs are encoded here, in the event loop's thread, from the uint8 images the engine sent."""

import base64
import time
from typing import Any

from app.api.convert import cache_body, guidance_body
from app.api.service import Service
from app.engine import Finished, TraceRow
from app.images import to_png_bytes
from app.sampling import Preview, SampleSpec


def png_base64(image: Any) -> str:
    return base64.b64encode(to_png_bytes(image)).decode()


def result_body(service: Service, model: str, spec: SampleSpec, result: Finished, arrived: float) -> dict[str, Any]:
    names = service.limits.class_names(model)
    return {
        "model": model,
        "class_label": spec.class_label,
        "class_name": None if spec.class_label is None else names[spec.class_label],
        "num_images": spec.num_images,
        "steps": spec.steps,
        "sampler": spec.sampler,
        "guidance_scale": spec.guidance.guidance_scale,
        "guidance": guidance_body(spec.guidance),
        "cache": cache_body(spec.cache),
        "trace": None if result.trace is None else list(result.trace),
        "images": [png_base64(img) for img in result.images],
        "seeds": list(spec.seeds),
        "timings": {
            "queue_wait_s": round(result.queue_wait_s, 4),
            "compute_s": round(result.compute_s, 4),
            "total_s": round(time.monotonic() - arrived, 4),
        },
    }


def preview_body(preview: Preview) -> dict[str, Any]:
    return {"step": preview.step, "images": [png_base64(img) for img in preview.images]}


def progress_body(
    step: int,
    steps: int,
    queue_position: int | None,
    queued: bool,
    trace: list[TraceRow] | None,
    preview: Preview | None,
    preempted: bool = False,
    change: str | None = None,
) -> dict[str, Any]:
    """A `progress` event: the step, the place in the queue, the trace rows of the steps taken since the last event
    (with return_trace), and a preview newer than the last event's. status: queued, running, or preempted (out of
    the batch for interactive work, in the queue again); event: "preempted" or "resumed" on the event at that
    change."""
    event: dict[str, Any] = {
        "step": step,
        "steps": steps,
        "queued": queued,
        "status": "preempted" if preempted else "queued" if queued else "running",
        "queue_position": queue_position,
    }
    if change is not None:
        event["event"] = change
    if trace is not None:
        event["trace"] = trace
    if preview is not None:
        event["preview"] = preview_body(preview)
    return event
