"""End to end: the README's serve command, real Ray Serve + the vLLM thinker + the DiT, over HTTP.

One deployment for the whole module: `serve run configs/lance_2stage.yaml` exactly as the README
says, as a subprocess on a fresh local Ray cluster, with LANCE_MODEL unset and HOME a temp dir, so
that on this CPU machine the app creates the tiny random-weights checkpoint in HOME's cache and
serves it. Every test talks to it over real HTTP (httpx, curl, the OpenAI SDK) on the config's port.

The split must change nothing: for the same seed and knobs, served images equal the offline
`LancePipeline`'s (+-1 per pixel; an edit's reference posterior noise is drawn from the seed on
both sides) and served image->text token ids equal the offline greedy ids.

The README's "HTTP API" section is executed here: every ```bash block that calls curl and every
```python block in that section runs against this server (test_readme_http_api_examples).
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = "configs/lance_2stage.yaml"
VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 300
PROMPT = "A red cube on a blue table"


# -- the deployment -----------------------------------------------------------------------------------

@dataclass
class Server:
    base_url: str
    proc: subprocess.Popen
    log_path: Path
    home: Path
    startup_s: float

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _config_port() -> int:
    return int(yaml.safe_load((REPO_ROOT / SERVE_CONFIG).read_text())["http_options"]["port"])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops `serve run` (it shuts Serve down, and its local Ray cluster with it);
    then the process group it leads, if anything is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return   # nothing left of the group
        os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    port = _config_port()
    if _port_in_use(port):
        pytest.fail(f"port {port} ({SERVE_CONFIG} http_options.port) is already in use; "
                    "stop whatever listens there")
    home = tmp_path_factory.mktemp("home")
    log_path = home / "serve_run.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("LANCE_MODEL", "LANCE_SERVE_CACHE_DIR", "XDG_CACHE_HOME", "RAY_ADDRESS")}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_ADDRESS="local",                              # a fresh cluster, never another's
               RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION="0.05")  # small object store
    start = time.monotonic()
    with open(log_path, "wb") as log:
        # exactly the README's command (`make serve` runs it too)
        proc = subprocess.Popen(["serve", "run", SERVE_CONFIG], cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`serve run {SERVE_CONFIG}` exited ({proc.returncode}):\n"
                            + log_path.read_text(errors="replace")[-6000:])
            if time.monotonic() - start > STARTUP_TIMEOUT_S:
                pytest.fail(f"not healthy after {STARTUP_TIMEOUT_S}s:\n"
                            + log_path.read_text(errors="replace")[-6000:])
            try:
                if httpx.get(f"{base_url}/health", timeout=15).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield Server(base_url, proc, log_path, home, time.monotonic() - start)
    finally:
        _stop(proc)
        deadline = time.monotonic() + 30
        while _port_in_use(port) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _port_in_use(port), f"port {port} still open after `serve run` was stopped"


@pytest.fixture(scope="module")
def http(server: Server):
    with httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S,
                         max_retries=0)


@pytest.fixture(scope="module")
def model_info(http) -> dict:
    return http.get("/v1/models").json()["data"][0]


@pytest.fixture(scope="module")
def offline(model_info):
    """The offline reference on the very checkpoint the server serves (fp32, CPU)."""
    from stages.lance import LancePipeline

    return LancePipeline.from_pretrained(model_info["root"])


# -- helpers ------------------------------------------------------------------------------------------

def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def input_image(width: int = 120, height: int = 90) -> Image.Image:
    """A deterministic image with structure (gradients and a square), so edits see real content."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    rgb[height // 4: height // 2, width // 4: width // 2] = (220, 30, 30)
    return Image.fromarray(rgb, "RGB")


def image_from_data_url(url: str) -> Image.Image:
    head, b64 = url.split(",", 1)
    assert head == "data:image/png;base64", head
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw)).convert("RGB")


def chat_image(resp_json: dict) -> Image.Image:
    choice = resp_json["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert isinstance(content, list) and len(content) == 1 and content[0]["type"] == "image_url"
    return image_from_data_url(content[0]["image_url"]["url"])


# On the tiny random checkpoint the seed's noise dominates the image: a knob (CFG scale, shift,
# interval, steps, prompt) moves 1% to 36% of the uint8 values by 1 to 3, while the served and
# offline images differ in under 0.01% of the values (float rounding at the uint8 boundary). So
# besides +-1 per value, at most 0.1% of the values may differ: that catches a knob lost on the way.
MAX_DIFFERING_FRACTION = 1e-3


def differing_fraction(a: Image.Image, b: Image.Image) -> float:
    return float((np.asarray(a, dtype=np.int16) != np.asarray(b, dtype=np.int16)).mean())


def assert_pixels_close(served: Image.Image, reference: Image.Image, what: str) -> None:
    a, b = np.asarray(served, dtype=np.int16), np.asarray(reference, dtype=np.int16)
    assert a.shape == b.shape, f"{what}: served {a.shape} vs offline {b.shape}"
    diff = np.abs(a - b)
    assert diff.max() <= 1, f"{what}: max pixel diff {diff.max()} ({(diff > 1).sum()} values > 1)"
    assert (diff > 0).mean() <= MAX_DIFFERING_FRACTION, \
        f"{what}: {(diff > 0).mean():.2%} of the values differ (by 1)"


def assert_knobs_matter(with_knobs: Image.Image, without: Image.Image, what: str) -> None:
    """The comparison can see the knobs: leaving them out changes the offline image detectably."""
    assert differing_fraction(with_knobs, without) > 5 * MAX_DIFFERING_FRACTION, \
        f"{what}: the knobs do not change the image enough to be checked"


def assert_openai_error(resp: httpx.Response, status: int, code: str | None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == ("invalid_request_error" if status == 400 else err["type"])
    if code is not None:
        assert err["code"] == code, err
    return err


def t2i_body(prompt: str = PROMPT, **knobs) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "modalities": ["image"], **knobs}


def sse_events(resp: httpx.Response) -> list:
    """Decoded `data:` payloads of an SSE response ("[DONE]" kept as the string)."""
    events = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


SMALL = {"size": "64x64", "num_inference_steps": 4}


# -- the README command, defaults, model listing --------------------------------------------------------

def test_readme_serve_command_serves_the_tiny_checkpoint(server, http, model_info):
    """No model and no GPU: the tiny checkpoint is created in HOME's cache, served, and announced."""
    tiny_dir = server.home / ".cache" / "lance-serve" / "tiny"
    assert (tiny_dir / "Lance_3B" / "model.safetensors").is_file()
    assert model_info["id"] == "lance-tiny-random" and model_info["root"] == str(tiny_dir)
    assert model_info["lance"]["tiny_random_weights"] is True
    assert model_info["lance"]["stage_graph"] == "cpu"
    assert "TINY RANDOM-WEIGHTS" in server.log()
    assert "!! NO API KEY" in server.log()   # it listens on 0.0.0.0 without a key: said loudly
    health = http.get("/health")
    assert health.status_code == 200 and health.json() == {
        "status": "ok", "stages": {"thinker": "ok", "dit": "ok"}}
    print(f"\n`serve run {SERVE_CONFIG}` healthy after {server.startup_s:.1f}s")


def test_t2i_with_every_default_equals_offline(http, offline):
    """Nothing but the prompt: 768x768, 30 steps, seed 42 and upstream's CFG knobs on both sides."""
    resp = http.post("/v1/chat/completions", json=t2i_body())
    assert resp.status_code == 200, resp.text[:500]
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "lance-tiny-random"
    assert body["usage"]["completion_tokens"] == 48 * 48   # target latent tokens
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 48 * 48
    served = chat_image(body)
    assert served.size == (768, 768)
    assert_pixels_close(served, offline.text_to_image(PROMPT).image, "t2i defaults")


# -- image generation equals the offline pipeline ---------------------------------------------------------

T2I_CASES = {
    "knobs": ({"size": "96x64", "num_inference_steps": 5, "seed": 7, "cfg_text_scale": 3.0,
               "timestep_shift": 2.0, "cfg_interval": [0.2, 0.9]},
              dict(height=64, width=96, num_inference_steps=5, seed=7, cfg_text_scale=3.0,
                   timestep_shift=2.0, cfg_interval=(0.2, 0.9))),
    "height_width_negative_prompt": (
        {"height": 80, "width": 64, "num_inference_steps": 4, "seed": 3,
         "negative_prompt": "blurry, low quality"},
        dict(height=80, width=64, num_inference_steps=4, seed=3,
             negative_prompt="blurry, low quality")),
    "no_cfg": ({"size": "64x64", "num_inference_steps": 3, "seed": 1, "cfg_text_scale": 1.0},
               dict(height=64, width=64, num_inference_steps=3, seed=1, cfg_text_scale=1.0)),
}


@pytest.mark.parametrize("case", T2I_CASES)
def test_t2i_equals_offline(http, offline, case):
    served_knobs, offline_kwargs = T2I_CASES[case]
    resp = http.post("/v1/chat/completions", json=t2i_body(**served_knobs))
    assert resp.status_code == 200, resp.text[:500]
    reference = offline.text_to_image(PROMPT, **offline_kwargs).image
    assert_pixels_close(chat_image(resp.json()), reference, f"t2i {case}")
    geometry = {k: offline_kwargs[k] for k in ("height", "width", "seed")}
    assert_knobs_matter(reference, offline.text_to_image(PROMPT, **geometry).image, case)


def test_system_message_sets_the_system_prompt(http, offline):
    system = "Render the scene as a flat icon."
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": PROMPT}],
            "modalities": ["image"], "seed": 5, **SMALL}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text[:500]
    reference = offline.text_to_image(PROMPT, height=64, width=64, num_inference_steps=4, seed=5,
                                      system_prompt=system).image
    assert_pixels_close(chat_image(resp.json()), reference, "t2i with a system message")
    assert_knobs_matter(reference, offline.text_to_image(PROMPT, height=64, width=64,
                                                         num_inference_steps=4, seed=5).image, "system")


def test_knobs_top_level_nested_extra_body_and_sdk_extra_body_agree(http, client, offline):
    """The OpenAI SDK's extra_body (flattened on the wire), raw JSON with the knobs top-level, nested
    in extra_body, in vLLM-Omni's extra_args, and a BAGEL-client-wrapped prompt: one image."""
    knobs = {"size": "64x80", "num_inference_steps": 4, "seed": 11, "cfg_text_scale": 5.0}
    reference = offline.text_to_image(PROMPT, height=80, width=64, num_inference_steps=4, seed=11,
                                      cfg_text_scale=5.0).image
    assert_knobs_matter(reference, offline.text_to_image(PROMPT, height=80, width=64, seed=11).image,
                        "steps and cfg_text_scale")
    messages = [{"role": "user", "content": PROMPT}]
    sdk = client.chat.completions.create(model="lance-tiny-random", messages=messages,
                                         extra_body={"modalities": ["image"], **knobs})
    assert_pixels_close(image_from_data_url(sdk.choices[0].message.content[0]["image_url"]["url"]),
                        reference, "openai SDK extra_body")
    bodies = {
        "top level": {"messages": messages, "modalities": ["image"], **knobs},
        "nested extra_body": {"messages": messages, "extra_body": {"modalities": ["image"], **knobs}},
        "extra_args": {"messages": messages, "modalities": ["image"], "extra_args": knobs},
        "wrapped prompt": {"messages": [{"role": "user", "content": f"<|im_start|>{PROMPT}<|im_end|>"}],
                           "modalities": ["image"], **knobs},
    }
    for name, body in bodies.items():
        resp = http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, (name, resp.text[:500])
        assert_pixels_close(chat_image(resp.json()), reference, name)


def test_image_edit_equals_offline(http, offline):
    """One input image + image output = an edit; the reference posterior noise comes from the seed."""
    image = input_image()
    instruction = "Make the square green"
    body = {"messages": [{"role": "user", "content": [
                {"type": "text", "text": instruction},
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(image))}}]}],
            "modalities": ["image"], "resolution": "image_256res", "num_inference_steps": 4,
            "seed": 9, "timestep_shift": 2.0, "cfg_text_scale": 2.5}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text[:500]
    reference = offline.edit_image(image, instruction, resolution="image_256res", num_inference_steps=4,
                                   seed=9, timestep_shift=2.0, cfg_text_scale=2.5).image
    assert_pixels_close(chat_image(resp.json()), reference, "image edit")
    assert_knobs_matter(reference, offline.edit_image(image, instruction, resolution="image_256res",
                                                      seed=9).image, "edit knobs")


def test_concurrent_requests_each_equal_offline(http, offline):
    """Four different t2i requests in flight together: each gets its own image."""
    seeds = [21, 22, 23, 24]
    with ThreadPoolExecutor(4) as pool:
        resps = list(pool.map(lambda s: http.post("/v1/chat/completions",
                                                  json=t2i_body(seed=s, **SMALL)), seeds))
    for seed, resp in zip(seeds, resps):
        assert resp.status_code == 200, resp.text[:500]
        reference = offline.text_to_image(PROMPT, height=64, width=64, num_inference_steps=4, seed=seed)
        assert_pixels_close(chat_image(resp.json()), reference.image, f"concurrent seed {seed}")


# -- text ---------------------------------------------------------------------------------------------

def test_image_to_text_token_ids_equal_offline(http, offline):
    image = input_image(100, 140)
    question = "What color is the square?"
    body = {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(image, "JPEG"), "image/jpeg")}},
                {"type": "text", "text": question}]}],
            "modalities": ["text"], "max_tokens": 12, "resolution": "image_256res",
            "return_token_ids": True}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text[:500]
    out = resp.json()
    choice = out["choices"][0]
    decoded = Image.open(io.BytesIO(png_bytes(image, "JPEG"))).convert("RGB")  # what the server saw
    reference = offline.image_to_text(decoded, question, resolution="image_256res", max_new_tokens=12)
    assert len(reference.token_ids) >= 4   # something to compare (no immediate end of turn)
    assert choice["token_ids"] == reference.token_ids
    assert isinstance(choice["message"]["content"], str)
    assert choice["message"]["content"] == reference.text
    assert choice["finish_reason"] == ("length" if len(reference.token_ids) == 12 else "stop")
    assert out["usage"]["completion_tokens"] == len(reference.token_ids)


def test_text_chat_with_the_openai_sdk(client):
    resp = client.chat.completions.create(
        model="lance-tiny-random", max_tokens=8,
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Hello, who are you?"},
                  {"role": "assistant", "content": "A model."},
                  {"role": "user", "content": "Say more."}])
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= resp.usage.completion_tokens <= 8 and resp.usage.prompt_tokens > 10
    # greedy by default: the same request gives the same answer
    again = client.chat.completions.create(model="lance-tiny-random", max_tokens=8,
                                           messages=[{"role": "user", "content": "Hello"}])
    assert again.choices[0].message.content == client.chat.completions.create(
        model="lance-tiny-random", max_tokens=8,
        messages=[{"role": "user", "content": "Hello"}]).choices[0].message.content


def test_stream_text_deltas(client):
    messages = [{"role": "user", "content": "Tell me about the blue table."}]
    whole = client.chat.completions.create(model="lance-tiny-random", messages=messages, max_tokens=10,
                                           extra_body={"return_token_ids": True})
    chunks = list(client.chat.completions.create(
        model="lance-tiny-random", messages=messages, max_tokens=10, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = [i for c in chunks if c.choices for i in (c.choices[0].model_extra.get("token_ids") or [])]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2   # real deltas
    assert text == whole.choices[0].message.content
    assert ids == whole.choices[0].model_extra["token_ids"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)


def test_stream_image_progress_then_image(http):
    body = t2i_body(seed=4, stream=True, **SMALL)
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    progress = [c["lance_progress"] for c in chunks if "lance_progress" in c]
    assert progress == [{"step": i, "total": 4} for i in range(1, 5)]
    image_chunks = [i for i, c in enumerate(chunks) if isinstance(c["choices"][0]["delta"].get("content"), list)]
    assert len(image_chunks) == 1
    last_progress = max(i for i, c in enumerate(chunks) if "lance_progress" in c)
    assert image_chunks[0] > last_progress                       # progress first, then the image
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    streamed = image_from_data_url(chunks[image_chunks[0]]["choices"][0]["delta"]["content"][0]["image_url"]["url"])
    whole = http.post("/v1/chat/completions", json=t2i_body(seed=4, **SMALL))
    assert np.array_equal(np.asarray(streamed), np.asarray(chat_image(whole.json())))


# -- the OpenAI images API ------------------------------------------------------------------------------

def test_images_generate_with_the_openai_sdk(client, offline):
    """n images of one prompt use seeds seed, seed+1, ..."""
    result = client.images.generate(model="lance-tiny-random", prompt=PROMPT, size="64x64", n=2,
                                    extra_body={"num_inference_steps": 3, "seed": 30})
    assert len(result.data) == 2 and result.size == "64x64"
    for i, item in enumerate(result.data):
        served = Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB")
        reference = offline.text_to_image(PROMPT, height=64, width=64, num_inference_steps=3, seed=30 + i)
        assert_pixels_close(served, reference.image, f"images.generate #{i}")
    assert_knobs_matter(reference.image, offline.text_to_image(PROMPT, height=64, width=64, seed=31).image,
                        "images.generate num_inference_steps")


def test_images_edit_with_the_openai_sdk(client, offline):
    image = input_image(90, 120)
    result = client.images.edit(model="lance-tiny-random", image=("in.png", png_bytes(image), "image/png"),
                                prompt="Turn the square blue",
                                extra_body={"resolution": "image_256res", "num_inference_steps": 3,
                                            "seed": 8})
    assert len(result.data) == 1
    served = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB")
    reference = offline.edit_image(image, "Turn the square blue", resolution="image_256res",
                                   num_inference_steps=3, seed=8).image
    assert_pixels_close(served, reference, "images.edit")


# -- errors: every bad request is a 4xx with an OpenAI error body -------------------------------------------

def _user_with_images(*urls: str, text: str = "edit it") -> list:
    return [{"role": "user", "content": [{"type": "text", "text": text}]
             + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


GOOD_IMAGE = data_url(png_bytes(input_image(40, 30)))
LONG_PROMPT = " ".join(f"w{i}x" for i in range(5000))   # > the cpu graph's max_model_len 4096

BAD_CHAT_REQUESTS = {
    "modality_audio": (t2i_body() | {"modalities": ["audio"]}, 400, "unsupported_modality"),
    "modality_image_and_text": (t2i_body() | {"modalities": ["image", "text"]}, 400,
                                "unsupported_modality"),
    "size_not_multiple_of_16": (t2i_body(size="72x64"), 400, "invalid_size"),
    "size_above_max": (t2i_body(size="1040x1040"), 400, "invalid_size"),
    "height_above_max": (t2i_body(height=2048, width=64), 400, "invalid_size"),
    "size_garbage": (t2i_body(size="big"), 400, "invalid_size"),
    "steps_zero": (t2i_body(num_inference_steps=0), 400, "invalid_value"),
    "steps_too_many": (t2i_body(num_inference_steps=201), 400, "invalid_value"),
    "steps_not_int": (t2i_body(num_inference_steps="30"), 400, "invalid_type"),
    "cfg_interval_reversed": (t2i_body(cfg_interval=[0.9, 0.1]), 400, "invalid_value"),
    "broken_base64": ({"messages": _user_with_images("data:image/png;base64,@@not*base64@@"),
                       "modalities": ["image"]}, 400, "invalid_base64"),
    "non_image_bytes": ({"messages": _user_with_images(data_url(b"hello, I am not a picture" * 8)),
                         "modalities": ["image"]}, 400, "invalid_image"),
    "not_an_image_mime": ({"messages": _user_with_images(data_url(b"abc", "text/plain")),
                           "modalities": ["text"]}, 400, "invalid_image_url"),
    "too_many_images": ({"messages": _user_with_images(GOOD_IMAGE, GOOD_IMAGE),
                         "modalities": ["image"]}, 400, "too_many_images"),
    "remote_image_disabled": ({"messages": _user_with_images("http://example.com/cat.png"),
                               "modalities": ["text"]}, 400, "remote_images_disabled"),
    "guidance_scale_unknown_to_lance": (t2i_body(guidance_scale=5.0), 400, "unsupported_parameter"),
    "conflicting_knob_places": (t2i_body(seed=1, extra_body={"seed": 2}), 400, "conflicting_values"),
    "max_tokens_above_context": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
                                 400, "invalid_value"),
    "wrong_model": (t2i_body() | {"model": "gpt-4o"}, 404, "model_not_found"),
    "chat_prompt_longer_than_context": ({"messages": [{"role": "user", "content": LONG_PROMPT}]},
                                        400, "context_length_exceeded"),
    "t2i_prompt_longer_than_context": (t2i_body(LONG_PROMPT, **SMALL), 400, "context_length_exceeded"),
    "stream_prompt_longer_than_context": ({"messages": [{"role": "user", "content": LONG_PROMPT}],
                                           "stream": True}, 400, "context_length_exceeded"),
}


@pytest.mark.parametrize("case", BAD_CHAT_REQUESTS)
def test_bad_chat_request_is_an_openai_4xx(http, case):
    body, status, code = BAD_CHAT_REQUESTS[case]
    assert_openai_error(http.post("/v1/chat/completions", json=body), status, code)


def test_bad_bodies_and_images_api_errors(http, client):
    resp = http.post("/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert_openai_error(resp, 400, "invalid_json")
    assert_openai_error(http.post("/v1/images/generations", json={"prompt": PROMPT, "size": "100x100"}),
                        400, "invalid_size")
    assert_openai_error(http.post("/v1/images/generations", json={"prompt": PROMPT, "n": 9}),
                        400, "invalid_value")
    assert_openai_error(http.post("/v1/images/generations", json={"prompt": LONG_PROMPT, **SMALL}),
                        400, "context_length_exceeded")
    resp = http.post("/v1/images/edits", data={"prompt": "x"},
                     files={"image": ("a.png", b"not an image at all", "image/png")})
    assert_openai_error(resp, 400, "invalid_image")
    assert_openai_error(http.post("/v1/images/edits", json={"prompt": "x"}), 400, "invalid_content_type")
    assert_openai_error(http.get("/v1/nope"), 404, None)
    # the SDK sees the same errors as typed exceptions with the OpenAI body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lance-tiny-random", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"modalities": ["image"], "size": "1040x1040"})
    assert e.value.code == "invalid_size" and e.value.param == "height"
    # and after all of this the server is still healthy
    assert http.get("/health").status_code == 200


# -- the README's HTTP API examples ---------------------------------------------------------------------------

def readme_http_api_blocks() -> list[tuple[str, str]]:
    """(language, code) of the fenced bash blocks that call curl and all python blocks of the
    README's "## HTTP API" section."""
    text = (REPO_ROOT / "README.md").read_text()
    m = re.search(r"^## HTTP API\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, 'README.md has no "## HTTP API" section'
    blocks = re.findall(r"^```(bash|python)\n(.*?)^```", m.group(1), re.S | re.M)
    return [(lang, code) for lang, code in blocks if lang == "python" or "curl " in code]


def test_readme_http_api_examples(server, tmp_path):
    blocks = readme_http_api_blocks()
    langs = [lang for lang, _ in blocks]
    assert langs.count("bash") >= 3 and langs.count("python") >= 2, langs
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for i, (lang, code) in enumerate(blocks):
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=REQUEST_TIMEOUT_S)
        assert proc.returncode == 0, f"README {lang} example #{i} failed:\n{code}\n{proc.stdout}\n{proc.stderr}"
        assert proc.stdout.strip(), f"README {lang} example #{i} printed nothing:\n{code}"
        for name in re.findall(r"[\w-]+\.png", code):   # every PNG an example names was written
            with Image.open(tmp_path / name) as img:
                assert img.format == "PNG", name
        # an answer the README quotes as a `# {...}` comment is exactly what the server sent
        for quoted in re.findall(r"^# (\{.*\})$", code, re.M):
            assert quoted in proc.stdout, f"README example #{i} quotes {quoted}, got:\n{proc.stdout}"
