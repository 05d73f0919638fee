"""The benchmarks' load client posts the work its raw loop draws: through the real app with the shipped checkpoint
(whose manifest names a default step cache, uncond every 2), its request runs every unconditional row, as the raw
loop (bench_service.raw_images_per_s, uncached) and the figures recorded before models had a default cache did."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from bench.load_client import request_body
from tests.metrics import metric_value

pytestmark = pytest.mark.integration  # the subject is the shipped checkpoint's default cache

REUSED = 'cfg_engine_reused_uncond_rows_total{model="fashion-mnist-cfg"}'


def test_the_load_clients_request_reuses_no_unconditional_row():
    with TestClient(create_app(Settings(warmup=False))) as c:
        body = {**request_body(steps=4, images=2), "class_label": 3, "seed": 7}
        out = c.post("/generate", json=body)
        assert out.status_code == 200, out.text
        assert metric_value(c.get("/metrics").text, REUSED) == 0
        # the same request without its cache takes the model's default, which does reuse them
        del body["cache"]
        assert c.post("/generate", json=body).status_code == 200
        assert metric_value(c.get("/metrics").text, REUSED) > 0
