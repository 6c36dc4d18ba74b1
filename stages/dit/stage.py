"""The Ray Serve deployments of the DiT (hand-off in, progress and an encoded image out); the stage graph's
`deployment_class` picks one, and both take the graph's `dit.engine` as `engine_args`.

`DiTStage`: one replica owns one `DiTRunner` (model, engine, VAE decoder) driven by a `DiTServingLoop`
(serving.py: the engine on one worker thread, one step at a time, so requests join and leave between
steps; finished images encoded on a small pool, off the engine thread).
`CfgParallelDiTStage`: one replica spreads each request's two CFG branches over two devices.

Each request gets {"step": i, "total": n} after every step, then {"image": bytes, "format", "media_type",
"width", "height"}, encoded as the request's `ImageEncoding` asks (PNG unless it asks otherwise).
Videos (`DiTStage.generate_video`) stream progress of denoise, decode and encode, then the MP4
(serving.py); the CFG-parallel class makes images only.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields
from typing import Any, AsyncIterator

from ray import serve

from stages import metrics
from stages.lance.handoff import BranchKV, ContextHandoff
from stages.lance.requests import ImageEncoding, VideoEncoding

from .encode import with_png_level
from .engine import DiTRequestError
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


async def fetch_handoff_kv(handoff: ContextHandoff):
    """Both branches' (K, V), fetched concurrently; the time it took is the hand-off's fetch phase."""
    start = time.perf_counter()
    kvs = await asyncio.gather(fetch_kv(handoff.cond), fetch_kv(handoff.uncond))
    metrics.observe(metrics.KV_HANDOFF_DURATION, time.perf_counter() - start, phase="fetch")
    return kvs


@dataclass(frozen=True)
class DiTEngineOptions:
    """The stage graph's `dit.engine`: the one way engine arguments reach a DiT deployment."""

    dtype: str = "auto"       # auto: bfloat16 on a GPU, float32 on the CPU
    device: str = "auto"      # auto: cuda when there is one (DiTStage only: CFG-parallel ranks use their bundles')
    compile: bool = True      # GPU only: fused Triton kernels, CUDA graphs, cuDNN attention
    quantization: str | None = None   # None/"none" or "fp8": layer weights in FP8 E4M3 (quantize.py)
    png_compress_level: int = 6       # zlib level of PNG responses (the pixels are the same at any level)

    def __post_init__(self):
        if self.quantization in ("none", ""):
            object.__setattr__(self, "quantization", None)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r} (none | fp8)")
        ImageEncoding(png_compress_level=self.png_compress_level)   # validates the level

    @classmethod
    def from_dict(cls, args: dict[str, Any] | None) -> "DiTEngineOptions":
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown DiT engine_args: {unknown} ({', '.join(sorted(known))})")
        return cls(**args)


@serve.deployment(max_ongoing_requests=16)
class DiTStage:
    """One device; requests that arrive together are denoised together, one step at a time."""

    def __init__(self, model: str, engine_args: dict[str, Any] | None = None, variant: str | None = None, *,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01):
        args = DiTEngineOptions.from_dict(engine_args)
        self.runner = DiTRunner(model, variant, dtype=args.dtype, device=args.device, max_batch_size=max_batch_size,
                                compile=args.compile, quantization=args.quantization)
        self.loop = DiTServingLoop(self.runner, batch_wait_timeout_s, png_compress_level=args.png_compress_level)

    async def generate_image(self, handoff: ContextHandoff, encoding: ImageEncoding | None = None
                             ) -> AsyncIterator[dict]:
        cond_kv, uncond_kv = await fetch_handoff_kv(handoff)
        async for item in self.loop.generate_image(handoff, cond_kv, uncond_kv, encoding):
            yield item

    async def generate_video(self, handoff: ContextHandoff, encoding: VideoEncoding | None = None
                             ) -> AsyncIterator[dict]:
        """t2v / i2v / video_edit: progress of denoise, decode and encode, then the encoded video (MP4,
        12 fps by default; `encoding` picks fps, quality or lossless). Frames never leave the replica."""
        cond_kv, uncond_kv = await fetch_handoff_kv(handoff)
        async for item in self.loop.generate_video(handoff, cond_kv, uncond_kv, encoding):
            yield item

    async def check_health(self) -> None:
        self.loop.check_health()

    async def num_jobs(self) -> int:
        """Denoising jobs this replica holds: queued, stepping, or cancelled and not yet dropped by the
        engine, plus requests still waiting for their result (0 when idle; `/health` reports it)."""
        return self.loop.num_jobs()

    async def stats(self) -> dict:
        """Memory (weights, allocator) and load, for logs and metrics."""
        return self.loop.stats()


@serve.deployment(max_ongoing_requests=16)
class CfgParallelDiTStage:
    """The cond and text-uncond branches of each request on two devices of one replica (`cfg_parallel.py`):
    lower latency per image, one request at a time. Deploy it with a placement group of the replica's
    bundle plus one GPU bundle per branch (serve_app.builder does, from the stage graph)."""

    def __init__(self, model: str, engine_args: dict[str, Any] | None = None, variant: str | None = None, *,
                 max_batch_size: int = 1, batch_wait_timeout_s: float = 0.0):
        args = DiTEngineOptions.from_dict(engine_args)
        if args.device != "auto":
            raise ValueError("the CFG-parallel DiT puts its two ranks on its placement group's devices; "
                             "remove engine_args.device")
        if args.quantization is not None:
            raise ValueError("the CFG-parallel DiT does not run quantized weights; remove engine_args.quantization "
                             "or use stages.dit:DiTStage")
        if max_batch_size != 1:
            raise ValueError(f"the CFG-parallel DiT denoises one request at a time on both devices, "
                             f"max_batch_size must be 1 (got {max_batch_size}); scale with replicas")
        from .cfg_parallel import CfgParallelGroup

        self.group = CfgParallelGroup(model, variant, dtype=args.dtype, compile=args.compile)
        self.png_compress_level = args.png_compress_level
        self._jobs = 0   # requests inside group.denoise_stream
        self._record_load()

    async def generate_image(self, handoff: ContextHandoff, encoding: ImageEncoding | None = None
                             ) -> AsyncIterator[dict]:
        encoding = with_png_level(encoding, self.png_compress_level)
        task = metrics.task_label(handoff.task)
        self._jobs += 1
        self._record_load()
        submitted = denoised = time.perf_counter()
        try:
            async for item in self.group.denoise_stream(handoff):
                image = item.get("image")
                if image is None:
                    metrics.inc(metrics.DIT_STEPS)
                    metrics.observe(metrics.DIT_STEP_BATCH, 1)
                    if item.get("step") == item.get("total"):
                        denoised = time.perf_counter()
                        metrics.observe(metrics.DENOISE_DURATION, denoised - submitted, task=task)
                    yield item
                    continue
                start = time.perf_counter()
                metrics.observe(metrics.DECODE_DURATION, start - denoised, task=task)
                data = await asyncio.get_running_loop().run_in_executor(None, image.encode, encoding)
                metrics.observe(metrics.ENCODE_DURATION, time.perf_counter() - start, task=task)
                yield {"image": data, "format": encoding.format, "media_type": encoding.media_type,
                       "width": image.width, "height": image.height}
        finally:
            self._jobs -= 1
            self._record_load()

    def _record_load(self) -> None:
        """One request denoises at a time; the others wait in the group."""
        metrics.set_gauge(metrics.DIT_ACTIVE_BATCH, min(self._jobs, 1))
        metrics.set_gauge(metrics.DIT_QUEUE_DEPTH, max(self._jobs - 1, 0))

    async def generate_video(self, handoff: ContextHandoff, encoding: VideoEncoding | None = None
                             ) -> AsyncIterator[dict]:
        raise DiTRequestError("this DiT deployment runs CFG-parallel (stages.dit:CfgParallelDiTStage), which makes "
                              "images only; serve videos from a stages.dit:DiTStage", param="task")
        yield  # an async generator, as DiTStage.generate_video

    async def check_health(self) -> None:
        self.group.check_health()

    async def num_jobs(self) -> int:
        """Requests inside the group's denoising stream (0 when idle; `/health` reports it)."""
        return self._jobs

    async def stats(self) -> dict:
        return {"cfg_parallel": 2}
