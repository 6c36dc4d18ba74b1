"""Videos over HTTP without a server: routing and knobs of video requests, the Videos API's fields,
which checkpoint variant does a task, and the job store's bookkeeping (limits, paging, expiry).

The store is the real `VideoJobStore` class run in-process on an event loop, with no stages
connected: its jobs fail at once with the pipeline's "not connected" error, which is all the
bookkeeping needs. The stages themselves are exercised end to end in tests/test_serve_video.py.
"""
from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from serve_app.errors import OpenAIError
from serve_app.knobs import RequestLimits
from serve_app.request_parsing import parse_chat_request
from serve_app.variants import variant_for_task
from serve_app.video_jobs import VideoJobStore, VideoStoreLimits
from serve_app.videos_api import frames_of_seconds, parse_video_create, validated_create
from stages.lance.requests import VideoRequest

LIMITS = RequestLimits()


def mp4(frames: int = 25, fps: float = 24.0) -> bytes:
    from stages.dit.video import encode_mp4
    from stages.lance.requests import VideoEncoding

    rng = np.random.default_rng(0)
    return encode_mp4(rng.integers(0, 255, (frames, 64, 96, 3), dtype=np.uint8),
                      VideoEncoding(fps=fps))


def video_url(raw: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(raw).decode()


def chat(*parts, **fields) -> bytes:
    content = [{"type": "text", "text": "a cat"}, *parts]
    return json.dumps({"messages": [{"role": "user", "content": content}], **fields}).encode()


def parse(raw: bytes):
    return asyncio.run(parse_chat_request(raw, LIMITS))


def error_of(raw: bytes) -> dict:
    with pytest.raises(OpenAIError) as e:
        parse(raw)
    return e.value.body()["error"]


# -- routing and knobs ----------------------------------------------------------------------------------

def test_modalities_video_routes_t2v_i2v_video_edit_and_text_with_a_video_is_x2t_video():
    from PIL import Image
    import io
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, format="PNG")
    image = {"type": "image_url",
             "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}
    video = {"type": "video_url", "video_url": {"url": video_url(mp4())}}
    assert parse(chat(modalities=["video"])).task == "t2v"
    assert parse(chat(image, modalities=["video"])).task == "i2v"
    assert parse(chat(video, modalities=["video"])).task == "video_edit"
    assert parse(chat(video)).task == "x2t_video"
    assert error_of(chat(image, video, modalities=["video"]))["code"] == "too_many_inputs"
    assert error_of(chat(video, modalities=["image"]))["param"] == "modalities"


def test_t2v_defaults_are_upstreams_and_knobs_reach_the_request():
    req = parse(chat(modalities=["video"])).request
    assert isinstance(req, VideoRequest)
    assert (req.num_frames, req.height, req.width, req.encoding.fps) == (121, 480, 848, 12.0)
    req = parse(chat(modalities=["video"], num_frames=33, size="320x192", fps=24, lossless=True,
                     num_inference_steps=3, seed=5)).request
    assert (req.num_frames, req.height, req.width) == (33, 192, 320)
    assert req.encoding.fps == 24 and req.encoding.lossless
    assert (req.params.num_inference_steps, req.params.seed) == (3, 5)


def test_an_input_video_is_sampled_as_upstream():
    from stages.lance.video_io import video_frame_indices
    req = parse(chat({"type": "video_url", "video_url": {"url": video_url(mp4(25, 24.0))}},
                     modalities=["video"])).request
    assert req.video.frames.shape == (len(video_frame_indices(25, 24.0)), 64, 96, 3)
    assert req.video.fps == 12


@pytest.mark.parametrize("knobs, param", [({"num_frames": 8}, "num_frames"),
                                          ({"num_frames": 125}, "num_frames"),
                                          ({"num_frames": 0}, "num_frames"),
                                          ({"fps": 0}, "fps"), ({"fps": 500}, "fps"),
                                          # below what the MP4 writer's rate can express (was a 500)
                                          ({"fps": 5e-324}, "fps"), ({"fps": 0.0009}, "fps"),
                                          ({"size": "1280x720"}, "width"),
                                          ({"n": 2}, "n")])
def test_invalid_video_knobs_are_400s_that_name_the_field(knobs, param):
    err = error_of(chat(modalities=["video"], **knobs))
    assert err["param"] == param, err


def test_a_resolution_of_the_other_family_is_a_400_where_it_applies():
    video = {"type": "video_url", "video_url": {"url": video_url(mp4())}}
    err = error_of(chat(video, modalities=["video"], resolution="image_512res"))
    assert err["param"] == "resolution" and "video_480p" in err["message"]
    assert "resolution" in parse(chat(modalities=["video"], resolution="image_512res")).ignored_params


def test_num_frames_error_says_the_allowed_values():
    assert "1, 5, 9, ..., 121" in error_of(chat(modalities=["video"], num_frames=10))["message"]


def test_knobs_of_other_tasks_are_ignored_and_reported():
    parsed = parse(chat(modalities=["image"], num_frames=9, fps=24, lossless=True))
    assert {"num_frames", "fps", "lossless"} <= set(parsed.ignored_params)
    video = {"type": "video_url", "video_url": {"url": video_url(mp4())}}
    parsed = parse(chat(video, modalities=["video"], num_frames=9, size="96x64"))
    assert {"num_frames", "size"} <= set(parsed.ignored_params)   # an edit keeps its input's
    parsed = parse(chat(video, max_tokens=4, fps=24))
    assert "fps" in parsed.ignored_params


def test_broken_and_remote_videos_are_400s():
    bad = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    assert error_of(chat(bad))["code"] == "invalid_video"
    remote = {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}
    assert error_of(chat(remote))["code"] == "remote_media_disabled"
    image_as_video = {"type": "video_url", "video_url": {"url": "data:image/png;base64,AAAA"}}
    assert error_of(chat(image_as_video))["code"] == "invalid_video_url"


# -- the Videos API's fields ----------------------------------------------------------------------------

def test_seconds_are_12_frames_a_second_plus_one():
    assert frames_of_seconds("4", LIMITS) == 49
    assert frames_of_seconds(10, LIMITS) == 121
    assert frames_of_seconds("0", LIMITS) == 1
    for bad in ("12", "0.5", "-1", "four"):
        with pytest.raises(OpenAIError) as e:
            frames_of_seconds(bad, LIMITS)
        assert e.value.param == "seconds"


def test_videos_create_reads_knobs_top_level_extra_body_and_from_forms():
    parsed = parse_video_create(validated_create({"prompt": "a cat", "seconds": "4", "size": "96x64",
                                                  "extra_body": {"num_inference_steps": 2}}),
                                None, None, LIMITS, from_form=False)
    req = parsed.request
    assert (parsed.task, req.num_frames, req.width, req.height) == ("t2v", 49, 96, 64)
    assert req.params.num_inference_steps == 2 and (parsed.size, parsed.seconds) == ("96x64", "4")
    # multipart: every value a string, as the OpenAI SDK sends them
    parsed = parse_video_create(validated_create({"prompt": "a cat", "seconds": "0",
                                                  "num_inference_steps": "3", "lossless": "true"}),
                                None, None, LIMITS, from_form=True)
    assert parsed.request.params.num_inference_steps == 3 and parsed.request.encoding.lossless


# -- variants ----------------------------------------------------------------------------------------

def test_tasks_go_to_their_checkpoint_variant():
    both = ("Lance_3B", "Lance_3B_Video")
    assert variant_for_task("t2i", both) == "Lance_3B"
    assert variant_for_task("t2v", both) == "Lance_3B_Video"
    assert variant_for_task("chat", ("Lance_3B_Video",)) == "Lance_3B_Video"   # video-only: all
    with pytest.raises(OpenAIError) as e:
        variant_for_task("i2v", ("Lance_3B",), "single_gpu")
    assert e.value.status == 400 and "single_gpu_video" in e.value.message


# -- the job store's bookkeeping ---------------------------------------------------------------------

def _run_store(coro_fn):
    async def main():
        store = VideoJobStore(VideoStoreLimits(max_jobs=3, max_bytes=1000, ttl_s=60))
        await store.attach({"Lance_3B_Video": (None, None)})   # no stages: jobs fail at once
        try:
            return await coro_fn(store)
        finally:
            store._sweeper.cancel()
    return asyncio.run(main())


def _create(store, prompt="a cat"):
    return store.create(VideoRequest(task="t2v", prompt=prompt, num_frames=5, height=64, width=64),
                        "Lance_3B_Video", "m", "64x64", "0.33", {"task": "t2v", "ignored_params": []})


def test_store_limits_paging_delete_and_expiry():
    async def scenario(store):
        jobs = [await _create(store, f"p{i}") for i in range(3)]
        assert all(j["status"] == "queued" and j["object"] == "video" for j in jobs)
        full = await _create(store)
        assert full["http_status"] == 429 and full["error"]["code"] == "too_many_videos"
        await asyncio.sleep(0.05)   # the jobs run: with no stages they fail, with the reason
        failed = await store.get(jobs[0]["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "stage_unavailable"
        page = await store.list(None, 2, "asc")
        assert [v["id"] for v in page["data"]] == [jobs[0]["id"], jobs[1]["id"]] and page["has_more"]
        rest = await store.list(page["last_id"], 2, "asc")
        assert [v["id"] for v in rest["data"]] == [jobs[2]["id"]] and not rest["has_more"]
        assert (await store.list(None, 1, "desc"))["data"][0]["id"] == jobs[2]["id"]
        assert (await store.delete(jobs[0]["id"]))["deleted"] is True
        assert (await store.get(jobs[0]["id"]))["http_status"] == 404
        assert store.sweep(now=jobs[1]["expires_at"]) == [jobs[1]["id"], jobs[2]["id"]]
        assert (await store.content(jobs[1]["id"], "video"))["http_status"] == 404
        # finished videos fill the byte budget: a new job is a 503 until some are deleted
        job = await _create(store)
        store.jobs[job["id"]].content = b"x" * 1000
        assert (await _create(store))["http_status"] == 503
    _run_store(scenario)


# -- the routes without stages or store ------------------------------------------------------------

def _app(variants=("Lance_3B", "Lance_3B_Video")):
    from fastapi.testclient import TestClient

    from serve_app.ingress import IngressSettings, LanceService, build_fastapi_app
    settings = IngressSettings(served_model_name="lance-test", model_path="/m", variants=variants,
                               stage_graph="cpu")
    return TestClient(build_fastapi_app(LanceService(settings)), raise_server_exceptions=False)


def test_videos_routes_check_fields_before_the_store():
    client = _app()
    for body, param in [({"prompt": "x", "seconds": "12"}, "seconds"),
                        ({"prompt": "x", "num_frames": 6}, "num_frames"),
                        ({"prompt": "x", "input_reference": {"file_id": "f"}}, "input_reference.file_id"),
                        ({"prompt": "x", "modalities": ["text"]}, "modalities"),
                        ({"prompt": "x", "model": "other"}, "model")]:
        r = client.post("/v1/videos", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    assert client.get("/v1/videos?limit=0").json()["error"]["param"] == "limit"
    assert client.get("/v1/videos/v/content?variant=spritesheet").json()["error"]["param"] == "variant"
    r = client.post("/v1/videos", json={"prompt": "x", "seconds": "1"})   # valid: no store here
    assert r.status_code == 503 and r.json()["error"]["code"] == "video_store_unavailable"


def test_a_video_task_without_the_video_checkpoint_names_the_graphs_to_use():
    r = _app(("Lance_3B",)).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a cat"}], "modalities": ["video"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "task_not_served"
    assert "single_gpu_video" in r.json()["error"]["message"]
    models = _app().get("/v1/models").json()["data"][0]["lance"]
    assert {"t2v", "i2v", "video_edit", "x2t_video"} <= set(models["tasks"])
    assert "t2v" not in _app(("Lance_3B",)).get("/v1/models").json()["data"][0]["lance"]["tasks"]
