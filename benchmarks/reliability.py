"""Reliability of a lance-serve server: bad inputs, a mixed load with replica kills, leaks, recovery.

    .venv/bin/python benchmarks/reliability.py [--requests 500] [--concurrency 6] [--json OUT.json]
    .venv/bin/python benchmarks/reliability.py --url http://HOST:8000 [--api-key KEY]
                     [--ray-address HOST:GCS_PORT --ray-home DIR]   (kills and leak census need these;
                     the census counts running Serve calls only with RAY_SERVE_ENABLE_TASK_EVENTS=1)

Without --url it starts its own `serve run` of configs/lance_2stage.yaml (the `cpu` graph on a CPU
machine) on a free port and a private local Ray cluster, with `request_timeout_s` = --request-timeout
and the model --model (default: the golden tiny checkpoint, both variants), and stops it at the end.
It joins that cluster from a driver process (tests/ray_driver.py) to kill replicas and read the
stages' own counters.

1. Bad inputs: a list of malformed requests (bad JSON, wrong types, values out of range, unknown
   fields, huge values, bad base64 images and videos, wrong routes, methods, headers and bodies);
   each must be answered with a 4xx within 30 s. `--bad-inputs-only` stops after this.
2. Mixed load: --requests requests at --concurrency: t2i (images API and chat, some streamed),
   edits, image understanding, chat (some streamed), some cancelled by their client (a client read
   timeout, a stream closed after its first event), and --timeouts requests that run into the
   server's deadline (sent after the others: each holds the DiT until its 504). After a third of
   the requests the DiT replica is killed, after two thirds the thinker replica (the image
   variant's; each when it has work in flight). lost = a request meant to finish without a 200;
   hung = a request without an answer within the deadline + 60 s.
3. Recovery: per kill, seconds until the restarted stage answers through a Serve handle, and until
   /health is 200 again; the killed thinker's engine processes must be gone.
4. Leaks: the idle state (`tests/ray_driver.py: leak_census`: exports, vLLM requests and KV blocks,
   DiT jobs, object store, running Serve request calls) after the load equals the one before.
5. Retried requests (`X-Lance-Retries` in the response) are sent again on the healthy server and
   must return the same bytes / token ids; latency p50/p95 of retried vs not retried requests.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from ray_driver import RayDriver, leak_census, leaks  # noqa: E402  (tests/ray_driver.py)

from bench_common import cpu_model, free_port   # benchmarks/ is the script's folder

GOLDEN_TINY = Path(os.environ.get("LANCE_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden")) / "tiny_ckpt"
SERVE_CONFIG = REPO_ROOT / "configs" / "lance_2stage.yaml"
PROMPTS = ["a red cube on a blue table", "a green sphere in the grass", "a yellow house by a lake",
           "two cats on a sofa", "a white boat at sea"]
SLOW_T2I = {"prompt": "a slow red cube", "size": "1024x1024", "num_inference_steps": 200}


# -- inputs ----------------------------------------------------------------------------------------------

def png(width: int = 120, height: int = 90, mode: str = "RGB") -> bytes:
    if mode == "RGB":
        y, x = np.mgrid[0:height, 0:width]
        img = Image.fromarray(np.stack([x * 2, y * 2, (x + y) % 256], -1).astype(np.uint8), "RGB")
    else:
        img = Image.new(mode, (width, height))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def mp4() -> bytes:
    from stages.dit.video import encode_mp4

    return encode_mp4(np.random.default_rng(0).integers(0, 255, (9, 64, 96, 3), dtype=np.uint8))


@dataclass
class BadInput:
    name: str
    method: str
    path: str
    json: object = None              # a JSON body
    content: bytes | None = None     # a raw body (Content-Type: application/json unless headers say)
    files: dict | None = None        # multipart
    data: dict | None = None
    headers: dict = field(default_factory=dict)
    raw_head: str | None = None      # sent over a plain socket: the head only (huge Content-Length)


def bad_inputs() -> list[BadInput]:
    """Requests every one of which is wrong; each must be a 4xx."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    gen = {"prompt": "a cube", "size": "64x64", "num_inference_steps": 2}
    video = {"prompt": "a dot", "size": "64x64", "num_frames": 1, "num_inference_steps": 1}
    image = data_url(png())
    cases: list[BadInput] = []

    def chat_with(name, **fields):
        cases.append(BadInput(f"chat {name}", "POST", "/v1/chat/completions", json={**chat, **fields}))

    def gen_with(name, **fields):
        cases.append(BadInput(f"images {name}", "POST", "/v1/images/generations", json={**gen, **fields}))

    def user_parts(*parts, **fields):
        return {**chat, "messages": [{"role": "user", "content": list(parts)}], **fields}

    # bodies that are not JSON, or not an object
    for name, raw in [("empty body", b""), ("truncated", b'{"messages": ['), ("array", b"[]"),
                      ("string", b'"hi"'), ("null", b"null"), ("NaN", b'{"messages": NaN}'),
                      ("Infinity", b'{"max_tokens": Infinity}'), ("huge number", b'{"seed": 1e400}'),
                      ("invalid UTF-8", b'{"messages": "\xff\xfe"}'), ("trailing garbage", b"{}}"),
                      ("deep nesting", b'{"a": ' + b"[" * 400 + b"]" * 400 + b"}"),
                      ("single quotes", b"{'messages': []}")]:
        for path in ("/v1/chat/completions", "/v1/images/generations", "/v1/videos"):
            cases.append(BadInput(f"{path} {name}", "POST", path, content=raw))
    # wrong types
    for key, value in [("max_tokens", "8"), ("max_tokens", 8.5), ("temperature", "hot"),
                       ("temperature", [1]), ("top_p", {}), ("stream", "yes"), ("n", "2"),
                       ("seed", "abc"), ("seed", 1.5), ("size", 512), ("num_inference_steps", "ten"),
                       ("modalities", "image"), ("stop", 5), ("messages", "hi"), ("messages", [1]),
                       ("messages", {"role": "user"}), ("cfg_interval", "0.4,1.0"),
                       ("extra_body", "x"), ("return_token_ids", "please")]:
        chat_with(f"{key}={value!r}", **{key: value})
    for key, value in [("prompt", 123), ("prompt", ["a"]), ("n", "one"), ("size", ["64", "64"]),
                       ("seed", [1]), ("response_format", 3), ("num_inference_steps", {"n": 2})]:
        gen_with(f"{key}={value!r}", **{key: value})
    # values out of range
    for key, value in [("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 10**9),
                       ("temperature", -0.1), ("temperature", 2.5), ("top_p", 0), ("top_p", 1.5),
                       ("seed", -1), ("seed", 2**64), ("n", 2), ("stop", ["a", "b", "c", "d", "e"]),
                       ("modalities", ["audio"]), ("modalities", ["image", "text"])]:
        chat_with(f"{key}={value!r}", **{key: value})
    for key, value in [("num_inference_steps", 0), ("num_inference_steps", 201), ("size", "100x100"),
                       ("size", "2048x2048"), ("size", "64x"), ("size", "axb"), ("size", "0x0"),
                       ("height", 63), ("width", 4096), ("n", 0), ("n", 5), ("cfg_text_scale", -1),
                       ("cfg_text_scale", 101), ("timestep_shift", 0), ("timestep_shift", 1000),
                       ("cfg_interval", [0.9, 0.1]), ("cfg_interval", [0, 2]), ("cfg_interval", [0.5]),
                       ("cfg_renorm_type", "weird"), ("cfg_renorm_min", 2), ("cfg_img_scale", 2.0),
                       ("resolution", "image_9000res"), ("response_format", "url"),
                       ("output_format", "bmp")]:
        gen_with(f"{key}={value!r}", **{key: value})
    gen_with("two names for one knob, two values", cfg_text_scale=4.0, guidance_scale=3.0)
    # unknown fields, wrong model
    chat_with("unknown field", no_such_field=1)
    chat_with("unknown field in extra_body", extra_body={"no_such_knob": 1})
    gen_with("unknown field", no_such_field=1)
    chat_with("unknown model", model="gpt-4")
    gen_with("unknown model", model="dall-e-3")
    # messages that cannot be routed
    for name, messages in [("no messages", []), ("no content", [{"role": "user"}]),
                           ("unknown role", [{"role": "wizard", "content": "x"}]),
                           ("numeric content", [{"role": "user", "content": 123}]),
                           ("unknown part", [{"role": "user", "content": [{"type": "audio_url",
                                                                           "audio_url": {"url": "x"}}]}]),
                           ("text part without text", [{"role": "user", "content": [{"type": "text"}]}]),
                           ("last message not the user's", [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}])]:
        chat_with(name, messages=messages)
    # huge values
    chat_with("prompt longer than the context", messages=[{"role": "user", "content": "word " * 40000}])
    gen_with("prompt longer than the context", prompt="word " * 40000)
    # bad images
    for name, url in [("base64 too short", "data:image/png;base64,AAAA"),
                      ("not base64", "data:image/png;base64,!!!!"),
                      ("not an image", data_url(b"hello world", "image/png")),
                      ("text media type", data_url(b"hello", "text/plain")),
                      ("truncated PNG", data_url(png()[:100])),
                      ("decompression bomb (9000x9000)", data_url(png(9000, 9000, "1"))),
                      ("file URL", "file:///etc/passwd"),
                      ("cloud metadata URL", "http://169.254.169.254/latest/meta-data/"),
                      ("ftp URL", "ftp://example.com/a.png"), ("empty URL", "")]:
        cases.append(BadInput(f"chat image {name}", "POST", "/v1/chat/completions",
                              json=user_parts({"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": "what is it?"})))
    cases.append(BadInput("chat two images", "POST", "/v1/chat/completions",
                          json=user_parts({"type": "image_url", "image_url": {"url": image}},
                                          {"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": "compare"})))
    cases.append(BadInput("chat image with a video resolution", "POST", "/v1/chat/completions",
                          json=user_parts({"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": "x"}, resolution="video_480p")))
    # bad videos
    for name, url in [("base64 too short", "data:video/mp4;base64,AAAA"),
                      ("random bytes", data_url(os.urandom(4096), "video/mp4"))]:
        cases.append(BadInput(f"chat video {name}", "POST", "/v1/chat/completions",
                              json=user_parts({"type": "video_url", "video_url": {"url": url}},
                                              {"type": "text", "text": "what moves?"})))
    cases.append(BadInput("chat video with an image modality", "POST", "/v1/chat/completions",
                          json=user_parts({"type": "video_url", "video_url": {"url": data_url(mp4(), "video/mp4")}},
                                          {"type": "text", "text": "x"}, modalities=["image"])))
    # edits (multipart)
    cases.append(BadInput("edit as JSON", "POST", "/v1/images/edits", json={"prompt": "x", "image": image}))
    cases.append(BadInput("edit without image", "POST", "/v1/images/edits", data={"prompt": "x"},
                          files={"other": ("a.txt", b"x", "text/plain")}))
    cases.append(BadInput("edit with a mask", "POST", "/v1/images/edits", data={"prompt": "x"},
                          files={"image": ("a.png", png(), "image/png"), "mask": ("m.png", png(), "image/png")}))
    cases.append(BadInput("edit with a text file", "POST", "/v1/images/edits", data={"prompt": "x"},
                          files={"image": ("a.png", b"not an image", "image/png")}))
    cases.append(BadInput("edit without prompt", "POST", "/v1/images/edits",
                          files={"image": ("a.png", png(), "image/png")}))
    cases.append(BadInput("edit steps=0", "POST", "/v1/images/edits",
                          data={"prompt": "x", "num_inference_steps": "0"},
                          files={"image": ("a.png", png(), "image/png")}))
    # videos API
    for key, value in [("num_frames", 2), ("num_frames", 500), ("size", "1x1"), ("fps", 0),
                       ("seconds", "forever"), ("no_such_field", 1), ("prompt", "")]:
        cases.append(BadInput(f"videos {key}={value!r}", "POST", "/v1/videos", json={**video, key: value}))
    for method, path in [("GET", "/v1/videos/video_nope"), ("DELETE", "/v1/videos/video_nope"),
                         ("GET", "/v1/videos/video_nope/content"), ("GET", "/v1/videos?limit=0"),
                         ("GET", "/v1/videos?limit=1000"), ("GET", "/v1/videos?order=sideways"),
                         ("POST", "/v1/videos/video_nope/remix")]:
        cases.append(BadInput(f"{method} {path}", method, path,
                              json={"prompt": "x"} if method == "POST" else None))
    # routes, methods, headers, bodies
    for method, path in [("GET", "/v1/chat/completions"), ("PUT", "/v1/images/generations"),
                         ("POST", "/v1/models"), ("GET", "/v2/nothing"), ("DELETE", "/health")]:
        cases.append(BadInput(f"{method} {path}", method, path))
    cases.append(BadInput("too many headers", "GET", "/v1/models", headers={f"x-h{i}": "1" for i in range(120)}))
    cases.append(BadInput("chat as form data", "POST", "/v1/chat/completions", content=b"messages=hi",
                          headers={"Content-Type": "application/x-www-form-urlencoded"}))
    cases.append(BadInput("declared 1 GB body", "POST", "/v1/chat/completions",
                          raw_head="Content-Type: application/json\r\nContent-Length: 1000000000\r\n"))
    cases.append(BadInput("non-numeric Content-Length", "POST", "/v1/chat/completions",
                          raw_head="Content-Type: application/json\r\nContent-Length: lots\r\n"))
    return cases


def _raw_status(base_url: str, head: str, method: str, path: str, extra: dict) -> int:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    lines = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{lines}{head}\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    return int(data.split(b" ", 2)[1]) if data else 0


def run_bad_inputs(client, base_url: str | None, auth: dict) -> dict:
    """Send every bad input; {"tried", "all_4xx", "by_status", "not_4xx": [...], "cases": [...]}."""
    results = []
    for case in bad_inputs():
        start = time.monotonic()
        try:
            if case.raw_head is not None:
                if base_url is None:
                    continue   # needs a real socket
                status, code = _raw_status(base_url, case.raw_head, case.method, case.path, auth), None
            else:
                headers = {**auth, **case.headers}
                kwargs = {}
                if case.content is not None:
                    headers.setdefault("Content-Type", "application/json")
                    kwargs["content"] = case.content
                elif case.files is not None or case.data is not None:
                    kwargs.update(files=case.files, data=case.data)
                elif case.json is not None:
                    kwargs["json"] = case.json
                r = client.request(case.method, case.path, headers=headers, timeout=30, **kwargs)
                status = r.status_code
                try:
                    code = r.json().get("error", {}).get("code")
                except (ValueError, AttributeError):
                    code = None
        except Exception as e:   # noqa: BLE001 - a hang or a dropped connection is a finding
            status, code = 0, f"{type(e).__name__}: {e}"
        results.append({"name": case.name, "status": status, "code": code,
                        "seconds": round(time.monotonic() - start, 3)})
    by_status: dict[str, int] = {}
    for r in results:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    not_4xx = [r for r in results if not 400 <= r["status"] < 500]
    return {"tried": len(results), "all_4xx": not not_4xx, "by_status": by_status,
            "not_4xx": not_4xx, "cases": results}


# -- the load --------------------------------------------------------------------------------------------

@dataclass
class Job:
    index: int
    kind: str
    intent: str               # finish | cancel | timeout
    method: str
    path: str
    json: dict | None = None
    data: dict | None = None
    files: dict | None = None
    stream: bool = False
    client_timeout_s: float | None = None   # cancel: the client gives up after this
    # filled in by run_job
    start: float = 0.0
    end: float = 0.0
    status: int | None = None
    retries: int = 0
    outcome: str = ""          # ok | cancelled | timed_out | lost | hung
    error: str | None = None
    output: str | None = None  # sha256 of the image bytes / token ids


def make_jobs(n: int, n_timeouts: int, seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    image = png()
    image_url = data_url(image)
    kinds = (["t2i"] * 20 + ["t2i_chat"] * 8 + ["t2i_stream"] * 5 + ["edit"] * 10 + ["x2t"] * 20
             + ["chat"] * 17 + ["chat_stream"] * 8 + ["cancel_wait"] * 4 + ["cancel_image_stream"] * 4
             + ["cancel_text_stream"] * 4)
    jobs = []
    for i in range(n - n_timeouts):
        kind = rng.choice(kinds)
        prompt = PROMPTS[i % len(PROMPTS)]
        size = rng.choice(["64x64", "128x128"])
        steps = rng.choice([2, 3, 4])
        if kind == "t2i":
            job = Job(i, kind, "finish", "POST", "/v1/images/generations",
                      json={"prompt": prompt, "size": size, "num_inference_steps": steps, "seed": i})
        elif kind in ("t2i_chat", "t2i_stream"):
            job = Job(i, kind, "finish", "POST", "/v1/chat/completions", stream=kind == "t2i_stream",
                      json={"messages": [{"role": "user", "content": prompt}], "modalities": ["image"],
                            "size": size, "num_inference_steps": steps, "seed": i,
                            "stream": kind == "t2i_stream"})
        elif kind == "edit":
            job = Job(i, kind, "finish", "POST", "/v1/images/edits",
                      data={"prompt": "make it " + rng.choice(["blue", "green", "brighter"]),
                            "resolution": "image_256res", "num_inference_steps": "2", "seed": str(i)},
                      files={"image": ("in.png", image, "image/png")})
        elif kind == "x2t":
            job = Job(i, kind, "finish", "POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": rng.choice(["What is it?", "Which colours?", "Describe it."])}]}],
                "resolution": "image_256res", "max_tokens": 8, "seed": i, "return_token_ids": True})
        elif kind in ("chat", "chat_stream"):
            job = Job(i, kind, "finish", "POST", "/v1/chat/completions", stream=kind == "chat_stream",
                      json={"messages": [{"role": "user", "content": f"question {i}: {prompt}?"}],
                            "max_tokens": 8, "seed": i, "return_token_ids": True,
                            "stream": kind == "chat_stream"})
        elif kind == "cancel_wait":   # the client stops waiting (non-streamed): a disconnect
            job = Job(i, kind, "cancel", "POST", "/v1/images/generations", client_timeout_s=1.0,
                      json={"prompt": prompt, "size": "256x256", "num_inference_steps": 30, "seed": i})
        elif kind == "cancel_image_stream":
            job = Job(i, kind, "cancel", "POST", "/v1/chat/completions", stream=True,
                      json={"messages": [{"role": "user", "content": prompt}], "modalities": ["image"],
                            "size": "256x256", "num_inference_steps": 30, "seed": i, "stream": True})
        else:   # cancel_text_stream
            job = Job(i, kind, "cancel", "POST", "/v1/chat/completions", stream=True,
                      json={"messages": [{"role": "user", "content": "count forever"}], "max_tokens": 2000,
                            "stream": True})
        jobs.append(job)
    for j in range(n_timeouts):
        jobs.append(Job(n - n_timeouts + j, "timeout", "timeout", "POST", "/v1/images/generations",
                        json=dict(SLOW_T2I, seed=j)))
    return jobs


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p).encode())
    return h.hexdigest()[:16]


def _output_of(job: Job, body: dict) -> str:
    if job.path == "/v1/images/generations" or job.path == "/v1/images/edits":
        return _digest([base64.b64decode(d["b64_json"]) for d in body["data"]])
    content = body["choices"][0]["message"]["content"]
    if isinstance(content, list):   # an image part
        return _digest([c["image_url"]["url"].encode() for c in content if c.get("type") == "image_url"])
    return _digest([body["choices"][0].get("token_ids") or content])


def _stream_output(lines: list[dict]) -> str:
    token_ids, text, images = [], [], []
    for chunk in lines:
        for choice in chunk.get("choices", []):
            content = choice.get("delta", {}).get("content")
            if isinstance(content, list):
                images += [c["image_url"]["url"].encode() for c in content if c.get("type") == "image_url"]
            elif content:
                text.append(content)
    return _digest(images) if images else _digest(["".join(text)] + token_ids)


def run_job(job: Job, base_url: str, auth: dict, request_timeout_s: float) -> Job:
    hang_limit = request_timeout_s + 60
    job.start = time.monotonic()
    timeout = httpx.Timeout(job.client_timeout_s or hang_limit, connect=30)
    try:
        with httpx.Client(base_url=base_url, timeout=timeout) as c:
            kwargs = {"json": job.json} if job.json is not None else {"data": job.data, "files": job.files}
            if job.stream:
                with c.stream(job.method, job.path, headers=auth, **kwargs) as r:
                    job.status, job.retries = r.status_code, int(r.headers.get("x-lance-retries", 0))
                    if r.status_code != 200:
                        job.error = r.read().decode(errors="replace")[:300]
                    else:
                        chunks, failed = [], None
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                failed = chunk["error"]
                                break
                            chunks.append(chunk)
                            if job.intent == "cancel" and len(chunks) >= 2:
                                break   # closing the stream is the client going away
                        if failed is not None:   # an error event after the headers
                            job.status, job.error = 500, json.dumps(failed)[:300]
                        elif job.intent != "cancel":
                            job.output = _stream_output(chunks)
            else:
                r = c.request(job.method, job.path, headers=auth, **kwargs)
                job.status, job.retries = r.status_code, int(r.headers.get("x-lance-retries", 0))
                if r.status_code == 200:
                    job.output = _output_of(job, r.json())
                else:
                    job.error = r.text[:300]
    except httpx.TimeoutException as e:
        job.error = f"{type(e).__name__}"
        job.status = None
    except Exception as e:   # noqa: BLE001 - recorded as lost
        job.error = f"{type(e).__name__}: {e}"[:300]
    job.end = time.monotonic()
    took = job.end - job.start
    if job.intent == "finish":
        job.outcome = ("ok" if job.status == 200 else
                       "hung" if job.status is None and took >= hang_limit - 1 else "lost")
    elif job.intent == "cancel":
        # the client went away (its timeout, or closing the stream), or it finished first
        job.outcome = ("cancelled" if job.status in (None, 200) and (job.error in (None, "ReadTimeout"))
                       else "lost")
    else:
        job.outcome = ("timed_out" if job.status == 504 else
                       "hung" if job.status is None else "lost")
    return job


# -- the server ------------------------------------------------------------------------------------------


class OwnServer:
    """`serve run` of the shipped config on a free port and a private local Ray cluster."""

    def __init__(self, model: str | None, request_timeout_s: float, log_dir: Path):
        self.home = log_dir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="lsr", dir="/tmp"))   # short: Ray's socket paths
        self.port = free_port()
        config = yaml.safe_load(SERVE_CONFIG.read_text())
        args = config["applications"][0]["args"]
        args["request_timeout_s"] = request_timeout_s
        if model:
            args["model"] = model
        config["http_options"]["port"] = self.port
        path = log_dir / "reliability_serve.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = log_dir / "serve_run.log"
        env = {k: v for k, v in os.environ.items() if k not in ("LANCE_MODEL", "RAY_ADDRESS",
                                                                  "LANCE_SERVE_API_KEY")}
        env.update(HOME=str(self.home), RAY_ADDRESS="local", RAY_TMPDIR=str(self.ray_tmp),
                   RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION="0.05",
                   RAY_SERVE_ENABLE_TASK_EVENTS="1",   # replicas' calls in Ray's task table
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   PYTHONPATH=str(REPO_ROOT))
        self.start = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["serve", "run", str(path)], cwd=REPO_ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout_s: float = 900) -> float:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("serve run exited:\n" + self.log_path.read_text(errors="replace")[-4000:])
            if time.monotonic() - self.start > timeout_s:
                raise RuntimeError(f"not healthy after {timeout_s}s")
            try:
                if httpx.get(f"{self.url}/health", timeout=15).status_code == 200:
                    return time.monotonic() - self.start
            except httpx.HTTPError:
                pass
            time.sleep(2)

    def gcs_address(self) -> str:
        port_file = next((self.ray_tmp / "ray" / "session_latest").glob("gcs_server_port_*"))
        return f"127.0.0.1:{port_file.read_text().strip()}"

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(5)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


# -- kills, recovery, leaks ------------------------------------------------------------------------------

def wait_for(fn, timeout_s: float, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(poll_s)
    return None


def kill_and_recover(driver: RayDriver, stage: str, base_url: str, auth: dict,
                     ready=lambda: True) -> dict:
    """Kill the image variant's `stage` replica once it has work in flight (and `ready()`); time
    its recovery."""
    import psutil

    deployment = {"thinker": "ThinkerStage", "dit": "DiTStage"}[stage]
    if stage == "thinker":
        busy = wait_for(lambda: ready() and (s := driver.call(deployment, "engine_stats"))["submitted_requests"]
                        and s, 60, 0.05)
        stats = busy or driver.call(deployment, "engine_stats")
        procs = [psutil.Process(stats["pid"]), *psutil.Process(stats["pid"]).children(recursive=True)]
        in_flight = len(stats["submitted_requests"]) + len(stats["pending_exports"])
    else:
        busy = wait_for(lambda: ready() and (s := driver.call(deployment, "stats"))["jobs"] and s, 60, 0.05)
        procs, in_flight = [], (busy or {}).get("jobs", 0)
    killed_at = time.monotonic()
    name = driver.kill_replica(deployment)
    out = {"stage": stage, "replica": name, "in_flight_at_kill": in_flight, "at_s": killed_at}
    # the restarted replica answers through a handle (the call waits for it in Serve's queue)
    while True:
        try:
            driver.call(deployment, "check_health")
            break
        except Exception:   # noqa: BLE001 - no replica yet
            if time.monotonic() - killed_at > 600:
                break
            time.sleep(0.5)
    out["stage_back_s"] = round(time.monotonic() - killed_at, 2)
    with httpx.Client(base_url=base_url, timeout=30) as c:
        wait_for(lambda: c.get("/health", headers=auth).status_code == 200, 600, 0.5)
    out["health_ok_s"] = round(time.monotonic() - killed_at, 2)
    if procs:
        alive = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            alive = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive:
                break
            time.sleep(0.5)
        out["orphaned_processes"] = alive
    return out


def refresh_engine_stats(base_url: str, auth: dict) -> None:
    """One short request per thinker: vLLM's KV numbers are those of its last step."""
    video = data_url(mp4(), "video/mp4")
    with httpx.Client(base_url=base_url, timeout=120) as c:
        for content in ("hi", [{"type": "video_url", "video_url": {"url": video}},
                               {"type": "text", "text": "what moves?"}]):
            c.post("/v1/chat/completions", headers=auth, json={
                "messages": [{"role": "user", "content": content}], "max_tokens": 1})


def idle_census(driver: RayDriver, base_url: str, auth: dict, baseline: dict | None = None,
                settle_s: float = 90) -> dict:
    """leak_census once the stages are idle (equal to `baseline` if it gets there in settle_s)."""
    deadline = time.monotonic() + settle_s
    while True:
        refresh_engine_stats(base_url, auth)
        state = leak_census(driver)
        busy = any(v.get("num_running") or v.get("num_waiting") or v.get("active")
                   for k, v in state.items() if k.startswith(("thinker", "dit")))
        if (not busy and (baseline is None or not leaks(baseline, state))) or time.monotonic() > deadline:
            return state
        time.sleep(3)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 3)



# -- main ------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--api-key", default=os.environ.get("LANCE_SERVE_API_KEY", "").split(",")[0] or None)
    ap.add_argument("--ray-address", help="with --url: the server's GCS address, for kills and the census")
    ap.add_argument("--ray-home", type=Path, help="with --url: HOME of the server (its Ray auth token)")
    ap.add_argument("--model", help="checkpoint (default: the golden tiny checkpoint, both variants)")
    ap.add_argument("--request-timeout", type=float, default=90.0,
                    help="request_timeout_s of the server this script starts")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--timeouts", type=int, default=3, help="of --requests: requests meant to time out")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--no-kills", action="store_true")
    ap.add_argument("--bad-inputs-only", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    import signal

    own: list[OwnServer] = []

    def on_sigterm(*_):
        """A `timeout`: stop our server first (the requests in flight then fail at once), then
        leave through the `finally` that writes what was measured."""
        for srv in own:
            srv.stop()
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join(["benchmarks/reliability.py", *sys.argv[1:]]),
                     "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                 "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                                 "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}}
    server, driver, jobs = None, None, []
    log_dir = Path(tempfile.mkdtemp(prefix="reliability_"))
    try:
        if args.url:
            base_url, request_timeout_s = args.url.rstrip("/"), args.request_timeout
            if args.ray_address:
                driver = RayDriver(args.ray_address, args.ray_home or Path.home())
        else:
            model = args.model or (str(GOLDEN_TINY) if (GOLDEN_TINY / "Lance_3B").is_dir() else None)
            server = OwnServer(model, args.request_timeout, log_dir)
            own.append(server)
            results["serve_startup_s"] = round(server.wait_healthy(), 1)
            base_url, request_timeout_s = server.url, args.request_timeout
            driver = RayDriver(server.gcs_address(), server.home)
            results["server"] = {"config": "configs/lance_2stage.yaml (stage_graph auto: cpu)",
                                 "model": model or "tiny random (auto)", "request_timeout_s": request_timeout_s}
        print(f"server {base_url}; logs in {log_dir}", flush=True)

        # 1. bad inputs
        with httpx.Client(base_url=base_url) as c:
            results["bad_inputs"] = run_bad_inputs(c, base_url, auth)
        bad = results["bad_inputs"]
        print(f"bad inputs: {bad['tried']} tried, all 4xx: {bad['all_4xx']} {bad['by_status']}", flush=True)
        for r in bad["not_4xx"]:
            print("  NOT 4xx:", r, flush=True)
        if args.bad_inputs_only:
            return

        # 2. the load, with kills
        baseline = idle_census(driver, base_url, auth) if driver else None
        jobs = make_jobs(args.requests, args.timeouts)
        main_jobs = [j for j in jobs if j.intent != "timeout"]
        done = [0]
        lock = threading.Lock()
        kills: list[dict] = []
        in_flight: set[int] = set()

        def one(job: Job) -> Job:
            with lock:
                in_flight.add(job.index)
            run_job(job, base_url, auth, request_timeout_s)
            with lock:
                done[0] += 1
                in_flight.discard(job.index)
            return job

        def only_finishing_in_flight() -> bool:
            """No request whose client leaves early is running: what a kill hits must then finish."""
            with lock:
                return len(in_flight) >= 3 and all(jobs[i].intent == "finish" for i in in_flight)

        def killer():
            for stage, fraction in (("dit", 1 / 3), ("thinker", 2 / 3)):
                wait_for(lambda: done[0] >= fraction * len(main_jobs), 3600, 0.2)
                kills.append(kill_and_recover(driver, stage, base_url, auth, only_finishing_in_flight))
                print(f"killed the {stage}: {kills[-1]}", flush=True)

        load_start = time.monotonic()
        kill_thread = None
        if driver and not args.no_kills:
            kill_thread = threading.Thread(target=killer, daemon=True)
            kill_thread.start()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, main_jobs))
        if kill_thread:
            kill_thread.join(900)
        main_wall = time.monotonic() - load_start
        # requests that run into the deadline, together, once the rest is done (each holds the DiT)
        timeout_jobs = [j for j in jobs if j.intent == "timeout"]
        with ThreadPoolExecutor(max(len(timeout_jobs), 1)) as pool:
            list(pool.map(lambda j: run_job(j, base_url, auth, request_timeout_s), timeout_jobs))
        load_wall = time.monotonic() - load_start

        # 3. leaks
        after = idle_census(driver, base_url, auth, baseline) if driver else None

        # 4. retried requests again, undisturbed: the same output
        retried = [j for j in jobs if j.intent == "finish" and j.retries and j.outcome == "ok"]
        same = 0
        for j in retried:
            again = run_job(Job(j.index, j.kind, j.intent, j.method, j.path, j.json, j.data, j.files, j.stream),
                            base_url, auth, request_timeout_s)
            same += again.output == j.output
        by_outcome: dict[str, int] = {}
        for j in jobs:
            by_outcome[j.outcome] = by_outcome.get(j.outcome, 0) + 1
        finished = [j for j in jobs if j.intent == "finish" and j.outcome == "ok"]
        lat = lambda js: [j.end - j.start for j in js]   # noqa: E731
        kinds = sorted({j.kind for j in jobs})
        # not retried, but in flight while a killed stage was coming back (they waited for it)
        windows = [(k["at_s"], k["at_s"] + k["stage_back_s"]) for k in kills]
        waited = [j for j in finished if not j.retries and any(j.start < b and j.end > a for a, b in windows)]
        undisturbed = [j for j in finished if not j.retries and j not in waited]
        for k in kills:
            k["at_s"] = round(k["at_s"] - load_start, 1)
        results["load"] = {
            "requests": len(jobs), "concurrency": args.concurrency,
            "by_kind": {k: sum(j.kind == k for j in jobs) for k in kinds},
            "by_outcome": by_outcome,
            "lost": by_outcome.get("lost", 0), "hung": by_outcome.get("hung", 0),
            "overloaded_503": sum(j.status == 503 for j in jobs),
            "wall_s": round(load_wall, 1), "wall_s_without_timeouts": round(main_wall, 1),
            "kills": kills,
            "retried": {"requests": len(retried), "retries": sum(j.retries for j in retried),
                        "same_output_when_run_again": same},
            "latency_s": {
                "retried": {"n": len(retried), "p50": percentile(lat(retried), 0.5),
                            "p95": percentile(lat(retried), 0.95)},
                "not_retried": {"n": len(finished) - len(retried),
                                "p50": percentile(lat([j for j in finished if not j.retries]), 0.5),
                                "p95": percentile(lat([j for j in finished if not j.retries]), 0.95)},
                "not_retried_during_a_recovery": {"n": len(waited), "p50": percentile(lat(waited), 0.5),
                                                  "p95": percentile(lat(waited), 0.95)},
                "not_retried_undisturbed": {"n": len(undisturbed), "p50": percentile(lat(undisturbed), 0.5),
                                            "p95": percentile(lat(undisturbed), 0.95)},
                "by_kind_not_retried": {k: {"p50": percentile(lat([j for j in finished if j.kind == k and not j.retries]), 0.5),
                                            "p95": percentile(lat([j for j in finished if j.kind == k and not j.retries]), 0.95)}
                                        for k in kinds if any(j.kind == k for j in finished)},
                "timed_out": {"n": by_outcome.get("timed_out", 0),
                              "max": round(max(lat([j for j in jobs if j.outcome == "timed_out"]), default=0), 1)},
            },
            "problems": [{k: v for k, v in asdict(j).items() if k in ("index", "kind", "status", "error", "outcome")}
                         for j in jobs if j.outcome in ("lost", "hung")],
        }
        found = leaks(baseline, after) if baseline is not None else None
        results["leaks"] = {"baseline": baseline, "after": after, "leaked": found,
                            "back_to_baseline": baseline is not None and not found}
        print(json.dumps({k: results["load"][k] for k in ("requests", "by_outcome", "lost", "hung", "kills",
                                                          "retried", "latency_s")}, indent=1), flush=True)
        print("leaks back to baseline:", results["leaks"]["back_to_baseline"], flush=True)
        if not results["leaks"]["back_to_baseline"]:
            print(json.dumps(results["leaks"], indent=1), flush=True)
    finally:
        if jobs and "load" not in results:   # interrupted: what had finished
            results["load_interrupted"] = {"requests_done": sum(bool(j.outcome) for j in jobs),
                                           "by_outcome": {o: sum(j.outcome == o for j in jobs)
                                                          for o in {j.outcome for j in jobs} if o}}
        if driver is not None:
            driver.close()
        if server is not None:
            server.stop()
            results["serve_log_tail"] = server.log_path.read_text(errors="replace")[-3000:].splitlines()[-20:]
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1, default=str))
            print(f"wrote {args.json}", flush=True)


if __name__ == "__main__":
    main()
