"""app.guidance.registry: the form description of every method's settings (GET /v1/models, the playground)."""

from typing import Literal

import pytest
from pydantic import Field

from app.guidance import GUIDERS, Guider, MethodParams, method_fields, register_guider, unregister_guider


class FormTestMethod(MethodParams):
    kind: Literal["form_test"] = "form_test"
    strength: float = Field(2.0, gt=0, le=10, description="more")
    count: int = Field(3, ge=1, le=8)
    on: bool = True
    layers: tuple[int, ...] | None = Field(None, description="ids")
    mode: Literal["a", "b"] = "a"
    name: str | None = None


class FormTest(Guider):
    params_model = FormTestMethod


@pytest.fixture
def registered():
    register_guider(FormTest)
    try:
        yield
    finally:
        unregister_guider("form_test")


def test_every_field_but_kind_with_its_type_default_bounds_and_choices(registered):
    fields = method_fields()["form_test"]
    assert fields == [
        {
            "name": "strength",
            "type": "number",
            "default": 2.0,
            "minimum": 0,
            "maximum": 10,
            "description": "more",
        },
        {"name": "count", "type": "integer", "default": 3, "minimum": 1, "maximum": 8},
        {"name": "on", "type": "boolean", "default": True},
        {
            "name": "layers",
            "type": "array",
            "default": None,
            "items": "integer",
            "nullable": True,
            "description": "ids",
        },
        {"name": "mode", "type": "string", "default": "a", "enum": ["a", "b"]},
        {"name": "name", "type": "string", "default": None, "nullable": True},
    ]


def test_every_registered_method_is_described_in_its_order():
    described = method_fields()
    assert list(described) == list(GUIDERS)
    assert [f["name"] for f in described["apg"]] == ["eta", "momentum", "norm_threshold"]
    assert described["cfg"] == []
