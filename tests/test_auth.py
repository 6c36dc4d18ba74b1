"""API keys on the real FastAPI app (no stages connected: an authorized generation request reaches the
stage call and gets 503, an unauthorized one never gets that far). The same checks against the real
`serve run` app, with the OpenAI SDK, live in tests/test_serve_hardening_e2e.py."""
from __future__ import annotations

import secrets

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from serve_app import auth
from serve_app.auth import APIKeyError, KeyChecker, bearer_token, resolve_api_keys
from serve_app.app_config import parse_app_args
from serve_app.ingress import PLAYGROUND_PATHS, IngressSettings, LanceService, build_fastapi_app

KEYS = ["sk-first-key-0123456789", "sk-second-key-abcdef"]
CHAT = {"model": "lance-test", "messages": [{"role": "user", "content": "hi"}]}


def make_app(keys=KEYS):
    s = IngressSettings(served_model_name="lance-test", model_path="/models/lance")
    return build_fastapi_app(LanceService(s), api_keys=keys)


@pytest.fixture
def client():
    return TestClient(make_app(), raise_server_exceptions=False)


def assert_401(r: httpx.Response):
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].lower().startswith("bearer")
    if r.request.method == "HEAD":
        return
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert KEYS[0] not in r.text and KEYS[1] not in r.text


def every_route(app):
    """(method, path) of every route in the app's own table, FastAPI's docs included."""
    out = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            out.append((method, route.path))
    return out


def test_every_route_but_health_and_the_playground_needs_a_key(client):
    routes = every_route(client.app)
    assert {p for _, p in routes} >= {"/v1/chat/completions", "/v1/images/generations",
                                      "/v1/images/edits", "/v1/models", "/health", "/openapi.json",
                                      "/docs", "/", "/playground", "/playground/{name}"}
    for method, path in routes:
        if path in PLAYGROUND_PATHS:
            continue   # public: test_the_playground_loads_without_a_key
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEYS[0]},
                        {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": "Bearer "}):
            r = client.request(method, path, headers=headers)
            if path == "/health":
                assert r.status_code != 401   # 503 here (no stages), never an auth failure
            else:
                assert_401(r)
        for variant in (path + "/", path.upper(), path + "?x=1"):
            if path != "/health":
                assert_401(client.request(method, variant))
        assert_401(client.options(path)) if path != "/health" else None


def test_the_playground_loads_without_a_key(client):
    """The page asks the user for the key, so the page and its files cannot need one."""
    for path in ("/", "/playground", "/playground/index.html", "/playground/app.js",
                 "/playground/style.css"):
        r = client.get(path)
        assert r.status_code == 200 and r.content, (path, r.status_code)
    assert client.get("/", headers={"Authorization": "Bearer wrong-key"}).status_code == 200
    # only the playground's own files: anything else under /playground still needs a key
    for path in ("/playground/nope.js", "/playground/index.html/x", "/PLAYGROUND", "/playground//app.js"):
        assert_401(client.get(path))


def test_unknown_paths_are_401_not_404(client):
    for path in ("/nope", "/v1/../v1/models", "/health/", "/health/x", "/v2/models"):
        assert_401(client.get(path))
    # (a bare "//health" would be read as a URL with host "health"; spell out the host)
    assert_401(client.get("http://testserver//health"))


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_right_key_any_scheme_case(client, scheme):
    for key in KEYS:
        r = client.get("/v1/models", headers={"Authorization": f"{scheme} {key}"})
        assert r.status_code == 200, r.text
        # a generation request passes auth and reaches the (unconnected) stage call
        r = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"{scheme} {key}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "stage_unavailable", r.text


def test_two_authorization_headers_are_refused(client):
    r = client.get("/v1/models", headers=[("Authorization", f"Bearer {KEYS[0]}"),
                                          ("Authorization", "Bearer wrong")])
    assert_401(r)


def test_a_route_added_later_is_protected():
    app = make_app()
    app.get("/v1/added-later")(lambda: {"ok": True})
    c = TestClient(app, raise_server_exceptions=False)
    assert_401(c.get("/v1/added-later"))
    assert c.get("/v1/added-later", headers={"Authorization": f"Bearer {KEYS[1]}"}).json() == {"ok": True}


def test_no_keys_means_no_auth():
    c = TestClient(make_app(keys=[]), raise_server_exceptions=False)
    assert c.get("/v1/models").status_code == 200


def test_openai_sdk_api_key(client):
    def sdk(key):
        return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client,
                             max_retries=0)
    assert [m.id for m in sdk(KEYS[1]).models.list()] == ["lance-test"]
    with pytest.raises(openai.AuthenticationError) as e:
        sdk("sk-wrong").models.list()
    assert e.value.code == "invalid_api_key"


def test_every_key_is_compared_whichever_matches(monkeypatch):
    keys = [f"key-{i}" for i in range(5)]
    checker = KeyChecker(keys)
    calls = []
    real = secrets.compare_digest
    monkeypatch.setattr(auth.secrets, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for token in [k.encode() for k in keys] + [b"nope", b""]:
        calls.clear()
        assert checker.matches(token) == (token.decode() in keys)
        assert len(calls) == len(keys)   # no early exit on a match


def test_bearer_parsing():
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer   abc  ") == b"abc"
    for bad in (None, b"", b"Bearer", b"Bearer ", b"abc", b"Basic abc", b"Bearer a b", b"Bearerabc"):
        assert bearer_token(bad) is None


def test_keys_from_env_and_args():
    env = {auth.API_KEY_ENV: " k1 , k2,,k1 "}
    assert resolve_api_keys(["k0", "k1"], env) == ["k0", "k1", "k2"]
    assert resolve_api_keys([], {}) == []
    with pytest.raises(APIKeyError):
        resolve_api_keys([], {auth.API_KEY_ENV: "has space"})
    with pytest.raises(ValueError, match="args.api_keys"):
        parse_app_args({"api_keys": ["bad\nkey"]})
    assert parse_app_args({"api_keys": ["k"]}).api_keys == ["k"]


def test_open_server_warning():
    assert auth.warn_if_open([], "0.0.0.0") is not None
    assert auth.warn_if_open([], "10.1.2.3") is not None
    assert auth.warn_if_open([], None) is not None
    assert auth.warn_if_open(["k"], "0.0.0.0") is None
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert auth.warn_if_open([], host) is None
