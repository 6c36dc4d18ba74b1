"""The DiT stage end to end on CPU fp32: golden hand-offs in, upstream's latents, images and PNGs out.

`DiTRunner` is the stage without Ray; `DiTStage` is exercised as the deployment's own class on an
asyncio loop (the code a replica runs: `DiTServingLoop`), including concurrent requests, progress,
cancellation, the requested image encodings and K/V fetched from Ray's object store.
"""
from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import drive_runner, golden_handoff
from stages.dit.engine import DiTRequestError
from stages.dit.runner import DiTRunner
from stages.dit.stage import DiTStage
from stages.dit.vae_decode import FrameDecoder
from stages.lance.handoff import BranchKV
from stages.lance.requests import DenoiseParams, ImageEncoding
from stages.lance.vae import LanceVAE


@pytest.fixture(scope="module")
def runner(tiny_ckpt_dir) -> DiTRunner:
    return DiTRunner(str(tiny_ckpt_dir), dtype="float32", device="cpu", debug_outputs=True)


@pytest.fixture(scope="module")
def stage(tiny_ckpt_dir):
    return DiTStage.func_or_class(str(tiny_ckpt_dir), engine_args={"dtype": "float32", "device": "cpu"},
                                  max_batch_size=4, batch_wait_timeout_s=0.01)


def png_pixels(png: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB")))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["t2i", "image_edit"])
def test_runner_reproduces_upstream_latent_and_image(runner, golden, assert_golden, case):
    g = golden(case)
    (img,) = drive_runner(runner, [golden_handoff(g, case)])
    assert_golden(img.latents, g["final_latent"], "final_latent")
    assert_golden(img.image[:, None], g["decoded_float"], "decoded_float")
    assert_golden(img.pixels, g["image_uint8"], "image_uint8")
    assert_golden(png_pixels(img.png), g["image_uint8"], "png")
    assert (img.height, img.width) == tuple(g["image_uint8"].shape[:2])


def test_runner_loads_no_vae_encoder(runner):
    assert runner.vae.has_decoder and not runner.vae.has_encoder
    mem = runner.memory()
    assert mem["dit_parameters"] > 0 and mem["vae_decoder_parameters"] > 0


def test_frame_decoder_equals_diffusers_decode(tiny_ckpt_dir):
    vae = LanceVAE.from_wan22_pth(tiny_ckpt_dir / "Wan2.2_VAE.pth", encoder=False)
    z = torch.randn(3, 48, 1, 5, 7, generator=torch.Generator().manual_seed(1))
    want = vae.decode(z)[:, :, 0]
    got = FrameDecoder(vae)(z)
    assert got.shape == (3, 3, 80, 112)
    assert (got - want).abs().max() < 1e-5


def test_frame_decoder_rejects_videos(tiny_ckpt_dir):
    vae = LanceVAE.from_wan22_pth(tiny_ckpt_dir / "Wan2.2_VAE.pth", encoder=False)
    with pytest.raises(ValueError, match="one latent frame"):
        FrameDecoder(vae)(torch.zeros(1, 48, 2, 4, 4))


# --- the deployment class -------------------------------------------------------------------------

async def collect(stage, handoff, stop_after: int | None = None, encoding=None):
    events = []
    gen = stage.generate_image(handoff, encoding)
    try:
        async for ev in gen:
            events.append(ev)
            if stop_after is not None and len(events) >= stop_after:
                break
    finally:
        await gen.aclose()
    return events


def test_stage_streams_progress_then_the_golden_png(stage, golden, assert_golden):
    g = golden("t2i")
    events = asyncio.run(collect(stage, golden_handoff(g, "t2i")))
    assert events[:-1] == [{"step": i, "total": 30} for i in range(1, 31)]
    final = events[-1]
    assert (final["format"], final["media_type"]) == ("png", "image/png")
    assert (final["width"], final["height"]) == (128, 128)
    assert_golden(png_pixels(final["image"]), g["image_uint8"], "png")


def test_runner_copies_only_pixels_unless_debug_outputs(tiny_ckpt_dir, runner, golden):
    lean = DiTRunner.from_loaded(runner.model, runner.config, runner.vae, compile=False)
    (img,) = drive_runner(lean, [golden_handoff(golden("t2i"), "t2i")])
    assert img.latents is None and img.image is None
    assert img.pixels.dtype == torch.uint8 and tuple(img.pixels.shape) == (128, 128, 3)


def test_check_health_fails_once_the_engine_loop_or_its_thread_is_gone(runner, golden):
    """What Serve's health check asks a DiT replica: healthy while its engine loop runs (and before
    the first request starts it); unhealthy once the loop task or the engine thread is gone, so
    that Serve replaces the replica."""
    from stages.dit.serving import DiTServingLoop

    handoff = golden_handoff(golden("t2i"), "t2i", DenoiseParams(num_inference_steps=2, seed=1))

    async def run(loop: DiTServingLoop):
        loop.check_health()
        events = [e async for e in loop.generate_image(handoff, handoff.cond.kv, handoff.uncond.kv)]
        assert "image" in events[-1]
        loop.check_health()
        loop._driver.cancel()          # the loop task ends (as an unexpected error would end it)
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="engine loop stopped"):
            loop.check_health()

    asyncio.run(run(DiTServingLoop(runner)))
    stopped = DiTServingLoop(runner)
    stopped._executor.shutdown()
    with pytest.raises(RuntimeError, match="engine thread"):
        stopped.check_health()


@pytest.mark.parametrize("encoding", [ImageEncoding("webp", 90), ImageEncoding("jpeg", 75), ImageEncoding("png")])
def test_requested_encoding_comes_back(stage, golden, encoding):
    g = golden("t2i")
    params = DenoiseParams(num_inference_steps=4, seed=3)
    final = asyncio.run(collect(stage, golden_handoff(g, "t2i", params, request_id=encoding.format),
                                encoding=encoding))[-1]
    assert (final["format"], final["media_type"]) == (encoding.format, encoding.media_type)
    image = Image.open(io.BytesIO(final["image"]))
    assert image.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[encoding.format]
    assert image.size == (final["width"], final["height"]) == (128, 128)


def test_png_compression_level_changes_bytes_not_pixels(runner, golden):
    (img,) = drive_runner(runner, [golden_handoff(golden("t2i"), "t2i", DenoiseParams(num_inference_steps=2))])
    fast, small = img.encode(ImageEncoding(png_compress_level=0)), img.encode(ImageEncoding(png_compress_level=9))
    assert len(fast) > len(small)
    assert torch.equal(png_pixels(fast), png_pixels(small)) and torch.equal(png_pixels(fast), img.pixels)


def test_concurrent_requests_share_steps_and_keep_their_images(stage, golden, assert_golden):
    t2i, edit = golden("t2i"), golden("image_edit")
    handoffs = [golden_handoff(t2i, "t2i", request_id="x"), golden_handoff(edit, "image_edit", request_id="y"),
                golden_handoff(t2i, "t2i", DenoiseParams(num_inference_steps=10, seed=5), request_id="z")]

    async def main():
        before = stage.runner.engine.forwards_run
        results = await asyncio.gather(*(collect(stage, h) for h in handoffs))
        return results, stage.runner.engine.forwards_run - before

    (ex, ey, ez), forwards = asyncio.run(main())
    assert_golden(png_pixels(ex[-1]["image"]), t2i["image_uint8"], "t2i png")
    assert_golden(png_pixels(ey[-1]["image"]), edit["image_uint8"], "edit png")
    assert [e["step"] for e in ez[:-1]] == list(range(1, 11))
    assert forwards < 30 + 30 + 10   # steps were shared


def test_cancelled_request_leaves_the_engine(stage, golden):
    g = golden("t2i")

    async def main():
        events = await collect(stage, golden_handoff(g, "t2i", request_id="gone"), stop_after=3)
        for _ in range(100):     # the engine drops the job at its next step
            if not stage.runner.engine.has_work:
                break
            await asyncio.sleep(0.01)
        return events

    events = asyncio.run(main())
    assert [e["step"] for e in events] == [1, 2, 3]
    assert not stage.runner.engine.has_work


def test_bad_handoff_is_a_400_before_any_step(stage, golden):
    h = golden_handoff(golden("t2i"), "t2i", DenoiseParams(num_inference_steps=-1))
    with pytest.raises(DiTRequestError) as e:
        asyncio.run(collect(stage, h))
    assert e.value.http_status == 400 and e.value.param == "num_inference_steps"
    video = golden_handoff(golden("t2i"), "t2i")
    video.latent_grid = (2, 8, 8)  # a video's hand-off sent to the image method
    for branch in (video.cond, video.uncond):
        branch.query_positions = torch.zeros(3, 2 * 8 * 8 + 2, dtype=torch.long)
    with pytest.raises(DiTRequestError, match="makes a video; call generate_video"):
        asyncio.run(collect(stage, video))


def test_both_dit_deployments_take_engine_args_only_as_the_stage_graph_gives_them(tiny_ckpt_dir):
    from stages.dit.stage import CfgParallelDiTStage

    for cls in (DiTStage, CfgParallelDiTStage):
        with pytest.raises(ValueError, match="unknown DiT engine_args"):
            cls.func_or_class(str(tiny_ckpt_dir), engine_args={"dtype": "float32", "bogus": 1})
        with pytest.raises(TypeError):
            cls.func_or_class(str(tiny_ckpt_dir), dtype="float32")
    with pytest.raises(ValueError, match="max_batch_size must be 1"):
        CfgParallelDiTStage.func_or_class(str(tiny_ckpt_dir), max_batch_size=4)
    with pytest.raises(ValueError, match="engine_args.device"):
        CfgParallelDiTStage.func_or_class(str(tiny_ckpt_dir), engine_args={"device": "cpu"})
    with pytest.raises(ValueError, match="quantization"):   # checked before any weights are read
        DiTStage.func_or_class(str(tiny_ckpt_dir), engine_args={"device": "cpu", "quantization": "int3"})
    with pytest.raises(ValueError, match="quantized"):
        CfgParallelDiTStage.func_or_class(str(tiny_ckpt_dir), engine_args={"quantization": "fp8"})


@pytest.mark.slow
def test_engine_imports_without_ray_and_the_package_exports_the_deployment():
    import subprocess
    import sys
    code = ("import sys, stages.dit.engine, stages.dit.forward; assert 'ray' not in sys.modules; "
            "import stages.dit; from ray.serve import Deployment; assert isinstance(stages.dit.DiTStage, Deployment); "
            "assert isinstance(stages.dit.CfgParallelDiTStage, Deployment)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.heavy
def test_kv_from_the_object_store(stage, golden, assert_golden):
    import ray

    g = golden("t2i")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        h = golden_handoff(g, "t2i")
        h.cond = BranchKV(ray.put(h.cond.kv), h.cond.context_len, h.cond.query_positions)
        h.uncond = BranchKV(ray.put(h.uncond.kv), h.uncond.context_len, h.uncond.query_positions)
        events = asyncio.run(collect(stage, h))
    finally:
        ray.shutdown()
    assert_golden(png_pixels(events[-1]["image"]), g["image_uint8"], "png")
