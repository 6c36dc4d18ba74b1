"""Request limits of the real FastAPI app: body and header caps before a handler reads anything,
JSON that is too deep or has absurd numbers, and short error bodies without paths or tracebacks.
(No stages are connected: a request that passes every check gets 503 stage_unavailable.)"""
from __future__ import annotations

import asyncio
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_app.errors import stage_error
from serve_app.http_limits import MAX_HEADER_BYTES, MAX_HEADERS
from serve_app.ingress import IngressSettings, LanceService, build_fastapi_app
from serve_app.knobs import RequestLimits

MAX_ERROR_BODY = 32 * 1024


SETTINGS = IngressSettings(served_model_name="lance-test", model_path="/models/lance",
                           limits=RequestLimits(max_image_bytes=1000, max_video_bytes=1000))   # body cap ~4 MiB


def make_app():
    return build_fastapi_app(LanceService(SETTINGS))


@pytest.fixture(scope="module")
def app():
    return make_app()


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app, raise_server_exceptions=False)


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    assert len(r.content) < MAX_ERROR_BODY
    err = r.json()["error"]
    assert code is None or err["code"] == code, err
    assert "Traceback" not in r.text and "/work/" not in r.text and ".py" not in r.text
    return err


def chat_bytes(text_len: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "x" * text_len}]}).encode()


def test_declared_body_over_the_cap_is_refused_unread(app):
    limit = SETTINGS.max_body_bytes
    reads = []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "",
             "query_string": b"", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "http_version": "1.1",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(limit + 1).encode())]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and reads == []
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/images/generations"])
def test_chunked_body_over_the_cap_is_413(client, route):
    body = chat_bytes(6 * 2**20)

    def chunks():   # no Content-Length: the cap applies while the body arrives
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    assert_error(client.post(route, content=chunks(), headers={"content-type": "application/json"}),
                 413, "request_too_large")


def test_multipart_over_the_cap_is_413(client):
    big = b"x" * (6 * 2**20)

    def chunks():
        head = (b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                b"Content-Type: image/png\r\n\r\n")
        yield head
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
        yield b"\r\n--B--\r\n"

    r = client.post("/v1/images/edits", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=B"})
    assert_error(r, 413, "request_too_large")


def test_body_under_the_cap_passes(client):
    r = client.post("/v1/chat/completions", content=chat_bytes(1000),
                    headers={"content-type": "application/json"})
    assert_error(r, 503, "stage_unavailable")


def test_header_limits(client):
    many = {f"x-h{i}": "1" for i in range(MAX_HEADERS + 1)}
    assert_error(client.get("/v1/models", headers=many), 431, "headers_too_large")
    assert_error(client.get("/v1/models", headers={"x-big": "a" * MAX_HEADER_BYTES}), 431,
                 "headers_too_large")
    assert client.get("/v1/models", headers={"x-ok": "a" * 1000}).status_code == 200


MSGS = '[{"role":"user","content":"hi"}]'
BAD_JSON = {
    "deep array": '{"messages":' + MSGS + ',"metadata":' + "[" * 5000 + "]" * 5000 + "}",
    "deep object": '{"prompt":"x","user":' + '{"a":' * 1000 + "1" + "}" * 1000 + "}",
    "huge int": '{"messages":' + MSGS + ',"seed":' + "9" * 5000 + "}",
    "huge float": '{"messages":' + MSGS + ',"temperature":1e999}',
    "NaN": '{"messages":' + MSGS + ',"temperature":NaN}',
    "huge max_tokens": '{"messages":' + MSGS + ',"max_tokens":' + "9" * 30 + "}",
    "not utf-8": b'{"messages":[{"role":"user","content":"\xff\xfe"}]}',
    "empty": "",
    "array": "[]",
    "truncated": '{"messages":[{"role":',
}


@pytest.mark.parametrize("name", BAD_JSON)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/images/generations"])
def test_bad_json_is_a_short_400(client, name, route):
    body = BAD_JSON[name]
    r = client.post(route, content=body if isinstance(body, bytes) else body.encode(),
                    headers={"content-type": "application/json"})
    assert_error(r, 400)


@pytest.mark.parametrize("field,value", [("cfg_interval", "[" * 100_000 + "]" * 100_000),
                                         ("seed", "9" * 5000), ("n", "nan"),
                                         ("extra_body", '{"a":' * 5000 + "1" + "}" * 5000)])
def test_bad_form_fields_are_400(client, field, value):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    png = buf.getvalue()
    r = client.post("/v1/images/edits", files={"image": ("a.png", png, "image/png")},
                    data={"prompt": "x", field: value})
    assert_error(r, 400)


def test_server_error_messages_are_short_and_path_free():
    exc = RuntimeError("failed in /work/main/stages/dit/engine.py line 3\nTraceback (most recent "
                       "call last):\n  File \"/usr/lib/python3.11/x.py\"\n" + "y" * 100_000)
    err = stage_error(exc, "dit")
    body = json.dumps(err.body())
    assert err.status == 500 and len(body) < 4096
    assert "/work/" not in body and "/usr/" not in body and "Traceback" not in body
    assert "the dit stage failed: RuntimeError" in body
