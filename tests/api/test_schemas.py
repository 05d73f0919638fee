"""app.api.schemas: the request schema's guidance defaults, validated once and handed out as copies (or, for
the frozen method settings, shared)."""

import pytest
from pydantic import ValidationError

from app.api.schemas import Limits, build_generate_request, request_fields
from app.sampling import DEFAULT_GUIDANCE

LIMITS = Limits(
    models=(("m", ("a", "b")),), max_images=4, max_steps=50, default_steps=20, max_guidance_scale=20, max_noise_level=1
)


def test_each_request_gets_its_own_copy_of_the_default_schedule_and_method():
    GenerateRequest = build_generate_request(LIMITS)
    first, second = GenerateRequest.model_validate({}), GenerateRequest.model_validate({})
    assert first.schedule == second.schedule and first.schedule is not second.schedule
    with pytest.raises(ValidationError, match="frozen"):  # the one default method is shared, and cannot change
        first.method.kind = "apg"
    assert first.method == DEFAULT_GUIDANCE.method
    assert first.schedule.model_dump(exclude_none=True) == request_fields(DEFAULT_GUIDANCE.schedule)
    first.schedule.sigma_max = 9.0  # a request that changed its copy leaves the next request's default alone
    assert GenerateRequest.model_validate({}).schedule.sigma_max == DEFAULT_GUIDANCE.schedule.sigma_max


def test_echoed_fields_are_a_fresh_dict_each_time():
    fields = request_fields(DEFAULT_GUIDANCE.schedule)
    fields["kind"] = "changed"
    assert request_fields(DEFAULT_GUIDANCE.schedule)["kind"] == DEFAULT_GUIDANCE.schedule.kind
