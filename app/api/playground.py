"""The browser playground: one static page at `/`, its assets under `/static/`, and the guidance curve it
draws, computed by the sampler's own code (`POST /v1/guidance/curve`) rather than redone in JavaScript."""

from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, HTTPException, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel

from app.api.convert import to_spec
from app.api.media import JSON, json_body, produces
from app.api.methods import with_default_cache
from app.api.responses import ValidationErrorBody, refusals
from app.api.schemas import Limits, build_generate_request
from app.api.service import ServiceDep
from app.api.waiting import refusal

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# The page is small and changes with the app: the browser revalidates (ETag) instead of caching blindly.
_NO_CACHE = {"Cache-Control": "no-cache"}


def static_file(name: str) -> FileResponse:
    """A file of app/static by its relative name; 404 for anything outside it or missing."""
    path = (STATIC_DIR / name).resolve()
    if not path.is_relative_to(STATIC_DIR) or not path.is_file():
        raise HTTPException(404, "not found")
    return FileResponse(path, headers=_NO_CACHE)


class CurveStep(BaseModel):
    step: int
    timestep: int
    sigma: float
    scale: float  # s_i
    noise_level: float  # noise_level times the noise schedule's factor at this step


class GuidanceCurve(BaseModel):
    steps: list[CurveStep]


def build_playground_router(limits: Limits) -> APIRouter:
    router = APIRouter()
    if TYPE_CHECKING:  # the model is built per Limits at runtime: the type checker reads what routes use of it
        from app.api.schemas import GenerateBody as GenerateRequest
    else:
        GenerateRequest = build_generate_request(limits)

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return static_file("index.html")

    @router.get("/static/{name:path}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        return static_file(name)

    @router.post(
        "/v1/guidance/curve",
        response_model=GuidanceCurve,
        responses={
            422: {"model": ValidationErrorBody, "description": "invalid request, as for /generate"},
            **refusals(),
        },
        dependencies=[Depends(json_body), Depends(produces(JSON))],
        summary="The per-step guidance scale, sigma and noise level a /generate body would use",
    )
    async def guidance_curve(body: GenerateRequest, service: ServiceDep) -> GuidanceCurve | Response:
        # Computed by the engine, in the model's thread, from the model's scheduler: refused until it is loaded.
        if (refused := refusal(service)) is not None:
            return refused.response()
        # Seeds and image count do not change the curve: one image's run is enough.
        spec = replace(to_spec(with_default_cache(service, body)), seeds=(0,))
        points = await service.model(body.model).client.guidance_curve(spec)
        return GuidanceCurve(steps=[CurveStep(**asdict(p)) for p in points])

    return router
