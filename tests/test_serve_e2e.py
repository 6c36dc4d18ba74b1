"""End to end: the README's serve command, real Ray Serve + the vLLM thinker + the DiT, over HTTP.

One deployment (the `server` fixture of tests/serve_server.py, shared with the browser tests):
`serve run configs/lance_2stage.yaml` exactly as the README says, as a subprocess on a fresh local
Ray cluster, with LANCE_MODEL unset and HOME a temp dir, so that on this CPU machine the app creates
the tiny random-weights checkpoint in HOME's cache and serves it. Every test talks to it over real
HTTP (httpx, curl, the OpenAI SDK) on the config's port.

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
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from helpers import data_url, png_bytes
from serve_server import REQUEST_TIMEOUT_S, SERVE_CONFIG, VENV_BIN, Server

pytestmark = pytest.mark.heavy   # `serve run` of the whole app

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A red cube on a blue table"


# -- the deployment: the session's one `serve run` (tests/serve_server.py) ----------------------------

@pytest.fixture(scope="module")
def model_info(http) -> dict:
    return http.get("/v1/models").json()["data"][0]


@pytest.fixture(scope="module")
def offline(model_info):
    """The offline reference on the very checkpoint the server serves (fp32, CPU)."""
    from stages.lance import LancePipeline

    return LancePipeline.from_pretrained(model_info["root"])


# -- helpers ------------------------------------------------------------------------------------------

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
    assert (tiny_dir / "Lance_3B_Video" / "model.safetensors").is_file()   # both variants
    assert model_info["id"] == "lance-tiny-random" and model_info["root"] == str(tiny_dir)
    assert model_info["lance"]["tiny_random_weights"] is True
    assert model_info["lance"]["stage_graph"] == "cpu"
    assert "TINY RANDOM-WEIGHTS" in server.log()
    assert "!! NO API KEY" in server.log()   # it listens on 0.0.0.0 without a key: said loudly
    health = http.get("/health")
    assert health.status_code == 200 and health.json() == {
        "status": "ok", "stages": {"thinker": "ok", "dit": "ok", "thinker@Lance_3B_Video": "ok",
                                   "dit@Lance_3B_Video": "ok"}, "dit_jobs": 0}
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
    assert chunks[0]["lance"] == {"task": "t2i", "ignored_params": []}
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


@pytest.mark.parametrize("fmt, pil", [("webp", "WEBP"), ("jpeg", "JPEG")])
def test_images_generate_in_the_requested_format(client, offline, fmt, pil):
    result = client.images.generate(model="lance-tiny-random", prompt=PROMPT, size="64x64", output_format=fmt,
                                    output_compression=95, extra_body={"num_inference_steps": 3, "seed": 30})
    assert result.output_format == fmt
    served = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert served.format == pil and served.size == (64, 64)
    reference = offline.text_to_image(PROMPT, height=64, width=64, num_inference_steps=3, seed=30).image

    def error(img):
        return np.abs(np.asarray(img.convert("RGB"), dtype=np.float32) - np.asarray(reference, dtype=np.float32)).mean()
    # a lossy format moves pixels (a random model's noise-like image is its worst case): the served image must
    # be as far from the offline one as the offline one encoded the same way, not an unrelated image (~80)
    buf = io.BytesIO()
    reference.save(buf, format=pil, quality=95)
    own = error(Image.open(io.BytesIO(buf.getvalue())))
    assert error(served) <= 1.2 * own + 1, f"{fmt}: mean abs error {error(served):.1f}, the format's own {own:.1f}"


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


# -- real clients, unchanged ----------------------------------------------------------------------------

LANCE_CLIENT = Path(os.environ.get("LANCE_CLIENTS_DIR", REPO_ROOT.parent / "shared" / "clients")) \
    / "lance_openai_chat_client.py"
CLIENT_PROMPT = "A cute cat"   # the client's default prompt, sent wrapped as <|im_start|>...<|im_end|>


def run_lance_client(server: Server, tmp_path: Path, modality: str, *args: str) -> str:
    """vLLM-Omni's Lance chat client, as a user runs it (its own argv); its stdout."""
    assert LANCE_CLIENT.is_file(), f"{LANCE_CLIENT} is missing (set LANCE_CLIENTS_DIR)"
    cmd = [sys.executable, str(LANCE_CLIENT), "--server", server.base_url, "--modality", modality,
           "--output", str(tmp_path / "out.png"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=2 * REQUEST_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd[1:])} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def client_text(stdout: str) -> str:
    assert "Response:\n" in stdout, stdout
    return stdout.split("Response:\n", 1)[1].strip("\n")


@pytest.mark.parametrize("modality", ["text2img", "img2img", "img2text", "text2text"])
def test_the_lance_client_unchanged_with_its_defaults(server, offline, tmp_path, modality):
    """The client always sends height/width 512, 25 steps and seed 42: every modality is answered."""
    args = ["--prompt", "Describe this image" if modality == "img2text" else CLIENT_PROMPT]
    if modality in ("img2img", "img2text"):
        (tmp_path / "in.png").write_bytes(png_bytes(input_image()))
        args += ["--image-url", str(tmp_path / "in.png")]
    with ThreadPoolExecutor(1) as pool:   # the client's request and the offline reference side by side
        pending = pool.submit(run_lance_client, server, tmp_path, modality, *args)
        if modality == "text2img":   # the seeded t2i is the offline pipeline's image
            reference = offline.text_to_image(CLIENT_PROMPT, height=512, width=512, num_inference_steps=25,
                                              seed=42).image
        stdout = pending.result()
    if modality in ("text2img", "img2img"):
        with Image.open(tmp_path / "out.png") as img:
            assert img.format == "PNG"
            served = img.convert("RGB")
        if modality == "text2img":
            assert_pixels_close(served, reference, "lance client text2img defaults")
        else:   # an edit keeps the input's bucketed size: the client's 512x512 is ignored
            assert served.size != (512, 512) and served.size[0] > served.size[1]   # 120x90 input
    else:
        assert client_text(stdout).strip(), stdout


@pytest.mark.parametrize("modality", ["text2img", "img2img", "img2text", "text2text"])
def test_the_lance_client_unchanged_with_explicit_knobs(server, offline, tmp_path, modality):
    knobs = ["--height", "64", "--width", "96", "--steps", "3", "--seed", "7", "--negative", "blurry, dark"]
    prompt = "What is in the picture?" if modality == "img2text" else "A red cube on a blue table"
    image = input_image(96, 128)
    if modality in ("img2img", "img2text"):
        (tmp_path / "in.png").write_bytes(png_bytes(image))
        knobs += ["--image-url", str(tmp_path / "in.png")]
    stdout = run_lance_client(server, tmp_path, modality, "--prompt", prompt, *knobs)
    if modality == "text2img":
        with Image.open(tmp_path / "out.png") as img:
            served = img.convert("RGB")
        reference = offline.text_to_image(prompt, height=64, width=96, num_inference_steps=3, seed=7,
                                          negative_prompt="blurry, dark").image
        assert_pixels_close(served, reference, "lance client text2img knobs")
        assert_knobs_matter(reference, offline.text_to_image(prompt, height=64, width=96, seed=7).image,
                            "client knobs")
    elif modality == "img2img":
        with Image.open(tmp_path / "out.png") as img:
            assert img.format == "PNG" and img.size != (96, 64) and img.size[1] > img.size[0]
    else:
        assert client_text(stdout).strip(), stdout


def test_ignored_params_are_reported_in_the_body_header_and_stream(http):
    """What the Lance client sends for text: its image knobs are accepted, ignored and reported."""
    body = {"messages": [{"role": "user", "content": "<|im_start|>Hello<|im_end|>"}], "modalities": ["text"],
            "height": 512, "width": 512, "num_inference_steps": 25, "seed": 42, "max_tokens": 4}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text[:500]
    ignored = ["height", "num_inference_steps", "seed", "width"]   # greedy: the seed draws nothing
    assert resp.json()["lance"] == {"task": "chat", "ignored_params": ignored}
    assert resp.headers["x-lance-ignored-params"] == ", ".join(ignored)
    with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["x-lance-ignored-params"] == ", ".join(ignored)
        events = sse_events(streamed)
    assert events[0]["lance"] == {"task": "chat", "ignored_params": ignored}
    nothing_ignored = http.post("/v1/chat/completions", json=t2i_body(seed=3, **SMALL))
    assert nothing_ignored.json()["lance"] == {"task": "t2i", "ignored_params": []}
    assert "x-lance-ignored-params" not in nothing_ignored.headers


def test_a_bagel_glm_image_style_request(http, offline):
    """guidance_scale (their name for Lance's cfg_text_scale), a negative prompt, 1024x1024, 50 steps."""
    body = {"messages": [{"role": "user", "content": f"<|im_start|>{PROMPT}<|im_end|>"}], "modalities": ["image"],
            "guidance_scale": 5.0, "negative_prompt": "lowres, bad anatomy", "height": 1024, "width": 1024,
            "num_inference_steps": 50, "seed": 1234}
    with ThreadPoolExecutor(1) as pool:   # the server and the offline reference work side by side
        pending = pool.submit(http.post, "/v1/chat/completions", json=body)
        reference = offline.text_to_image(PROMPT, height=1024, width=1024, num_inference_steps=50, seed=1234,
                                          cfg_text_scale=5.0, negative_prompt="lowres, bad anatomy").image
        resp = pending.result()
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["lance"] == {"task": "t2i", "ignored_params": []}
    served = chat_image(resp.json())
    assert served.size == (1024, 1024)
    assert_pixels_close(served, reference, "BAGEL/GLM-Image-style request")


def test_openai_sdk_extra_body_with_ecosystem_names(client, offline):
    """extra_body with guidance_scale and num_outputs_per_prompt (vLLM-Omni's names): two images,
    seeds seed and seed+1; a knob for edits only (resolution) is reported as ignored."""
    raw = client.chat.completions.with_raw_response.create(
        model="lance-tiny-random", messages=[{"role": "user", "content": PROMPT}],
        extra_body={"modalities": ["image"], "guidance_scale": 2.0, "num_outputs_per_prompt": 2,
                    "size": "64x64", "num_inference_steps": 3, "seed": 12, "resolution": "image_256res"})
    assert raw.headers["x-lance-ignored-params"] == "resolution"
    resp = raw.parse()
    assert resp.model_extra["lance"] == {"task": "t2i", "ignored_params": ["resolution"]}
    assert [c.index for c in resp.choices] == [0, 1]
    for i, choice in enumerate(resp.choices):
        reference = offline.text_to_image(PROMPT, height=64, width=64, num_inference_steps=3, seed=12 + i,
                                          cfg_text_scale=2.0).image
        assert_pixels_close(image_from_data_url(choice.message.content[0]["image_url"]["url"]), reference,
                            f"SDK extra_body choice {i}")
    assert_knobs_matter(reference, offline.text_to_image(PROMPT, height=64, width=64, num_inference_steps=3,
                                                         seed=13).image, "guidance_scale")


def test_images_api_with_guidance_scale(client, offline):
    raw = client.images.with_raw_response.generate(
        model="lance-tiny-random", prompt=PROMPT, size="64x64", quality="hd",
        extra_body={"guidance_scale": 2.0, "num_inference_steps": 3, "seed": 40})
    assert raw.headers["x-lance-ignored-params"] == "quality"
    result = raw.parse()
    served = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB")
    reference = offline.text_to_image(PROMPT, height=64, width=64, num_inference_steps=3, seed=40,
                                      cfg_text_scale=2.0).image
    assert_pixels_close(served, reference, "images API guidance_scale")
    assert_knobs_matter(reference, offline.text_to_image(PROMPT, height=64, width=64, num_inference_steps=3,
                                                         seed=40).image, "images guidance_scale")


def test_a_vllm_style_vision_request(client, offline):
    """As vLLM's docs send image understanding: a string system message, image_url with detail,
    max_completion_tokens; the answer is the offline pipeline's greedy answer."""
    image, question, system = input_image(100, 140), "What color is the square?", "You are a careful observer."
    resp = client.chat.completions.create(
        model="lance-tiny-random", max_completion_tokens=10, temperature=0,
        messages=[{"role": "system", "content": system},
                  {"role": "user", "content": [
                      {"type": "text", "text": question},
                      {"type": "image_url", "image_url": {"url": data_url(png_bytes(image)), "detail": "high"}}]}],
        extra_body={"return_token_ids": True})
    reference = offline.image_to_text(image, question, system_prompt=system, max_new_tokens=10)
    assert len(reference.token_ids) >= 2
    assert resp.choices[0].model_extra["token_ids"] == reference.token_ids
    assert resp.choices[0].message.content == reference.text
    assert resp.model_extra["lance"] == {"task": "x2t_image", "ignored_params": []}


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
    "guidance_names_disagree": (t2i_body(guidance_scale=5.0, cfg_text_scale=4.0), 400, "conflicting_values"),
    "invalid_size_on_a_text_answer": ({"messages": [{"role": "user", "content": "hi"}], "height": 100,
                                       "width": 512}, 400, "invalid_size"),
    "unsupported_sampling_field": ({"messages": [{"role": "user", "content": "hi"}], "top_k": 40}, 400,
                                   "unsupported_parameter"),
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
        for name in re.findall(r"[\w-]+\.mp4", code):   # and every MP4 plays (PyAV decodes it)
            import av
            with av.open(str(tmp_path / name)) as container:
                assert sum(1 for _ in container.decode(video=0)) >= 1, name
        # an answer the README quotes as a `# {...}` comment is exactly what the server sent
        for quoted in re.findall(r"^# (\{.*\})$", code, re.M):
            assert quoted in proc.stdout, f"README example #{i} quotes {quoted}, got:\n{proc.stdout}"
