"""CFG_MAX_BODY_BYTES: a body over the limit gets 413 naming it, on every route, before it is read whole."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

pytestmark = pytest.mark.stand_in  # the subject is the API, not the model (tests/stand_in.py)

LIMIT = 4096


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(max_body_bytes=LIMIT, warmup=False))) as c:
        yield c


def padded(size: int) -> bytes:
    """A valid /generate body of exactly size bytes (JSON allows the trailing spaces)."""
    body = json.dumps({"class_label": 1, "steps": 2, "seed": 3}).encode()
    return body + b" " * (size - len(body))


def chunks(body: bytes, size: int = 1024) -> Iterator[bytes]:
    """The body streamed in chunks: httpx sends it chunked, with no Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_the_default_limit_is_64_kib():
    assert Settings().max_body_bytes == 65536


@pytest.mark.parametrize("stream", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("method, path", [("POST", "/generate"), ("POST", "/v1/jobs"), ("GET", "/v1/models"),
                                          ("POST", "/v1/guidance/curve"), ("PUT", "/nowhere")])  # fmt: skip
def test_a_body_over_the_limit_is_a_413_naming_it_on_every_route(client, method, path, stream):
    body = padded(LIMIT + 1)
    r = client.request(
        method, path, content=chunks(body) if stream else body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413, r.text
    assert f"{LIMIT} bytes" in r.json()["detail"] and "CFG_MAX_BODY_BYTES" in r.json()["detail"]


@pytest.mark.parametrize("stream", [False, True], ids=["content-length", "chunked"])
def test_the_openai_endpoint_refuses_it_in_openai_s_shape(client, stream):
    body = json.dumps({"prompt": "Sneaker", "user": "u" * LIMIT}).encode()
    r = client.post(
        "/v1/images/generations", content=chunks(body) if stream else body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and f"{LIMIT} bytes" in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["content-length", "chunked"])
def test_a_body_at_the_limit_is_served(client, stream):
    body = padded(LIMIT)
    r = client.post("/generate", content=chunks(body) if stream else body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["seeds"] == [3]


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert found is not None, status
    return int(found[1]) * 1024


def test_a_50_mb_body_against_a_real_server_is_refused_and_its_memory_stays_flat(start_server):
    """Without the limit, this body was read whole and its 422 echoed it twice: the process held ~1 GB."""
    server = start_server(warmup="false")
    with httpx.Client(base_url=server.url, timeout=120) as http:
        assert http.post("/generate", json={"class_label": 1, "steps": 2}).status_code == 200  # the request path warm
        before = rss_bytes(server.proc.pid)
        big = b'{"class_label": "' + b"a" * 50_000_000 + b'"}'
        for content in (chunks(big, 1 << 16), big):  # streamed (counted as it comes), then with a Content-Length
            r = http.post("/generate", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text[:300]
            assert "65536 bytes" in r.json()["detail"] and len(r.content) < 1000
        after = rss_bytes(server.proc.pid)
        # The server discards the rest of the body as it arrives: at most a chunk or two is ever held.
        assert after - before < 16 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB"
        assert http.post("/generate", json={"class_label": 2, "steps": 2}).status_code == 200  # and it still serves
