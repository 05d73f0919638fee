"""What a malformed, ill-typed or mis-labelled request gets: a 4xx naming the field, or the media type, and what
is allowed; never a 500. Through the real app's lifespan and the shipped checkpoint, at small limits."""

import json

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

pytestmark = pytest.mark.stand_in  # the subject is the API, not the model (tests/stand_in.py)

BODY_ROUTES = ["/generate", "/v1/jobs", "/v1/guidance/curve"]
OPENAI = "/v1/images/generations"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client():
    settings = Settings(max_steps=4, default_steps=4, max_images=2, max_batch_rows=4, warmup=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def post_raw(client, path: str, raw: str, headers: dict[str, str] = JSON):
    return client.post(path, content=raw.encode(), headers=headers)


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize(
    "raw, loc",
    [
        ('{"class_label": "\\ud800"}', ["body", "class_label"]),  # a value /generate echoes back
        ('{"class_label": "Sneaker", "cads": {"\\udc00tau1": 0.5}}', ["body", "cads"]),  # a key it names
        ('{"sampler": "ddim\\ud83d"}', ["body", "sampler"]),  # half of a surrogate pair
    ],
)
def test_a_string_utf8_cannot_encode_gets_a_422_that_echoes_it_escaped(client, path, raw, loc):
    r = post_raw(client, path, raw)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][: len(loc)] == loc for e in errors), errors
    assert "\\ud8" in r.text or "\\udc00" in r.text  # escaped, as text a client can print


def test_a_lone_surrogate_in_an_openai_field_gets_its_400(client):
    r = post_raw(client, OPENAI, '{"prompt": "Sneaker", "user": 7, "\\udc00x": 1}')
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("user", "\\udc00x")
    r = post_raw(client, OPENAI, '{"prompt": "Sneaker", "\\udc00x": 1}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "\\udc00x", r.text


@pytest.mark.parametrize("model", [{"a": 1}, [1], ["fashion-mnist-cfg"], 7, True])
def test_a_model_that_is_no_string_is_a_400_naming_model_on_the_openai_endpoint(client, model):
    r = client.post(OPENAI, json={"prompt": "Sneaker", "model": model})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and "fashion-mnist-cfg" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_a_long_value_is_echoed_cut_short(client, path):
    long = "q" * 60_000  # under the body limit: what is bounded here is the echo
    r = client.post(path, json={"class_label": long})
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "class_label"]
    assert "characters cut" in error["input"] and len(error["input"]) < 300
    assert "known classes: T-shirt/top" in error["msg"]  # the end of the message, which says what is allowed
    assert len(r.content) < 2_000


def test_an_openai_message_quoting_a_long_value_is_cut_short(client):
    r = client.post(OPENAI, json={"prompt": "Sneaker", "q" * 50_000: 1})
    assert r.status_code == 400 and len(r.content) < 2_000, r.text[:300]
    assert "unknown field" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", [*BODY_ROUTES, OPENAI])
@pytest.mark.parametrize("raw", [b'{"class_label": "\xff\xfe"}', b"[" * 50_000, b'{"seed": 1' + b"0" * 5000 + b"}"])
def test_a_body_that_is_no_utf8_json_is_a_4xx_naming_the_body(client, path, raw):
    r = client.post(path, content=raw, headers=JSON)
    if path == OPENAI:
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text
    else:
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"][0] == "body" and error["type"] == "json_invalid"


@pytest.mark.parametrize("path", [*BODY_ROUTES, OPENAI])
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_a_body_not_sent_as_json_is_a_415_naming_json(client, path, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post(path, content=b'{"class_label": 1, "prompt": "Sneaker"}', headers=headers)
    assert r.status_code == 415, r.text
    message = r.json()["error"]["message"] if path == OPENAI else r.json()["detail"]
    assert "Content-Type: application/json" in message


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON", "application/x+json"])
def test_json_with_parameters_or_a_json_suffix_is_taken(client, content_type):
    headers = {"content-type": content_type}
    r = client.post("/v1/guidance/curve", content=b'{"class_label": 1, "steps": 3}', headers=headers)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "path, method, accept, offered",
    [
        ("/generate", "POST", "image/jpeg", "application/json, image/png, text/event-stream"),
        ("/generate", "POST", "application/json;q=0, image/png;q=0, text/*;q=0", "text/event-stream"),
        ("/v1/jobs", "POST", "text/html", "application/json"),
        ("/v1/guidance/curve", "POST", "image/png", "application/json"),
        (OPENAI, "POST", "image/png", "application/json"),
        ("/v1/models", "GET", "text/html", "application/json"),
        ("/metrics", "GET", "application/json", "text/plain"),
        ("/v1/jobs/0/events", "GET", "application/json", "text/event-stream"),
    ],
)
def test_an_accept_the_route_cannot_produce_is_a_406_naming_what_it_can(client, path, method, accept, offered):
    body = {"class_label": 1, "steps": 2, "prompt": "Sneaker"} if method == "POST" else None
    if path == OPENAI:
        body = {"prompt": "Sneaker"}
    r = client.request(method, path, json=body, headers={"accept": accept})
    assert r.status_code == 406, r.text
    message = r.json()["error"]["message"] if path == OPENAI else r.json()["detail"]
    assert offered in message and "Accept" in message


@pytest.mark.parametrize(
    "accept, content_type",
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("", "application/json"),
        ("image/*", "image/png"),
        ("image/png", "image/png"),
        ("image/png;q=0.5, application/json", "application/json"),
        ("application/json;q=0.1, image/png", "image/png"),
        ("image/png;q=0, */*", "application/json"),
        ("text/html, image/png;q=0.9", "image/png"),  # a browser's: what it can take, then the rest
        ("text/event-stream", "text/event-stream"),
        ("TEXT/Event-Stream; charset=utf-8", "text/event-stream"),
    ],
)
def test_wildcards_missing_accept_and_q_values_choose_what_generate_sends(client, accept, content_type):
    headers = {} if accept is None else {"accept": accept}
    r = client.post("/generate", json={"class_label": 1, "steps": 2, "seed": 1}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].split(";")[0] == content_type


def test_the_openapi_document_gives_responses_their_schemas_and_links_job_ids(client):
    doc = client.get("/openapi.json").json()
    generate = doc["paths"]["/generate"]["post"]["responses"]
    assert generate["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/GenerateResponse"}
    assert {"406", "413", "415", "422"} <= set(generate)
    created = doc["paths"]["/v1/jobs"]["post"]["responses"]["202"]
    assert created["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobResponse"}
    links = {link["operationId"] for link in created["links"].values()}
    assert links == {"get_job", "get_job_events", "cancel_job"}
    errors = doc["paths"][OPENAI]["post"]["responses"]
    for status in ("400", "415"):
        assert errors[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OpenAIError"}
    events = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]
    assert "application/json" in events["404"]["content"] and "text/event-stream" in events["200"]["content"]
    json.dumps(doc)  # and it is JSON all through


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("field", ["schedule", "method", "cache"])
def test_a_union_field_without_its_kind_is_a_422_naming_the_kinds_it_allows(client, path, field):
    # pydantic's own message says only that it found no tag; the allowed kinds are those an unknown kind lists
    unknown = client.post(path, json={field: {"kind": "nope"}})
    assert unknown.status_code == 422, unknown.text
    (refused,) = unknown.json()["detail"]
    allowed = refused["ctx"]["expected_tags"]
    missing = client.post(path, json={field: {"scale": 2}})
    assert missing.status_code == 422, missing.text
    (error,) = missing.json()["detail"]
    assert error["loc"] == ["body", field] and error["type"] == "union_tag_not_found"
    assert error["msg"] == f"{field}.kind is required: one of {allowed}"
    assert error["ctx"]["expected_tags"] == allowed and allowed.startswith("'")
