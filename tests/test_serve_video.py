"""End to end, videos: the session's one `serve run configs/lance_2stage.yaml` (tests/serve_server.py),
which on this CPU machine serves the tiny checkpoint with both variants (the cpu graph: image tasks on
Lance_3B, video tasks on Lance_3B_Video), over real HTTP (httpx and the OpenAI SDK, unchanged).

Every video task, through chat completions and through /v1/videos, equals the offline pipeline on the
same checkpoint: the lossless output (`lossless: true`, H.264 RGB at qp 0) decodes with PyAV to the
offline frames within +-1, the default MP4 decodes to the requested frame count, size and fps, and
x2t_video's token ids equal the offline greedy ids. The Videos API's jobs run in the store actor,
outside the ingress: they survive a restart of the ingress replica, are deleted at expires_at, and a
full store is a 429. Sizes, frame counts and steps are small: the tiny model on 2 CPUs.
"""
from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ray_driver import RayDriver
from serve_server import REQUEST_TIMEOUT_S, Server

pytestmark = pytest.mark.heavy   # `serve run` of the whole app

PROMPT = "A red cube rolls across a blue table"
# small and fast on the tiny model: 9 frames (3 latent frames) of 64x96, 2 steps
SMALL = {"num_frames": 9, "size": "96x64", "num_inference_steps": 2, "seed": 7}
VIDEO_VARIANT = "Lance_3B_Video"


@pytest.fixture(scope="module")
def offline(http):
    """The offline reference on the video checkpoint the server serves (fp32, CPU)."""
    from stages.lance import LancePipeline

    root = http.get("/v1/models").json()["data"][0]["root"]
    return LancePipeline.from_pretrained(root, variant=VIDEO_VARIANT)


@pytest.fixture(scope="module")
def cluster(server: Server):
    """A driver joined to the server's Ray cluster (the stages, the store actor, replica kills)."""
    driver = RayDriver(server.ray_address(), server.home)
    try:
        yield driver
    finally:
        driver.close()


# -- helpers ------------------------------------------------------------------------------------------

def clip_mp4(frames: int = 17, fps: float = 24.0, width: int = 96, height: int = 64) -> bytes:
    """A deterministic input video with motion (a square moving over gradients), lossless."""
    from stages.dit.video import encode_mp4
    from stages.lance.requests import VideoEncoding

    y, x = np.mgrid[0:height, 0:width]
    out = []
    for i in range(frames):
        f = np.stack([(x * 255 // width), (y * 255 // height), np.full_like(x, 40)], -1)
        f[10:30, 5 + 3 * i: 25 + 3 * i] = (250, 240, 10)
        out.append(f.astype(np.uint8))
    return encode_mp4(np.stack(out), VideoEncoding(fps=fps, lossless=True))


def input_image(width: int = 120, height: int = 90) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // width), (y * 255 // height), np.full_like(x, 128)], -1)
    rgb[20:50, 30:70] = (255, 220, 0)
    return Image.fromarray(rgb.astype(np.uint8))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    """(frames uint8 [T, H, W, 3], fps) with PyAV: what a player sees."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return frames, fps


def assert_frames_close(served: np.ndarray, reference: np.ndarray, what: str) -> None:
    a, b = served.astype(np.int16), np.asarray(reference).astype(np.int16)
    assert a.shape == b.shape, f"{what}: served {a.shape} vs offline {b.shape}"
    diff = np.abs(a - b)
    assert diff.max() <= 1, f"{what}: max diff {diff.max()} ({(diff > 1).sum()} values > 1)"


def video_part(body: dict) -> bytes:
    content = body["choices"][0]["message"]["content"]
    assert isinstance(content, list) and content[0]["type"] == "video_url", content
    url = content[0]["video_url"]["url"]
    assert url.startswith("data:video/mp4;base64,"), url[:40]
    return base64.b64decode(url.split(",", 1)[1])


def chat_video(http, parts: list, **knobs) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}, *parts]}],
            "modalities": ["video"], **knobs}
    return http.post("/v1/chat/completions", json=body)


def wait_for(http, video_id: str, timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = http.get(f"/v1/videos/{video_id}").json()
        if job["status"] in ("completed", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def offline_kw() -> dict:
    return {"num_inference_steps": SMALL["num_inference_steps"], "seed": SMALL["seed"]}


# -- the server serves both variants ------------------------------------------------------------------

def test_both_variants_and_every_task_are_served(http, server):
    info = http.get("/v1/models").json()["data"][0]
    assert info["lance"]["variants"] == ["Lance_3B", VIDEO_VARIANT]
    assert set(info["lance"]["tasks"]) >= {"t2i", "image_edit", "x2t_image", "chat", "t2v", "i2v",
                                          "video_edit", "x2t_video"}
    assert info["lance"]["defaults"]["video_size"] == "848x480"
    tiny = server.home / ".cache" / "lance-serve" / "tiny"
    assert (tiny / VIDEO_VARIANT / "model.safetensors").is_file()


# -- chat completions ---------------------------------------------------------------------------------

def test_chat_t2v_lossless_equals_offline(http, offline):
    resp = chat_video(http, [], lossless=True, **SMALL)
    assert resp.status_code == 200, resp.text[:500]
    body = resp.json()
    assert body["lance"]["task"] == "t2v" and body["lance"]["num_frames"] == 9
    frames, fps = decode_mp4(video_part(body))
    ref = offline.text_to_video(PROMPT, num_frames=9, height=64, width=96, **offline_kw())
    assert_frames_close(frames, ref.frames, "t2v")
    assert fps == 12


def test_chat_t2v_default_mp4_has_the_asked_frames_size_and_fps(http):
    resp = chat_video(http, [], fps=24, **SMALL)
    assert resp.status_code == 200, resp.text[:500]
    frames, fps = decode_mp4(video_part(resp.json()))
    assert frames.shape == (9, 64, 96, 3) and fps == 24


def test_chat_i2v_lossless_equals_offline(http, offline):
    image = input_image()
    resp = chat_video(http, [{"type": "image_url", "image_url": {"url": data_url(png(image), "image/png")}}],
                      lossless=True, resolution="video_192p", num_frames=5,
                      num_inference_steps=2, seed=7)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["lance"]["task"] == "i2v"
    frames, _ = decode_mp4(video_part(resp.json()))
    ref = offline.image_to_video(image, PROMPT, num_frames=5, resolution="video_192p", **offline_kw())
    assert_frames_close(frames, ref.frames, "i2v")


def test_chat_video_edit_lossless_equals_offline(http, offline):
    clip = clip_mp4()
    resp = chat_video(http, [{"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}}],
                      lossless=True, resolution="video_192p", num_inference_steps=2, seed=7)
    assert resp.status_code == 200, resp.text[:500]
    body = resp.json()
    assert body["lance"]["task"] == "video_edit"
    frames, _ = decode_mp4(video_part(body))
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(clip)
        f.flush()
        ref = offline.edit_video(f.name, PROMPT, resolution="video_192p", **offline_kw())
    assert_frames_close(frames, ref.frames, "video_edit")


def test_chat_x2t_video_ids_equal_offline(http, offline):
    clip = clip_mp4()
    body = {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}},
        {"type": "text", "text": "What moves?"}]}],
        "max_tokens": 8, "return_token_ids": True, "resolution": "video_192p"}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text[:500]
    out = resp.json()
    assert out["lance"]["task"] == "x2t_video"
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(clip)
        f.flush()
        ref = offline.video_to_text(f.name, "What moves?", resolution="video_192p", max_new_tokens=8)
    assert out["choices"][0]["token_ids"] == list(ref.token_ids)


def test_chat_t2v_stream_reports_denoise_decode_and_encode(http):
    body = {"messages": [{"role": "user", "content": PROMPT}], "modalities": ["video"],
            "stream": True, **SMALL}
    stages, video = set(), None
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("lance_progress"):
                stages.add(chunk["lance_progress"]["stage"])
            content = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if isinstance(content, list):
                video = base64.b64decode(content[0]["video_url"]["url"].split(",", 1)[1])
    assert stages == {"denoise", "decode", "encode"}
    assert decode_mp4(video)[0].shape[0] == 9


@pytest.mark.parametrize("knobs, param", [({"num_frames": 10}, "num_frames"),
                                          ({"num_frames": 125}, "num_frames"),
                                          ({"fps": 0}, "fps"),
                                          ({"size": "100x64"}, "width")])
def test_invalid_video_knobs_are_400s_naming_the_range(http, knobs, param):
    resp = chat_video(http, [], **{**SMALL, **knobs})
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json()["error"]["param"] == param


def test_video_knobs_on_an_image_request_are_ignored_and_reported(http):
    body = {"messages": [{"role": "user", "content": PROMPT}], "modalities": ["image"],
            "size": "64x64", "num_inference_steps": 1, "num_frames": 9, "fps": 24}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text[:300]
    assert set(resp.json()["lance"]["ignored_params"]) >= {"num_frames", "fps"}


def test_health_answers_during_a_video_encode(http, server):
    """Encoding runs on the DiT's encoder thread and base64 on a worker thread: the ingress answers."""
    with httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S) as other:
        job = other.post("/v1/videos", json={"prompt": PROMPT, **SMALL, "num_frames": 17,
                                             "num_inference_steps": 8}).json()
        seen_busy = False
        while (state := http.get(f"/v1/videos/{job['id']}").json())["status"] not in ("completed", "failed"):
            t0 = time.monotonic()
            assert http.get("/health", timeout=10).status_code == 200
            assert time.monotonic() - t0 < 5
            seen_busy |= state["status"] == "in_progress"
            time.sleep(0.2)
        assert state["status"] == "completed", state
        assert seen_busy


# -- /v1/videos -----------------------------------------------------------------------------------------

def test_sdk_create_and_poll_download_content_plays(client, offline):
    video = client.videos.create_and_poll(prompt=PROMPT, seconds="4", size="96x64",
                                          extra_body={"num_inference_steps": 2, "seed": 7,
                                                      "lossless": True})
    assert video.status == "completed" and video.progress == 100, video
    assert video.seconds == "4" and video.size == "96x64"
    data = client.videos.download_content(video.id).read()
    frames, fps = decode_mp4(data)
    ref = offline.text_to_video(PROMPT, num_frames=49, height=64, width=96, **offline_kw())
    assert_frames_close(frames, ref.frames, "t2v via /v1/videos")
    thumb = client.videos.download_content(video.id, variant="thumbnail").read()
    assert Image.open(io.BytesIO(thumb)).size == (96, 64)


def test_videos_json_i2v_and_default_mp4(http):
    ref = {"image_url": data_url(png(input_image()), "image/png")}
    resp = http.post("/v1/videos", json={"prompt": PROMPT, "input_reference": ref, "num_frames": 5,
                                         "resolution": "video_192p", "num_inference_steps": 2})
    assert resp.status_code == 200, resp.text[:300]
    job = wait_for(http, resp.json()["id"])
    assert job["status"] == "completed" and job["lance"]["task"] == "i2v", job
    content = http.get(f"/v1/videos/{job['id']}/content")
    assert content.headers["content-type"] == "video/mp4"
    frames, fps = decode_mp4(content.content)
    assert frames.shape[0] == 5 and fps == 12
    assert f"{frames.shape[2]}x{frames.shape[1]}" == job["size"]


def test_sdk_remix_is_a_video_edit_of_the_stored_video(client):
    first = client.videos.create_and_poll(prompt=PROMPT, seconds="0", size="96x64",
                                          extra_body={"num_inference_steps": 1})
    remixed = client.videos.remix(first.id, prompt="Make it green",
                                  extra_body={"num_inference_steps": 1, "resolution": "video_192p"})
    assert remixed.remixed_from_video_id == first.id
    done = client.videos.poll(remixed.id)
    assert done.status == "completed", done
    assert decode_mp4(client.videos.download_content(done.id).read())[0].shape[0] >= 1


def test_sdk_list_pages_and_delete(client, http):
    ids = [http.post("/v1/videos", json={"prompt": f"{PROMPT} {i}", "num_frames": 1, "size": "64x64",
                                         "num_inference_steps": 1}).json()["id"] for i in range(3)]
    for video_id in ids:
        wait_for(http, video_id)
    page = client.videos.list(limit=2, order="asc")
    assert len(page.data) == 2 and page.has_more
    listed = [v.id for v in client.videos.list(limit=2, order="asc")]   # the SDK follows `after`
    assert all(v in listed for v in ids)
    for video_id in ids:
        deleted = client.videos.delete(video_id)
        assert deleted.deleted and deleted.id == video_id
    assert http.get(f"/v1/videos/{ids[0]}").status_code == 404


def test_delete_of_a_running_job_frees_the_dit(http, cluster):
    dit, thinker = f"DiTStage_{VIDEO_VARIANT}", f"ThinkerStage_{VIDEO_VARIANT}"
    job = http.post("/v1/videos", json={"prompt": PROMPT, "num_frames": 9, "size": "96x64",
                                        "num_inference_steps": 200}).json()
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    # "in_progress" starts at the thinker: wait until the job is the DiT's
    while cluster.call(dit, "num_jobs") != 1:
        assert http.get(f"/v1/videos/{job['id']}").json()["status"] in ("queued", "in_progress")
        assert time.monotonic() < deadline, "the job never reached the DiT"
        time.sleep(0.1)
    assert http.delete(f"/v1/videos/{job['id']}").json()["deleted"] is True
    while cluster.call(dit, "num_jobs") != 0:
        assert time.monotonic() < deadline, "the DiT still holds the deleted job"
        time.sleep(0.2)
    while cluster.call(thinker, "engine_stats")["pending_exports"]:
        assert time.monotonic() < deadline, "the thinker still parks the deleted job's KV exports"
        time.sleep(0.2)
    assert http.get(f"/v1/videos/{job['id']}/content").status_code == 404


def test_a_job_survives_a_restart_of_the_ingress_replica(http, cluster):
    job = http.post("/v1/videos", json={"prompt": PROMPT, "num_frames": 5, "size": "64x64",
                                        "num_inference_steps": 4}).json()
    cluster.kill_replica("LanceIngress")
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while True:   # Serve starts a new ingress replica
        try:
            if http.get("/health", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(1)
    done = wait_for(http, job["id"])
    assert done["status"] == "completed", done
    assert http.get(f"/v1/videos/{job['id']}/content").status_code == 200


def test_expired_content_is_gone(http, cluster):
    job = http.post("/v1/videos", json={"prompt": PROMPT, "num_frames": 1, "size": "64x64",
                                        "num_inference_steps": 1}).json()
    assert job["expires_at"] - job["created_at"] == 3600   # the default ttl
    assert wait_for(http, job["id"])["status"] == "completed"
    # as if an hour had passed
    assert cluster.call_actor("lance-video-jobs-lance", "lance-serve", "expire_now", job["id"])
    assert http.get(f"/v1/videos/{job['id']}").status_code == 404
    assert http.get(f"/v1/videos/{job['id']}/content").status_code == 404


def test_videos_errors(http):
    assert http.post("/v1/videos", json={"prompt": PROMPT, "seconds": "12"}).status_code == 400
    r = http.post("/v1/videos", json={"prompt": PROMPT, "seconds": "4", "num_frames": 9})
    assert r.status_code == 400 and r.json()["error"]["code"] == "conflicting_values"
    r = http.post("/v1/videos", json={"prompt": PROMPT, "input_reference": {"file_id": "file_1"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference.file_id"
    assert http.get("/v1/videos/video_nope").status_code == 404
    assert http.get("/v1/videos/video_nope/content").status_code == 404
    r = http.get("/v1/videos?order=sideways")
    assert r.status_code == 400 and r.json()["error"]["param"] == "order"
