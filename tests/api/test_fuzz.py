"""Property-based fuzz of the whole API (schemathesis over the app's own OpenAPI document).

Every operation in the document gets generated requests, valid and invalid, sent to the real app with the
shipped checkpoint (its lifespan run by schemathesis's ASGI client), at small limits so that the requests
that pass validation generate quickly. Each response must be no 5xx, have a documented status and
content type, and match its documented schema. A second test follows the document's links, so job ids from
POST /v1/jobs reach GET, DELETE and /events.

The run is derandomized (the same examples each run) and sized for CI: FUZZ_EXAMPLES examples per
operation (default 30). Before a release, run it longer (docs/testing.md):
    FUZZ_EXAMPLES=2000 python3 -m pytest -q tests/api/test_fuzz.py
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.stateful import run_state_machine_as_test
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.main import create_app

pytestmark = pytest.mark.integration  # generates with the shipped checkpoint, over a minute

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))


def not_a_server_error_unless_its_deadline_was_missed(ctx, response, case):
    """not_a_server_error, save the answers the API documents for a deadline the client set itself (timeout_s):
    503 "rejected" where the engine's pace says it cannot be met, 504 "timeout" where it ran out. The fuzzer
    draws deadlines of 1e-287 s; what the server did wrong, it still reports."""
    body = case.body if isinstance(case.body, dict) else {}
    if body.get("timeout_s") is not None and response.status_code in (503, 504):
        answer = response.json()  # /generate: {detail, outcome}; /v1/images/generations: {error: {code}}
        outcome = answer["outcome"] if "outcome" in answer else answer["error"]["code"]
        if (response.status_code, outcome) in ((503, "rejected"), (504, "timeout")) and "timeout" in response.text:
            return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    not_a_server_error_unless_its_deadline_was_missed,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def in_dict(rebuild: Callable[[Any], Any], value: dict, key: Any) -> Callable[[Any], Any]:
    """rebuild, given value with its item at key replaced."""
    return lambda new: rebuild({**value, key: new})


def in_list(rebuild: Callable[[Any], Any], value: list, i: int) -> Callable[[Any], Any]:
    """rebuild, given value with its item at i replaced."""
    return lambda new: rebuild([*value[:i], new, *value[i + 1 :]])


def with_lone_surrogates(body: Any) -> list[Any]:
    """Copies of a JSON body, each with one of its strings (a value or a key) carrying a lone UTF-16 surrogate:
    JSON can escape one ("\\ud800") and Python reads it, but UTF-8 cannot encode it. schemathesis draws only
    encodable text, and echoing such a string in a 422 was a 500 (issue 22)."""
    variants: list[Any] = []

    def walk(value: Any, rebuild: Callable[[Any], Any]) -> None:
        if isinstance(value, str):
            variants.append(rebuild(value + "\ud800"))
        elif isinstance(value, dict):
            if value:
                first = next(iter(value))
                variants.append(rebuild({("\udc00" + k if k == first else k): v for k, v in value.items()}))
            for key, item in value.items():
                walk(item, in_dict(rebuild, value, key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, in_list(rebuild, value, i))

    walk(body, lambda new: new)
    return variants


@pytest.fixture(scope="module")
def api_schema():
    app = create_app(Settings(max_steps=2, default_steps=2, max_images=2, max_batch_rows=4, warmup=False))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)

    @schema.hook
    def flatmap_body(context, body):
        variants = with_lone_surrogates(body)
        return st.one_of(st.just(body), st.sampled_from(variants)) if variants else st.just(body)

    yield schema
    asgi.shutdown_lifespans()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@FUZZ_SETTINGS
def test_no_request_gets_a_server_error_and_every_response_matches_its_documented_schema(case):
    case.call_and_validate(checks=CHECKS)


def test_job_ids_from_post_reach_get_delete_and_events(api_schema):
    followed: set[tuple[str, int]] = set()  # (operation, status) of the calls made with a job's id
    answered: dict[tuple[str, int], int] = {}  # every call's (operation, status): how many, for the message

    class Workflow(api_schema.as_state_machine()):
        def validate_response(self, response, case, additional_checks=None, **kwargs):
            key = (case.operation.label, response.status_code)
            answered[key] = answered.get(key, 0) + 1
            if "{job_id}" in case.operation.path:
                followed.add(key)
            case.validate_response(response, checks=CHECKS)

    wanted = [
        {("GET /v1/jobs/{job_id}", 200)},
        {("GET /v1/jobs/{job_id}/events", 200)},
        {("DELETE /v1/jobs/{job_id}", 200), ("DELETE /v1/jobs/{job_id}", 409)},
    ]
    # The draws are derandomized, but which links a run follows depends on the answers, and those on timing (a
    # job is queued, running or finished when the next call comes): under load the same draws took no DELETE
    # link. So a run that missed a route is followed by a longer one (other draws), twice at most.
    for examples in (max(EXAMPLES // 2, 10), max(EXAMPLES, 20), max(2 * EXAMPLES, 40)):
        run_state_machine_as_test(
            Workflow, settings=settings(FUZZ_SETTINGS, max_examples=examples, stateful_step_count=6)
        )
        if all(followed & each for each in wanted):
            break
    # The links took real ids to each route (a made-up id would get 404): a job was read, its events
    # streamed to the end, and a job cancelled, or found finished already (409).
    for each in wanted:
        assert followed & each, (each, sorted(answered.items()))
