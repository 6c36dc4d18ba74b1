"""ThinkerStage as a Ray Serve deployment: handles, nested ObjectRefs, streaming, typed errors, cancellation."""
from __future__ import annotations

import asyncio
import time

import pytest
from PIL import Image

from stages.lance.requests import ChatTurn, ImageRequest, TextRequest
from stages.thinker.errors import ContextTooLongError

pytestmark = pytest.mark.heavy   # Ray Serve and vLLM

ENGINE_ARGS = {"dtype": "float32", "max_model_len": 1024, "max_num_seqs": 4, "cpu_kv_cache_space_gib": 1}


@pytest.fixture(scope="module")
def handle(tiny_ckpt_dir):
    import ray
    from ray import serve

    from stages.thinker.stage import ThinkerStage

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    app = ThinkerStage.options(ray_actor_options={"num_cpus": 0}).bind(
        model=str(tiny_ckpt_dir), variant="Lance_3B", engine_args=ENGINE_ARGS)
    yield serve.run(app, name="thinker-test", route_prefix=None)
    serve.shutdown()
    ray.shutdown()


def test_the_deployment_hands_over_golden_kv_and_streams_golden_text(handle, golden, golden_dir, assert_golden):
    g = golden("t2i")
    image = Image.open(golden_dir / "cases" / "inputs" / "edit_input.png")

    async def run():
        h = await handle.prefill_context.remote(ImageRequest(task="t2i", prompt="A red cube on a blue table",
                                                             height=128, width=128))
        ids = []
        async for d in handle.options(stream=True).generate_text.remote(TextRequest(
                task="x2t_image", turns=[ChatTurn("user", "What color is the square?")], image=image,
                resolution="image_256res", max_tokens=16)):
            ids += d["token_ids"]
        return h, ids

    h, ids = asyncio.run(run())
    for branch in ("cond", "uncond"):
        k, v = getattr(h, branch).fetch()  # a nested ObjectRef, owned by the replica
        assert_golden(k, g[f"ctx_{branch}_K"], f"{branch} K")
        assert_golden(v, g[f"ctx_{branch}_V"], f"{branch} V")
    assert ids == golden("x2t_image")["generated_ids"].tolist()


def test_errors_and_cancellation_cross_the_deployment(handle):
    async def run():
        with pytest.raises(ContextTooLongError):
            await handle.prefill_context.remote(ImageRequest(task="t2i", prompt="red cube " * 800, height=64, width=64))
        aborted0 = (await handle.engine_stats.remote())["aborted_requests"]
        stream = handle.options(stream=True).generate_text.remote(TextRequest(
            task="chat", turns=[ChatTurn("user", "Describe a red cube.")], max_tokens=900))
        first = await stream.__anext__()
        stream.cancel()
        deadline = time.monotonic() + 20
        while True:
            stats = await handle.engine_stats.remote()
            if stats["aborted_requests"] > aborted0 and stats["num_running"] == 0 or time.monotonic() > deadline:
                return first, stats, aborted0
            await asyncio.sleep(0.1)

    first, stats, aborted0 = asyncio.run(run())
    assert first["finish_reason"] is None and stats["aborted_requests"] == aborted0 + 1  # vLLM request aborted
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0.0 and stats["pending_exports"] == []
    info = asyncio.run(_remote(handle.model_info))
    assert info["max_model_len"] == 1024 and info["num_layers"] == 2


async def _remote(method):
    return await method.remote()
