"""`DiTStage`: the Ray Serve deployment of the DiT (hand-off in, progress and an encoded image out).

One replica owns one `DiTRunner` (model, engine, VAE decoder) driven by a `DiTServingLoop` (serving.py:
the engine on one worker thread, encoding on a small pool). Each request gets {"step": i, "total": n}
after every step, then {"image": bytes, "format", "media_type", "width", "height"}; the image is encoded
as the request's `ImageEncoding` asks (PNG by default).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from ray import serve

from stages.lance.handoff import BranchKV, ContextHandoff
from stages.lance.requests import ImageEncoding

from .encode import with_png_level
from .quantize import QUANTIZATIONS
from .runner import DiTRunner
from .serving import DiTServingLoop

log = logging.getLogger("ray.serve")


async def fetch_kv(branch: BranchKV | None):
    """A branch's (K, V): given inline, or awaited from the object store (never a blocking ray.get)."""
    if branch is None:
        return None
    kv = branch.kv
    if isinstance(kv, (tuple, list)):
        return tuple(kv)
    return tuple(await kv)


ENGINE_ARGS = ("dtype", "device", "compile", "quantization", "png_compress_level")


@serve.deployment(max_ongoing_requests=16)
class DiTStage:
    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, cfg_parallel: int = 1, compile: bool = True, *,
                 variant: str | None = None, engine_args: dict[str, Any] | None = None,
                 quantization: str | None = None, png_compress_level: int = 6):
        """`compile` (GPU only): fused Triton kernels + CUDA graphs + cuDNN attention (runner.fast_path_options).
        `quantization`: None or "fp8" (GPU only). `png_compress_level`: zlib level of PNG responses.
        `engine_args` (the stage graph's `dit.engine`) may carry any of these instead."""
        engine_args = dict(engine_args or {})
        unknown = sorted(set(engine_args) - set(ENGINE_ARGS))
        if unknown:
            raise ValueError(f"unknown DiT engine_args: {unknown} ({', '.join(ENGINE_ARGS)})")
        dtype = engine_args.get("dtype", dtype)
        device = engine_args.get("device", device)
        compile = engine_args.get("compile", compile)
        quantization = engine_args.get("quantization", quantization)
        png_compress_level = engine_args.get("png_compress_level", png_compress_level)
        if quantization in ("none", ""):
            quantization = None
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r} (none | fp8)")
        if cfg_parallel not in (1, 2):
            raise ValueError(f"cfg_parallel={cfg_parallel}: use 1 (one device) or 2 (a device per CFG branch)")
        self.group = None
        self.png_compress_level = png_compress_level
        if cfg_parallel == 2:
            if quantization is not None:
                raise ValueError("quantization is not supported with cfg_parallel 2 yet; use cfg_parallel: 1")
            # The two branches on the replica's two GPU bundles; one request at a time (a latency option).
            from .cfg_parallel import CfgParallelGroup
            self.group = CfgParallelGroup(model, variant, dtype=dtype, compile=compile)
            return
        self.runner = DiTRunner(model, variant, dtype=dtype, device=device, max_batch_size=max_batch_size,
                                compile=compile, quantization=quantization)
        self.loop = DiTServingLoop(self.runner, batch_wait_timeout_s, png_compress_level=png_compress_level)

    async def generate_image(self, handoff: ContextHandoff, encoding: ImageEncoding | None = None
                             ) -> AsyncIterator[dict]:
        if self.group is not None:
            encoding = with_png_level(encoding, self.png_compress_level)
            async for item in self.group.denoise_stream(handoff):
                img = item.get("image")
                if img is None:
                    yield item
                    continue
                data = await asyncio.get_running_loop().run_in_executor(None, img.encode, encoding)
                yield {"image": data, "format": encoding.format, "media_type": encoding.media_type,
                       "width": img.width, "height": img.height}
            return
        cond_kv, uncond_kv = await asyncio.gather(fetch_kv(handoff.cond), fetch_kv(handoff.uncond))
        async for item in self.loop.generate_image(handoff, cond_kv, uncond_kv, encoding):
            yield item

    async def check_health(self) -> None:
        if self.group is not None:
            self.group.check_health()
            return
        self.loop.check_health()

    async def stats(self) -> dict:
        """Memory (weights, allocator) and load, for logs and metrics."""
        if self.group is not None:
            return {"cfg_parallel": 2}
        return self.loop.stats()
