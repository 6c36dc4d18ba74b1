"""The Ray Serve deployments of the DiT (hand-off in, progress and a PNG out); the stage graph's
`deployment_class` picks one, and both take the graph's `dit.engine` as `engine_args`.

`DiTStage`: one replica owns one `DiTRunner` (model, engine, VAE decoder). Requests are async generators
on the replica's event loop; a single background task drives the engine from one worker thread, one step
at a time, so requests join and leave between steps and the event loop stays free.
`CfgParallelDiTStage`: one replica spreads each request's two CFG branches over two devices.

Each request gets {"step": i, "total": n} after every step, then {"png", "width", "height", "latents": None}.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, AsyncIterator

from ray import serve

from stages.lance.handoff import BranchKV, ContextHandoff

from .engine import DenoiseJob
from .runner import DiTRunner

log = logging.getLogger("ray.serve")


async def fetch_kv(branch: BranchKV | None):
    """A branch's (K, V): given inline, or awaited from the object store (never a blocking ray.get)."""
    if branch is None:
        return None
    kv = branch.kv
    if isinstance(kv, (tuple, list)):
        return tuple(kv)
    return tuple(await kv)


@dataclass(frozen=True)
class DiTEngineOptions:
    """The stage graph's `dit.engine`: the one way engine arguments reach a DiT deployment."""

    dtype: str = "auto"       # auto: bfloat16 on a GPU, float32 on the CPU
    device: str = "auto"      # auto: cuda when there is one (DiTStage only: CFG-parallel ranks use their bundles')
    compile: bool = True      # GPU only: fused Triton kernels, CUDA graphs, cuDNN attention

    @classmethod
    def from_dict(cls, args: dict[str, Any] | None) -> "DiTEngineOptions":
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown DiT engine_args: {unknown} ({', '.join(sorted(known))})")
        return cls(**args)


def image_item(image) -> dict:
    """The last item of a generate_image stream: the PNG of a `DecodedImage`."""
    return {"png": image.png, "width": image.width, "height": image.height, "latents": None}


@serve.deployment(max_ongoing_requests=16)
class DiTStage:
    """One device; requests that arrive together are denoised together, one step at a time."""

    def __init__(self, model: str, engine_args: dict[str, Any] | None = None, variant: str | None = None, *,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01):
        args = DiTEngineOptions.from_dict(engine_args)
        self.runner = DiTRunner(model, variant, dtype=args.dtype, device=args.device, max_batch_size=max_batch_size,
                                compile=args.compile)
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit-engine")
        self._waiters: dict[DenoiseJob, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None

    async def generate_image(self, handoff: ContextHandoff) -> AsyncIterator[dict]:
        cond_kv, uncond_kv = await asyncio.gather(fetch_kv(handoff.cond), fetch_kv(handoff.uncond))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_step(done: int, total: int) -> None:   # called on the engine thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, {"step": done, "total": total})

        # on the engine thread: device copies never race a running step
        job = await loop.run_in_executor(self._executor, self.runner.prepare, handoff, cond_kv, uncond_kv, on_step)
        self._waiters[job] = queue
        self.runner.submit(job)
        self._ensure_driver()
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if "png" in item:
                    finished = True
                    return
        finally:
            if not finished:
                job.cancelled = True   # the client left: the engine drops the job before its next step
            self._waiters.pop(job, None)

    async def check_health(self) -> None:
        if self._driver is not None and self._driver.done():
            raise RuntimeError(f"the DiT engine loop stopped: {self._driver.exception()!r}")

    async def stats(self) -> dict:
        """Memory (weights, allocator) and load, for logs and metrics."""
        return {"memory": self.runner.memory(), "active": len(self.runner.engine.active), "waiting": len(self._waiters)}

    # --- the engine loop ---------------------------------------------------------------------------

    def _ensure_driver(self) -> None:
        if self._driver is None or self._driver.done():  # (re)start on the running loop
            self._wake = asyncio.Event()
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.runner.has_work:
                self._wake.clear()
                await self._wake.wait()
                if self.batch_wait_timeout_s > 0:  # let requests arriving together share the first step
                    await asyncio.sleep(self.batch_wait_timeout_s)
            try:
                results = await loop.run_in_executor(self._executor, self.runner.step)
            except Exception as e:  # a bug outside any one job: fail the active jobs, keep serving
                log.exception("DiT engine step failed")
                results = [(job, e) for job in self.runner.engine.active]
                self.runner.engine.active.clear()
            for job, result in results:
                queue = self._waiters.get(job)
                if queue is None:
                    continue
                if isinstance(result, BaseException):
                    queue.put_nowait(result)
                else:
                    queue.put_nowait(image_item(result))


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
        if max_batch_size != 1:
            raise ValueError(f"the CFG-parallel DiT denoises one request at a time on both devices, "
                             f"max_batch_size must be 1 (got {max_batch_size}); scale with replicas")
        from .cfg_parallel import CfgParallelGroup

        self.group = CfgParallelGroup(model, variant, dtype=args.dtype, compile=args.compile)

    async def generate_image(self, handoff: ContextHandoff) -> AsyncIterator[dict]:
        async for item in self.group.denoise_stream(handoff):
            image = item.get("image")
            yield item if image is None else image_item(image)

    async def check_health(self) -> None:
        self.group.check_health()

    async def stats(self) -> dict:
        return {"cfg_parallel": 2}
