"""POST /v1/images/generations through the official openai client, against the real server process."""

import base64
import io
import json
import socket
import time

import httpx
import openai
import pytest
from PIL import Image

from tests.pngs import level_diff, same_images

pytestmark = pytest.mark.integration

MODEL = "fashion-mnist-cfg"
GUIDANCE = {"guidance_scale": 3.0, "steps": 4, "seed": 1}


def client_for(server) -> openai.OpenAI:
    # No retries: a 503 must reach the test, not be retried by the client.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def b64s(response) -> list[str]:
    return [image.b64_json for image in response.data]


def wait_until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError


def test_images_are_pngs_that_reproduce_and_match_generate(start_server):
    server = start_server(warmup="false")
    client = client_for(server)
    first = client.images.generate(
        model=MODEL,
        prompt="Sneaker",
        n=2,
        response_format="b64_json",
        size="28x28",
        output_format="png",
        user="test-user",
        stream=False,
        extra_body=GUIDANCE,
    )
    assert abs(first.created - time.time()) < 600
    assert [image.revised_prompt for image in first.data] == ["Sneaker", "Sneaker"]
    assert first.model_extra["seeds"] == [1, 2] and first.size == "28x28" and first.output_format == "png"
    for b64 in b64s(first):
        png = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert png.format == "PNG" and png.size == (28, 28)
    assert b64s(first)[0] != b64s(first)[1]

    # The same seed gives the same images; the name is case-insensitive; "class 7" is the same class;
    # the image with seed 2 is the second image of seed 1.
    assert same_images(b64s(client.images.generate(prompt="sneaker", n=2, extra_body=GUIDANCE)), b64s(first))
    by_index = client.images.generate(prompt="class 7", extra_body={**GUIDANCE, "seed": 2})
    assert by_index.data[0].revised_prompt == "Sneaker" and level_diff(b64s(by_index)[0], b64s(first)[1]) <= 1
    other_seed = client.images.generate(prompt="Sneaker", n=2, extra_body={**GUIDANCE, "seed": 3})
    assert b64s(other_seed)[0] not in b64s(first)

    # The same request as POST /generate gives the same images, with every guidance field passed through.
    generate = httpx.post(f"{server.url}/generate", json={"class_label": 7, "num_images": 2, **GUIDANCE}, timeout=120)
    assert same_images(generate.json()["images"], b64s(first))
    guidance = {
        "steps": 3,
        "seed": 5,
        "sampler": "ddim",
        "guidance_scale": 4.0,
        "method": {"kind": "apg", "eta": 0.5},
        "schedule": {"kind": "linear", "start": 0, "end": 1},
        "noise_level": 0.1,
        "noise_schedule": "sigma",
        "cads": {"tau1": 0.5},
        "guidance_rescale": 0.5,
    }
    images = client.images.generate(prompt="Dress", n=2, extra_body=guidance)
    generate = httpx.post(f"{server.url}/generate", json={"class_label": 3, "num_images": 2, **guidance}, timeout=120)
    assert same_images(generate.json()["images"], b64s(images))
    assert server.metric("cfg_requests_total", 'outcome="ok"') == 7  # five here, two by /generate


# (openai client arguments, error class, param, words the message must hold)
INVALID = [
    ({"prompt": "a cat"}, openai.BadRequestError, "prompt", ["Sneaker", "Ankle boot", "class N"]),
    ({"prompt": "class 12"}, openai.BadRequestError, "prompt", ["Sneaker", "0..9"]),
    ({"prompt": "Bag", "n": 17}, openai.BadRequestError, "n", ["n:", "16"]),
    ({"prompt": "Bag", "n": 0}, openai.BadRequestError, "n", ["n:", "1"]),
    ({"prompt": "Bag", "response_format": "url"}, openai.BadRequestError, "response_format", ["url", "b64_json"]),
    ({"prompt": "Bag", "model": "dall-e-3"}, openai.NotFoundError, "model", ["dall-e-3", MODEL]),
    ({"prompt": "Bag", "size": "1024x1024"}, openai.BadRequestError, "size", ["1024x1024", "28x28"]),
    ({"prompt": "Bag", "quality": "hd"}, openai.BadRequestError, "quality", ["quality does not apply"]),
    ({"prompt": "Bag", "style": "vivid"}, openai.BadRequestError, "style", ["style does not apply"]),
    ({"prompt": "Bag", "background": "transparent"}, openai.BadRequestError, "background", ["background"]),
    ({"prompt": "Bag", "moderation": "low"}, openai.BadRequestError, "moderation", ["moderation"]),
    ({"prompt": "Bag", "output_compression": 50}, openai.BadRequestError, "output_compression", ["PNG"]),
    ({"prompt": "Bag", "output_format": "webp"}, openai.BadRequestError, "output_format", ["png"]),
    ({"prompt": "Bag", "partial_images": 2}, openai.BadRequestError, "partial_images", ["partial_images"]),
    ({"prompt": "Bag", "stream": True}, openai.BadRequestError, "stream", ["stream", "/generate"]),
    ({"prompt": "Bag", "extra_body": {"foo": 1}}, openai.BadRequestError, "foo", ["unknown field 'foo'"]),
    ({"prompt": "Bag", "extra_body": {"class_label": 3}}, openai.BadRequestError, "class_label", ["use prompt"]),
    ({"prompt": "Bag", "extra_body": {"return_trace": True}}, openai.BadRequestError, "return_trace", ["/generate"]),
    ({"prompt": "Bag", "extra_body": {"guidance_scale": 99}}, openai.BadRequestError, "guidance_scale", ["30"]),
    ({"prompt": "Bag", "extra_body": {"steps": 0}}, openai.BadRequestError, "steps", ["steps:"]),
    ({"prompt": "Bag", "extra_body": {"sampler": "plms"}}, openai.BadRequestError, "sampler", ["dpmpp_2m"]),
    (
        {"prompt": "Bag", "extra_body": {"schedule": {"kind": "interval", "sigma_min": 3, "sigma_max": 2}}},
        openai.BadRequestError,
        "schedule",
        ["sigma_min (3) must be below sigma_max (2)"],
    ),
    ({"prompt": "Bag", "extra_body": {"method": {"kind": "sag"}}}, openai.BadRequestError, "method", ["apg"]),
    ({"prompt": "Bag", "extra_body": {"cads": {"psi": 2}}}, openai.BadRequestError, "cads", ["cads.psi"]),
]


def test_invalid_requests_raise_the_openai_error_naming_the_field(start_server):
    server = start_server(warmup="false")
    client = client_for(server)
    for kwargs, error, param, words in INVALID:
        with pytest.raises(error) as caught:
            client.images.generate(**kwargs)
        exc = caught.value
        assert exc.param == param and exc.type == "invalid_request_error", (kwargs, exc.body)
        assert all(word in exc.message for word in words), (kwargs, exc.message)
    assert exc.code is None
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt="Bag", model="gpt-image-1")
    assert caught.value.code == "model_not_found"

    # Bodies the client would not send: OpenAI's shape all the same.
    json_type = {"content-type": "application/json"}
    for content in (b"{not json", b"[1, 2]", b'{"prompt": "Bag", "guidance_scale": NaN}', b'{"n": 1}'):
        r = httpx.post(f"{server.url}/v1/images/generations", content=content, headers=json_type, timeout=30)
        error = r.json()["error"]
        assert r.status_code == 400 and set(error) == {"message", "type", "param", "code"}, r.text
        assert error["type"] == "invalid_request_error" and error["message"]
    r = httpx.post(f"{server.url}/v1/images/generations", content=b'{"prompt": "Bag"}', timeout=30)  # no type
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    assert server.metric("cfg_requests_total", 'outcome="invalid"') == len(INVALID) + 6
    assert server.metric("cfg_requests_total", 'outcome="ok"') == 0


def open_request(url: str, body: dict, path: str = "/v1/images/generations") -> socket.socket:
    """POST on a raw connection and leave it open: closing the socket is the client hanging up."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall("\r\n".join([*head, f"Content-Length: {len(data)}", "", ""]).encode() + data)
    return sock


def test_full_queue_is_a_503_with_retry_after(start_server):
    server = start_server(warmup="false", max_queue=0, retry_after_s=7)
    # All 32 rows at every step, for a while: constant guidance and no step cache (the default interval, and the
    # default cache's skipped steps, would leave rows free; this endpoint takes no cache, so /generate's request).
    body = {"class_label": "Coat", "num_images": 16, "steps": 200, "schedule": {"kind": "constant"}}
    running = open_request(server.url, {**body, "cache": {"kind": "none"}}, path="/generate")
    wait_until(lambda: server.metric("cfg_requests_in_flight") == 1)
    with pytest.raises(openai.InternalServerError) as caught:
        client_for(server).images.generate(prompt="Bag", extra_body={"steps": 2})
    exc = caught.value
    assert exc.status_code == 503 and exc.response.headers["retry-after"] == "7", exc.body
    assert "queue full" in exc.message and exc.code == "rejected"
    assert server.metric("cfg_requests_total", 'outcome="rejected"') == 1
    running.close()
    wait_until(lambda: server.metric("cfg_requests_total", 'outcome="cancelled"') == 1)
