"""The DiT on videos (stages/dit): golden video contexts in, upstream's latents and frames out.

fp32 on CPU, Lance_3B_Video. The goldens' recorded context K/V and target positions of t2v, i2v and
video_edit are fed as the thinker's hand-off (with i2v's clean frame condition, and the seeded noise
drawn over all VAE tokens of the sample as upstream does); every step's latent and the final latent
must match upstream's within compare.py's default tolerance, alone and batched with an image request.
"""
from __future__ import annotations

import pytest
import torch

from helpers import drive_runner, golden_handoff, golden_video_params, synthetic_handoff
from stages.dit.engine import DenoiseEngine, DiTRequestError
from stages.dit.model import load_dit_model
from stages.lance.checkpoint import resolve_checkpoint
from stages.lance.requests import DenoiseParams

VIDEO_CASES = ["t2v", "i2v", "video_edit"]


@pytest.fixture(scope="module")
def video_dit(tiny_ckpt_dir):
    model, _ = load_dit_model(resolve_checkpoint(tiny_ckpt_dir, "Lance_3B_Video", need_vit=False, need_vae=False))
    return model


def job_for(engine, handoff):
    return engine.prepare(handoff, handoff.cond.kv, handoff.uncond.kv if handoff.uncond else None)


def video_handoff(golden, case, **kw):
    g = golden(case)
    return g, golden_handoff(g, case, golden_video_params(g), **kw)


def test_video_latent_positions_are_upstreams_3d_table(video_dit, golden, assert_golden):
    g = golden("t2v")
    rows = video_dit.latent_positions(tuple(g["final_latent"].shape[:3]))
    assert_golden(rows, g["latent_pos_embed_rows"], "latent_pos_embed_rows")


@pytest.mark.parametrize("forward", ["reference", "fast"])
@pytest.mark.parametrize("case", VIDEO_CASES)
def test_golden_video_context_gives_upstream_steps(video_dit, golden, assert_golden, case, forward):
    g, handoff = video_handoff(golden, case)
    engine = DenoiseEngine(video_dit, forward)
    job = job_for(engine, handoff)
    assert_golden(job.x, g["x_steps"][0], "x_steps[0]")   # the seeded draw (+ i2v's clean rows)
    seen = []
    job.on_step = lambda done, total: seen.append(job.x.clone())
    engine.run([job])
    steps = g["dts"].numel()
    assert len(seen) == steps
    for i in range(steps):
        assert_golden(seen[i], g["x_steps"][i + 1], f"x_steps[{i + 1}]")
    assert_golden(job.x.view(g["final_latent"].shape), g["final_latent"], "final_latent")
    if case == "i2v":   # the condition frame is never integrated
        assert torch.equal(job.x[:job.cond.clean_rows], g["x_steps"][0][:job.cond.clean_rows])
    assert engine.forwards_run == steps


def test_videos_batched_with_an_image_request_keep_their_latents(video_dit, golden, assert_golden):
    """t2v, i2v, video_edit and an image request in shared forwards: every video still gives upstream's
    final latent, the image request its own result alone."""
    t2v = golden("t2v")
    image = synthetic_handoff(t2v, "img", (1, 5, 7), DenoiseParams(num_inference_steps=9, seed=3), cond_len=40,
                              uncond_len=30)
    handoffs = [video_handoff(golden, c, request_id=c)[1] for c in VIDEO_CASES] + [image]
    alone = DenoiseEngine(video_dit, "fast").run([job_for(DenoiseEngine(video_dit, "fast"), image)])[0]
    engine = DenoiseEngine(video_dit, "fast")
    jobs = [job_for(engine, h) for h in handoffs]
    engine.run(jobs)
    for case, job in zip(VIDEO_CASES, jobs):
        want = golden(case)["final_latent"]
        assert_golden(job.x.view(want.shape), want, f"{case} final_latent")
    err = (jobs[-1].x - alone).abs().max().item()
    assert err <= 1e-6 + 1e-5 * alone.abs().max().item(), err
    assert max(max(j.forward_calls) for j in jobs) >= 7    # the four requests' rows shared forwards


def test_bad_frame_conditions_are_request_errors(video_dit, golden):
    g, handoff = video_handoff(golden, "i2v")
    engine = DenoiseEngine(video_dit, "fast")
    for bad in (torch.zeros(251, 48), torch.zeros(504, 48), torch.zeros(252, 47), torch.zeros(252)):
        handoff.condition_latents = bad
        with pytest.raises(DiTRequestError) as e:
            job_for(engine, handoff)
        assert e.value.param == "condition_latents" and e.value.http_status == 400


# --- the runner: decode to frames ------------------------------------------------------------------

@pytest.fixture(scope="module")
def video_runner(tiny_ckpt_dir):
    from stages.dit.runner import DiTRunner

    return DiTRunner(str(tiny_ckpt_dir), variant="Lance_3B_Video", dtype="float32", device="cpu")


@pytest.mark.slow
def test_runner_decodes_golden_videos_to_upstreams_frames(video_runner, golden, assert_golden):
    """t2v, i2v, video_edit and an image in one runner: final latents and decoded frames (+-1) are
    upstream's; the frames of a video arrive chunk by chunk (1 frame, then 4 per latent frame)."""
    t2v = golden("t2v")
    image = synthetic_handoff(t2v, "img", (1, 4, 6), DenoiseParams(num_inference_steps=6, seed=3), cond_len=40,
                              uncond_len=30)
    chunks = []
    sink = lambda done, total, frames: chunks.append((done, total, frames))   # noqa: E731
    handoffs = [video_handoff(golden, c, request_id=c)[1] for c in VIDEO_CASES] + [image]
    results = drive_runner(video_runner, handoffs, frame_sinks=[None, sink, None, None])
    for case, video in zip(VIDEO_CASES, results):
        g = golden(case)
        assert_golden(video.latents, g["final_latent"], f"{case} final_latent")
        if case == "i2v":   # streamed to the sink, not collected
            assert video.frames is None
            t = g["final_latent"].shape[0]
            assert [(d, n, f.shape[0]) for d, n, f in chunks] == [(i + 1, t, 1 if i == 0 else 4) for i in range(t)]
            assert_golden(torch.cat([f for _, _, f in chunks]), g["video_uint8"], "i2v streamed video_uint8")
        else:
            assert_golden(video.frames, g["video_uint8"], f"{case} video_uint8")
        assert (video.num_frames, video.height, video.width) == tuple(g["video_uint8"].shape[:3])
    assert results[-1].pixels.shape == (64, 96, 3)
