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
thinker before the server timeout. Fault recovery: a DiT replica and then the thinker replica are
killed under running requests, which all return what undisturbed runs return (`X-Lance-Retries`
says they were run again), and the killed thinker's engine processes and export directory go with
it; a dead vLLM engine fails the thinker's check_health, /health names it and Serve replaces the
replica. Before the kills, after the flood, the timeout, the disconnects and a mix of refused,
finished, streamed and cancelled requests, the stages, the object store and the running Serve calls
are back to their state before the flood.
"""
from __future__ import annotations

import base64
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
import psutil
import pytest
import yaml

from helpers import data_url, png_bytes
from serve_app.app_config import DEPLOYMENT_NAMES
from ray_driver import RayDriver, leak_census, leaks, running_requests
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

    def thinker_stats(self, variant: str = "") -> dict:
        return self.driver.call(DEPLOYMENT_NAMES["thinker"] + variant, "engine_stats")

    def dit_stats(self, variant: str = "") -> dict:
        return self.driver.call(DEPLOYMENT_NAMES["dit"] + variant, "stats")

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
    env = {"LANCE_SERVE_API_KEY": ",".join(KEYS),
           "RAY_SERVE_ENABLE_TASK_EVENTS": "1"}   # replicas' calls in Ray's task table (leak census)
    with serve_run(config_path, home, port, env) as running:
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
def leak_baseline(cluster, http):
    """The idle state of what a request may leak (`leak_state`), taken before the first test that
    times requests out or cancels them (the flood test) and compared at the end of the module."""
    cluster.wait_idle(120)
    return leak_state(cluster, http)


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

def test_flood_is_answered_with_503_and_retry_after_never_a_hang(base_url, cluster, leak_baseline):
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


# -- no leaks -------------------------------------------------------------------------------------------

def _tiny_mp4() -> bytes:
    import numpy as np

    from stages.dit.video import encode_mp4

    frames = np.random.default_rng(0).integers(0, 255, (9, 64, 96, 3), dtype=np.uint8)
    return encode_mp4(frames)


def _refresh_engine_stats(http) -> None:
    """vLLM reports its KV blocks with each engine step, and an abort is no step: one short request
    per thinker (chat: the image variant's, a video question: the video variant's)."""
    video = "data:video/mp4;base64," + base64.b64encode(_tiny_mp4()).decode()
    for content in ("hi", [{"type": "video_url", "video_url": {"url": video}},
                           {"type": "text", "text": "what moves?"}]):
        r = http.post("/v1/chat/completions", headers=auth(), json={
            "messages": [{"role": "user", "content": content}], "max_tokens": 1})
        assert r.status_code == 200, r.text[:300]


def leak_state(cluster: Cluster, http) -> dict:
    _refresh_engine_stats(http)
    return leak_census(cluster.driver)


def _disconnect_stream(base_url: str, path: str, body: dict) -> None:
    """Read a streamed answer's first event, then go away."""
    with httpx.Client(base_url=base_url, timeout=60) as c:
        with c.stream("POST", path, json=body, headers=auth()) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    return


def test_nothing_leaks_after_a_mixed_run(base_url, http, cluster, leak_baseline):
    """After this module's timed-out, overloaded, cancelled and finished requests, and a mix here of
    refused (4xx), finished (every route), streamed and cancelled ones, every stage is back where it
    started before the flood: no export, vLLM request or KV block, DiT job, object or request call
    is left over. (Before the replica kills below: a killed replica takes objects of its own.)"""
    image = data_url(png_bytes())
    refused = [("/v1/images/generations", b"{not json"),
               ("/v1/images/generations", {"prompt": "x", "num_inference_steps": 0}),
               ("/v1/images/generations", {"prompt": "x", "size": "100x100"}),
               ("/v1/images/generations", {"prompt": "x", "no_such_field": 1}),
               ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                         "max_tokens": 10**9})]
    for path, body in refused:
        r = (http.post(path, content=body, headers=auth() | {"Content-Type": "application/json"})
             if isinstance(body, bytes) else http.post(path, json=body, headers=auth()))
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text[:200])
    small = {"prompt": "a small cube", "size": "128x128", "num_inference_steps": 4}
    finished = [("/v1/images/generations", small),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": "what is it?"}]}], "max_tokens": 8}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}],
                                          "max_tokens": 8})]
    for r in _post_all(base_url, finished):
        assert r.status_code == 200, r.text[:300]
    r = http.post("/v1/images/edits", headers=auth(), data={"prompt": "make it blue", "num_inference_steps": "4",
                                                            "resolution": "image_256res"},
                  files={"image": ("in.png", png_bytes(), "image/png")})
    assert r.status_code == 200, r.text[:300]
    # cancelled: clients that go away mid-request, streamed and not
    _disconnect_stream(base_url, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "a red cube"}], "modalities": ["image"],
        "size": "512x512", "num_inference_steps": 40, "stream": True})
    _disconnect_stream(base_url, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "count forever"}], "max_tokens": 4000, "stream": True})
    seen_running = []
    with ThreadPoolExecutor(1) as pool:
        watch = pool.submit(lambda: [time.sleep(1.5), seen_running.append(running_requests(cluster.driver))])
        with httpx.Client(base_url=base_url) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/v1/images/generations", json=SLOW_T2I, headers=auth(), timeout=4)
        watch.result()
    assert seen_running and seen_running[0], "the running-request census saw nothing running"
    cluster.wait_idle(REQUEST_TIMEOUT_S)
    deadline = time.monotonic() + 60
    while True:
        state = leak_state(cluster, http)
        if not leaks(leak_baseline, state) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not leaks(leak_baseline, state), (leak_baseline, state)


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
    # the response says it was run again; the undisturbed one does not
    assert int(r.headers.get("x-lance-retries", 0)) >= 1 and "x-lance-retries" not in reference.headers
    cluster.wait_idle(60)


def _processes_of(pid: int) -> list[psutil.Process]:
    """The process and everything it started (a thinker replica: vLLM's engine core, its worker)."""
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """The processes still alive (zombies count as gone) after at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _seeded_requests() -> list[tuple[str, dict]]:
    """Small seeded image and understanding requests (a few seconds each on the tiny CPU model: the
    answers are long enough that the thinker is seen busy with them); their outputs are a pure
    function of the request."""
    image = data_url(png_bytes())
    t2i = [("/v1/images/generations", {"prompt": f"a {color} cube on a table", "size": "256x256",
                                       "num_inference_steps": 8, "seed": seed})
           for color, seed in (("red", 11), ("blue", 12), ("green", 13))]
    x2t = [("/v1/chat/completions", {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                  {"type": "text", "text": question}]}],
        "max_tokens": 256, "seed": 5, "return_token_ids": True})
        for question in ("What is in the picture?", "Which colours do you see?")]
    streamed = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "a blue cone"}],
                                          "modalities": ["image"], "size": "256x256",
                                          "num_inference_steps": 8, "seed": 14, "stream": True}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "tell a story"}],
                                          "max_tokens": 256, "seed": 6, "stream": True})]
    return t2i + x2t + streamed


def _output(path: str, r: httpx.Response):
    """What must not change when a request is retried: the image's bytes, or the token ids (a
    stream: its text and images, and no error event)."""
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    if hasattr(r, "events"):
        assert not [e for e in r.events if "error" in e], r.events[-3:]
        deltas = [c.get("delta", {}).get("content") for e in r.events for c in e.get("choices", [])]
        return ("".join(d for d in deltas if isinstance(d, str)),
                [part["image_url"]["url"] for d in deltas if isinstance(d, list) for part in d])
    body = r.json()
    if path == "/v1/images/generations":
        return body["data"][0]["b64_json"]
    return body["choices"][0]["token_ids"], body["choices"][0]["message"]["content"]


def _post_all(base_url: str, requests: list[tuple[str, dict]],
              first_token: threading.Event | None = None) -> list[httpx.Response]:
    """All at once; a streamed answer's events are read into `response.events` (`first_token` is
    set once a stream has sent a token of text: the thinker is then generating)."""
    def one(item):
        path, body = item
        with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S + 30) as c:
            if not body.get("stream"):
                return c.post(path, json=body, headers=auth())
            with c.stream("POST", path, json=body, headers=auth()) as r:
                r.events = []
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        r.events.append(json.loads(line[6:]))
                        if first_token is not None and any(
                                isinstance(c.get("delta", {}).get("content"), str) and c["delta"]["content"]
                                for c in r.events[-1].get("choices", [])):
                            first_token.set()
                r.finished_at = time.monotonic()
            return r

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def test_thinker_replica_killed_mid_requests_loses_nothing(base_url, cluster):
    """The thinker replica dies with prefills running and contexts parked for the DiT: every
    request is run again from the prefill on the restarted replica and returns exactly what an
    undisturbed run returns; the dead replica's engine processes and export directory go too."""
    cluster.wait_idle(120)
    requests = _seeded_requests()
    undisturbed = _post_all(base_url, requests)
    reference = [_output(path, r) for (path, _), r in zip(requests, undisturbed)]
    assert not any("x-lance-retries" in r.headers for r in undisturbed)

    def kill_when_generating(first_token: threading.Event):
        """Kill once the text stream has sent its first token: the thinker is then generating its
        256-token answer, with the two 256-token understanding answers beside it. Not on any first
        event: the image stream's first chunk can come before the other requests reach the thinker,
        and a request Serve had not yet sent is routed to the new replica without a retry. The trigger
        is seen at the client, not asked of the thinker: a stats call to the thinker replica can queue
        behind the requests (its max_ongoing_requests) and come back only once they are done."""
        assert first_token.wait(60), "no streamed token within 60 s"
        cluster.kill_replica(DEPLOYMENT_NAMES["thinker"])
        return time.monotonic()

    # The kill is a race with the answers (on 2 loaded cores they can all be done before the kill,
    # sent through the driver process, lands): each round must lose nothing; a round in which no
    # request was in flight on the killed thinker proves nothing, so it is run again (3 rounds at most)
    for _ in range(3):
        cluster.wait_idle(120)
        old_pid = cluster.thinker_stats()["pid"]
        old_processes = _processes_of(old_pid)
        assert len(old_processes) >= 2, "the thinker runs vLLM's engine core in a process of its own"
        first_token = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            killed = pool.submit(kill_when_generating, first_token)
            responses = _post_all(base_url, requests, first_token)
            killed_at = killed.result()
        outputs = [_output(path, r) for (path, _), r in zip(requests, responses)]
        assert outputs == reference
        # the killed replica could not shut its engine down: its processes exit by themselves
        assert not _wait_gone(old_processes, 30), "orphaned vLLM processes of the killed thinker"
        t, _ = cluster.wait_idle(120)
        assert t["pid"] != old_pid
        # and its successor removed the killed replica's export directory (unclaimed KV in tmpfs)
        assert not list(Path("/dev/shm").glob(f"lance-kv-*-{old_pid}-*"))
        # in flight on the killed thinker: a request retried whole (its header says so), or the text
        # stream, which had sent a token before the kill and ended after it (a stream's retry resumes
        # behind headers already sent: it has no header to show)
        retried = [int(r.headers.get("x-lance-retries", 0)) for r in responses]
        stream_spanned_kill = any(body.get("stream") and "modalities" not in body and r.finished_at > killed_at
                                  for (_, body), r in zip(requests, responses))
        if any(retried) or stream_spanned_kill:
            break
    else:
        raise AssertionError("no request was in flight on the killed thinker in 3 rounds")


def _engine_core_of(pid: int, timeout: float) -> list:
    """The vLLM engine-core process under a thinker replica. A replica that has just replaced a
    killed one answers before its engine core has renamed itself (setproctitle), so look again
    until it has; the kernel's comm name is cut to 15 characters ("VLLM::EngineCor")."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if "EngineCor" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_a_dead_vllm_engine_fails_health_and_its_replica_is_replaced(http, cluster):
    """vLLM's engine core dies under a live thinker replica: check_health raises, /health names the
    thinker (503) while the DiT is fine, Serve replaces the replica, and a request works again."""
    cluster.wait_idle(120)
    old_pid = cluster.thinker_stats()["pid"]
    engine = _engine_core_of(old_pid, 120)
    assert engine, [p.name() for p in psutil.Process(old_pid).children(recursive=True)]
    engine[0].kill()
    down = None
    deadline = time.monotonic() + 60
    while down is None and time.monotonic() < deadline:
        r = http.get("/health")
        if r.status_code == 503:
            down = r.json()
        time.sleep(0.5)
    assert down is not None, "/health never reported the dead engine"
    assert down["stages"]["dit"] == "ok" and down["stages"]["thinker"] != "ok", down
    assert "thinker" in down["error"]["message"], down
    # Serve replaces the replica (check_health fails 3 times): healthy again, a new process
    deadline = time.monotonic() + 240
    while http.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the thinker was not replaced"
        time.sleep(1)
    assert cluster.thinker_stats()["pid"] != old_pid
    r = http.post("/v1/chat/completions", headers=auth(), json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text[:300]
