"""End to end: API keys, request limits, overload, timeout and disconnect on the real `serve run` app.

One deployment for the module: `serve run` of configs/lance_2stage.yaml with two API keys in the env
`LANCE_SERVE_API_KEY` (as the k8s manifests pass them) and `request_timeout_s` lowered to 60 s (the
only change to the shipped config, written to a temp file), on a fresh local Ray cluster whose temp
dir is private to the module, so that the test can join that cluster as a driver and ask the stages
themselves (`ThinkerStage.engine_stats`, `DiTStage.stats`) whether cancelled work was freed.

Every route of the app's own table (its /openapi.json, plus /docs and /redoc) is tried without a
key, with a wrong key and with a right one, with a trailing slash and as OPTIONS; the OpenAI SDK's
`api_key=` must work. Then: a body over the cap is 413; a full /v1/videos store is a 429; a flood
of slow image requests gets 503s with Retry-After and an OpenAI error body (never a hang); a request
past the timeout is a 504, and a client that disconnects (non-streaming) frees the DiT and the
thinker before the server timeout.
"""
from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from serve_app.app_config import DEPLOYMENT_NAMES
from ray_driver import RayDriver
from serve_server import REPO_ROOT, SERVE_CONFIG, Server, serve_run

# `serve run` of its own app (own cluster, own port): never while the session's shared server
# (tests/serve_server.py) runs; its tests are grouped and it is stopped after the last of them, and
# the fixture here is not named `server`, so these tests are not counted among its users
pytestmark = pytest.mark.heavy

KEYS = ("sk-lance-hardening-first", "sk-lance-hardening-second")
REQUEST_TIMEOUT_S = 60
VIDEO_STORE_MAX_JOBS = 2
STARTUP_TIMEOUT_S = 600
# a t2i request the tiny CPU model needs far longer than REQUEST_TIMEOUT_S for (about 1.2 s per
# 1024x1024 step on one core)
SLOW_T2I = {"prompt": "a slow red cube", "size": "1024x1024", "num_inference_steps": 200}
# one that takes some seconds, long enough to kill a replica under it
MEDIUM_T2I = {"prompt": "a green sphere", "size": "512x512", "num_inference_steps": 30, "seed": 7}


def auth(key=KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


class Cluster:
    """The server's Ray cluster through a driver process (tests/ray_driver.py): the stages' own
    counters, and replica kills."""

    def __init__(self, address: str, home: Path):
        self.driver = RayDriver(address, home)

    def thinker_stats(self) -> dict:
        return self.driver.call(DEPLOYMENT_NAMES["thinker"], "engine_stats")

    def dit_stats(self) -> dict:
        return self.driver.call(DEPLOYMENT_NAMES["dit"], "stats")

    def wait_idle(self, timeout_s: float) -> tuple[dict, dict]:
        """Both stages with nothing running, waiting or parked; fails with their counters if not."""
        deadline = time.monotonic() + timeout_s
        while True:
            t, d = self.thinker_stats(), self.dit_stats()
            if (t["num_running"] == t["num_waiting"] == len(t["pending_exports"]) == 0
                    and d["active"] == d["waiting"] == 0):
                return t, d
            if time.monotonic() > deadline:
                pytest.fail(f"stages not idle after {timeout_s}s: thinker {t}, dit {d}")
            time.sleep(0.5)

    def kill_replica(self, deployment: str) -> str:
        return self.driver.kill_replica(deployment)

    def close(self):
        self.driver.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hardened_server(tmp_path_factory) -> Server:
    port = _free_port()   # not the shipped config's 8000 (the shared server's)
    home = tmp_path_factory.mktemp("home")
    config = yaml.safe_load((REPO_ROOT / SERVE_CONFIG).read_text())
    config["applications"][0]["args"].update(
        request_timeout_s=REQUEST_TIMEOUT_S,
        max_video_bytes=16 * 2**20,   # the body cap follows the largest media cap: keep it < 64 MiB
        video_store_max_jobs=VIDEO_STORE_MAX_JOBS)
    config["http_options"]["port"] = port
    config_path = home / "lance_hardening.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with serve_run(config_path, home, port, {"LANCE_SERVE_API_KEY": ",".join(KEYS)}) as running:
        yield running


@pytest.fixture(scope="module")
def base_url(hardened_server):
    return hardened_server.base_url


@pytest.fixture(scope="module")
def cluster(hardened_server):
    """A driver joined to the server's cluster (only the tests that ask for it)."""
    c = Cluster(hardened_server.ray_address(), hardened_server.home)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def assert_401(r: httpx.Response):
    assert r.status_code == 401, (r.request.method, r.request.url, r.status_code, r.text[:300])
    assert r.headers["www-authenticate"].lower().startswith("bearer")
    if r.request.method != "HEAD":
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key", err


# -- API keys ----------------------------------------------------------------------------------------

def test_every_route_needs_a_key_but_health_and_the_playground(http, hardened_server):
    spec = http.get("/openapi.json", headers=auth()).json()
    routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
    routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]
    paths = {p for _, p in routes}
    assert {"/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/models",
            "/health"} <= paths
    for method, path in routes:
        if path == "/health":
            assert http.get(path).status_code == 200
            continue
        for variant in (path, path + "/"):
            for headers in ({}, auth("sk-wrong"), {"Authorization": KEYS[0]},
                            {"Authorization": f"Basic {KEYS[0]}"}):
                assert_401(http.request(method, variant, headers=headers))
            assert_401(http.options(variant))
            assert_401(http.options(variant, headers={"Origin": "https://x.example",
                                                      "Access-Control-Request-Method": method}))
            # a right key (either one, any scheme case) gets past authentication
            for headers in (auth(KEYS[0]), {"Authorization": f"bearer {KEYS[1]}"}):
                r = http.request(method, variant, headers=headers)
                assert r.status_code != 401, (method, variant, r.text[:300])
    for path in ("/v2/models", "/v1/models/../models", "/nothing-here", "/playground/nope.js"):
        assert_401(http.get(path))
    # the playground asks for the key itself: its page and files load without one
    for path in ("/", "/playground", "/playground/app.js"):
        assert http.get(path).status_code == 200, path
    log = hardened_server.log()
    assert not any(k in log for k in KEYS)          # keys are never logged
    assert "!! NO API KEY" not in log


def test_openai_sdk_api_key(base_url):
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEYS[1], max_retries=0, timeout=120)
    assert len(sdk.models.list().data) == 1
    out = sdk.chat.completions.create(model=sdk.models.list().data[0].id, max_tokens=2,
                                      messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.role == "assistant"
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])


# -- request limits ----------------------------------------------------------------------------------

def _raw_post(base_url: str, path: str, headers: dict, chunks=()) -> tuple[int, dict, bytes]:
    """POST over a plain socket, so that the server may answer before the body is sent (httpx
    would insist on writing the whole body first)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        try:
            for chunk in chunks:
                if select.select([sock], [], [], 0)[0]:
                    break   # the server has answered
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        want = int(hdrs.get("content-length", "0"))
        while len(body) < want:
            more = sock.recv(65536)
            if not more:
                break
            body += more
        return status, hdrs, body


def test_body_over_the_cap_is_413_before_it_is_read(base_url):
    # declared: answered from the headers alone, no body sent at all
    status, _, body = _raw_post(base_url, "/v1/chat/completions",
                                auth() | {"Content-Type": "application/json",
                                          "Content-Length": str(64 * 2**20)})
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large", body[:300]

    def chunked(total=64 * 2**20, size=2**20):   # no Content-Length: cut off as it arrives
        for _ in range(total // size):
            yield b"%x\r\n" % size + b"x" * size + b"\r\n"
        yield b"0\r\n\r\n"

    status, _, body = _raw_post(base_url, "/v1/images/generations",
                                auth() | {"Content-Type": "application/json",
                                          "Transfer-Encoding": "chunked"}, chunked())
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large", body[:300]
    # without a key nothing is read either: 401
    status, hdrs, _ = _raw_post(base_url, "/v1/chat/completions",
                                {"Content-Type": "application/json", "Content-Length": str(64 * 2**20)})
    assert status == 401 and hdrs["www-authenticate"].lower().startswith("bearer")


def test_a_full_video_store_is_429_with_retry_after(http):
    small = {"prompt": "a dot", "num_frames": 1, "size": "64x64", "num_inference_steps": 1}
    ids = []
    for _ in range(VIDEO_STORE_MAX_JOBS):
        r = http.post("/v1/videos", json=small, headers=auth())
        assert r.status_code == 200, r.text[:300]
        ids.append(r.json()["id"])
    r = http.post("/v1/videos", json=small, headers=auth())
    assert r.status_code == 429, r.text[:300]
    assert int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "too_many_videos"
    # a deleted job (running or not) frees its place at once
    assert http.delete(f"/v1/videos/{ids.pop(0)}", headers=auth()).json()["deleted"] is True
    r = http.post("/v1/videos", json=small, headers=auth())
    assert r.status_code == 200, r.text[:300]
    ids.append(r.json()["id"])
    for video_id in ids:
        assert http.delete(f"/v1/videos/{video_id}", headers=auth()).json()["deleted"] is True


def test_headers_over_the_limit_are_431(http):
    r = http.get("/v1/models", headers=auth() | {f"x-h{i}": "1" for i in range(120)})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large", r.text[:300]


# -- overload, timeout, disconnect ---------------------------------------------------------------------

def test_flood_is_answered_with_503_and_retry_after_never_a_hang(base_url, cluster):
    cluster.wait_idle(120)
    n = 40

    def one(_):
        start = time.monotonic()
        with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S + 60) as c:
            r = c.post("/v1/images/generations", json=SLOW_T2I, headers=auth())
        return r, time.monotonic() - start

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    statuses = sorted(r.status_code for r, _ in results)
    overloaded = [r for r, _ in results if r.status_code == 503]
    assert len(overloaded) >= n - 12, statuses   # the cpu graph's DiT holds 4 + 8
    for r in overloaded:
        assert r.headers.get("retry-after", "").isdigit(), dict(r.headers)
        err = r.json()["error"]
        assert err["code"] == "overloaded" and "overloaded" in err["message"], err
    # the requests that were held all ran into the deadline, none hung past it
    assert set(statuses) <= {503, 504}, statuses
    for r, took in results:
        if r.status_code == 504:
            assert r.json()["error"]["code"] == "timeout"
            assert took < REQUEST_TIMEOUT_S + 30, took
    # the timed-out requests' DiT jobs are dropped and nothing is left in either stage
    cluster.wait_idle(60)


@contextlib.contextmanager
def dit_jobs_seen(cluster):
    """The DiT's job counts (active + waiting), sampled in a thread while the block runs."""
    stop, seen = threading.Event(), []

    def watch():
        while not stop.is_set():
            stats = cluster.dit_stats()
            seen.append(stats["active"] + stats["waiting"])
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join()


def test_timeout_is_504_and_frees_both_stages(http, cluster):
    cluster.wait_idle(120)
    start = time.monotonic()
    with dit_jobs_seen(cluster) as seen:
        r = http.post("/v1/images/generations", json=SLOW_T2I, headers=auth(),
                      timeout=REQUEST_TIMEOUT_S + 60)
    took = time.monotonic() - start
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text[:300]
    assert REQUEST_TIMEOUT_S - 1 < took < REQUEST_TIMEOUT_S + 30
    assert max(seen) >= 1   # the DiT really had the job
    cluster.wait_idle(30)


def test_client_disconnect_frees_the_dit_non_streaming(base_url, cluster):
    cluster.wait_idle(120)
    start = time.monotonic()
    with dit_jobs_seen(cluster) as seen, httpx.Client(base_url=base_url) as c:
        with pytest.raises(httpx.ReadTimeout):   # the client gives up and closes the connection
            c.post("/v1/images/generations", json=SLOW_T2I, headers=auth(), timeout=6)
    assert max(seen) >= 1
    # freed long before the server's own timeout would have done it
    cluster.wait_idle(REQUEST_TIMEOUT_S - (time.monotonic() - start) - 2)


def test_client_disconnect_aborts_the_thinker(base_url, cluster):
    """A long text generation (non-streaming) whose client leaves is aborted in vLLM."""
    cluster.wait_idle(120)
    before = cluster.thinker_stats()["aborted_requests"]
    body = {"messages": [{"role": "user", "content": "count forever"}], "max_tokens": 4000,
            "temperature": 0}
    running = []

    def watch():
        for _ in range(20):
            running.append(cluster.thinker_stats()["num_running"])
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    with httpx.Client(base_url=base_url) as c:
        try:
            c.post("/v1/chat/completions", json=body, headers=auth(), timeout=3)
            finished_in_time = True
        except httpx.ReadTimeout:
            finished_in_time = False
    watcher.join()
    if finished_in_time:
        pytest.fail("the generation finished within 3 s; make it longer so a disconnect can be seen")
    assert max(running) >= 1
    t, _ = cluster.wait_idle(REQUEST_TIMEOUT_S - (time.monotonic() - start) - 2)
    assert t["aborted_requests"] > before


# -- fault recovery -----------------------------------------------------------------------------------

def test_dit_replica_killed_mid_request_loses_nothing(http, cluster):
    """The ingress hands the same context to the restarted DiT: same image as an undisturbed run."""
    cluster.wait_idle(120)
    reference = http.post("/v1/images/generations", json=MEDIUM_T2I, headers=auth(),
                          timeout=REQUEST_TIMEOUT_S + 30)
    assert reference.status_code == 200, reference.text[:300]

    def kill_when_busy():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = cluster.dit_stats()
            if stats["active"] >= 1:
                time.sleep(0.5)
                return cluster.kill_replica(DEPLOYMENT_NAMES["dit"])
            time.sleep(0.2)
        return None

    with ThreadPoolExecutor(1) as pool:
        killed = pool.submit(kill_when_busy)
        r = http.post("/v1/images/generations", json=MEDIUM_T2I, headers=auth(),
                      timeout=REQUEST_TIMEOUT_S + 30)
        assert killed.result() is not None, "the DiT never picked the request up"
    assert r.status_code == 200, r.text[:300]
    assert r.json()["data"][0]["b64_json"] == reference.json()["data"][0]["b64_json"]
    cluster.wait_idle(60)
