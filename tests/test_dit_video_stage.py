"""The DiT stage's video output: golden video hand-offs in, MP4 files out (CPU, fp32, Lance_3B_Video).

`DiTStage` runs as the deployment's own class on an asyncio loop (the code a replica runs). Videos
stream progress of denoise, decode and encode, then the MP4; the lossless encoding decodes (PyAV) to
upstream's frames within +-1, the default H.264 to the right frame count, size and frame rate.
"""
from __future__ import annotations

import asyncio
import io

import av
import numpy as np
import pytest
import torch

from helpers import golden_handoff, golden_video_params
from stages.dit.engine import DiTRequestError
from stages.dit.stage import DiTStage
from stages.lance.requests import VideoEncoding


@pytest.fixture(scope="module")
def stage(tiny_ckpt_dir):
    return DiTStage.func_or_class(str(tiny_ckpt_dir), engine_args={"dtype": "float32", "device": "cpu"},
                                  variant="Lance_3B_Video", max_batch_size=4, batch_wait_timeout_s=0.01)


def video_handoff(golden, case, request_id=None):
    g = golden(case)
    return golden_handoff(g, case, golden_video_params(g), request_id=request_id)


async def collect(agen, stop_after=None):
    events = []
    try:
        async for ev in agen:
            events.append(ev)
            if stop_after is not None and stop_after(ev):
                break
    finally:
        await agen.aclose()
    return events


def read_mp4(data: bytes):
    """(frames uint8 [T, H, W, 3], fps, codec name) as PyAV decodes the file."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return torch.from_numpy(frames), float(stream.average_rate), stream.codec_context.name


@pytest.mark.slow
def test_lossless_mp4_holds_upstreams_frames_and_progress_covers_all_phases(stage, golden, assert_golden):
    g = golden("t2v")
    events = asyncio.run(collect(stage.generate_video(video_handoff(golden, "t2v"), VideoEncoding(lossless=True))))
    final = events[-1]
    t = g["final_latent"].shape[0]
    steps = g["dts"].numel()
    progress = [(e["stage"], e["step"], e["total"]) for e in events[:-1]]
    assert [p for p in progress if p[0] == "denoise"] == [("denoise", i + 1, steps) for i in range(steps)]
    for phase in ("decode", "encode"):
        assert [p for p in progress if p[0] == phase] == [(phase, i + 1, t) for i in range(t)]
    assert progress.index(("decode", 1, t)) > progress.index(("denoise", steps, steps))
    assert progress.index(("encode", 1, t)) > progress.index(("decode", 1, t))
    frames, fps, codec = read_mp4(final["video"])
    assert (final["format"], final["media_type"], codec, fps, final["fps"]) == ("mp4", "video/mp4", "h264", 12.0, 12.0)
    assert (final["num_frames"], final["height"], final["width"]) == tuple(g["video_uint8"].shape[:3])
    assert_golden(frames, g["video_uint8"], "video_uint8 through lossless MP4")


@pytest.mark.slow
def test_default_mp4_and_an_image_concurrently(stage, golden):
    """i2v and video_edit as default H.264 at another fps, beside an image request on the same replica."""
    t2v = golden("t2v")
    from helpers import synthetic_handoff
    from stages.lance.requests import DenoiseParams

    image = synthetic_handoff(t2v, "img", (1, 4, 6), DenoiseParams(num_inference_steps=5, seed=3), cond_len=40,
                              uncond_len=30)

    async def main():
        return await asyncio.gather(
            collect(stage.generate_video(video_handoff(golden, "i2v", "i2v"))),
            collect(stage.generate_video(video_handoff(golden, "video_edit", "edit"), VideoEncoding(fps=24, crf=23))),
            collect(stage.generate_image(image)))

    i2v, edit, img = asyncio.run(main())
    for events, case, want_fps in ((i2v, "i2v", 12.0), (edit, "video_edit", 24.0)):
        frames, fps, codec = read_mp4(events[-1]["video"])
        want = golden(case)["video_uint8"]
        # (the tiny random model's frames are pixel noise, which lossy 4:2:0 H.264 does not keep: the
        # encoder's fidelity is checked on real-looking content in test_mp4_encoder_*)
        assert frames.shape == want.shape and fps == want_fps and codec == "h264"
    assert "image" in img[-1] and img[-1]["width"] == 96


def test_cancelled_video_leaves_the_runner(stage, golden):
    async def main():
        events = await collect(stage.generate_video(video_handoff(golden, "t2v", "gone")),
                               stop_after=lambda e: e.get("stage") == "decode")
        for _ in range(200):
            if not stage.runner.has_work:
                break
            await asyncio.sleep(0.01)
        return events

    events = asyncio.run(main())
    assert events[-1]["stage"] == "decode"
    assert not stage.runner.has_work and not stage.runner.decoding


def test_image_handoff_to_generate_video_is_a_400(stage, golden):
    from helpers import synthetic_handoff
    from stages.lance.requests import DenoiseParams

    h = synthetic_handoff(golden("t2v"), "img", (1, 4, 6), DenoiseParams(num_inference_steps=2), 40, None)
    with pytest.raises(DiTRequestError) as e:
        asyncio.run(collect(stage.generate_video(h)))
    assert e.value.http_status == 400 and e.value.param == "task"


# --- the encoder alone ---------------------------------------------------------------------------------

def smooth_clip(frames=9, height=64, width=96) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x * 2 + t * 8) % 256, (y * 3) % 256, np.full_like(x, 128 + t * 5)], -1)
                     for t in range(frames)]).astype(np.uint8)


@pytest.mark.parametrize("encoding", [VideoEncoding(), VideoEncoding(fps=23.976, crf=28, preset="veryfast"),
                                      VideoEncoding(lossless=True, fps=30)])
def test_mp4_encoder_round_trips_through_pyav(encoding):
    from stages.dit.video import Mp4Encoder

    clip = smooth_clip()
    encoder = Mp4Encoder(96, 64, encoding)
    encoder.write(clip[:1])         # chunked as the decoder delivers: 1 frame, then 4 per latent frame
    encoder.write(clip[1:5])
    encoder.write(torch.from_numpy(clip[5:]))
    data = encoder.finish()
    frames, fps, codec = read_mp4(data)
    assert frames.shape == clip.shape and codec == "h264"
    assert abs(fps - encoding.fps) < 1e-3
    err = (frames.float() - torch.from_numpy(clip).float()).abs()
    if encoding.lossless:
        assert err.max() == 0
    else:
        assert err.mean() < 3, err.mean()
    with av.open(io.BytesIO(data)) as c:   # the index is in front of the media data (faststart)
        assert data.find(b"moov") < data.find(b"mdat")
        assert abs(float(c.streams.video[0].duration * c.streams.video[0].time_base) - 9 / encoding.fps) < 1e-3


def test_mp4_encoder_rejects_bad_input():
    from stages.dit.video import Mp4Encoder

    with pytest.raises(ValueError, match="even"):
        Mp4Encoder(95, 64)
    encoder = Mp4Encoder(96, 64)
    with pytest.raises(ValueError, match=r"frames must be \[f, 64, 96, 3\]"):
        encoder.write(np.zeros((2, 64, 94, 3), np.uint8))
    encoder.abort()
    for fps in (0, 5e-324, 0.0009):   # below 1/1000 the writer's rate (denominator <= 1001) would be 0
        with pytest.raises(ValueError, match="fps"):
            VideoEncoding(fps=fps)
    Mp4Encoder(96, 64, VideoEncoding(fps=0.001)).abort()   # the slowest rate it takes
    with pytest.raises(ValueError, match="crf"):
        VideoEncoding(crf=60)
