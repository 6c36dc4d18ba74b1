"""`DiTStage`: the Ray Serve deployment of the DiT (hand-off in, progress and a PNG out).

One replica owns one `DiTRunner` (model, engine, VAE decoder). Requests are async generators on the
replica's event loop; a single background task drives the engine from one worker thread, one step at
a time, so requests join and leave between steps and the event loop stays free. Each request gets
{"step": i, "total": n} after every step, then {"png", "width", "height", "latents": None}.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
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


@serve.deployment(max_ongoing_requests=16)
class DiTStage:
    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, cfg_parallel: int = 1, compile: bool = True, *,
                 variant: str | None = None, engine_args: dict[str, Any] | None = None):
        """`compile` (GPU only): fused Triton kernels + CUDA graphs + cuDNN attention (runner.fast_path_options).
        `engine_args` (the stage graph's `dit.engine`) may carry dtype / device / compile instead."""
        engine_args = dict(engine_args or {})
        dtype = engine_args.pop("dtype", dtype)
        device = engine_args.pop("device", device)
        compile = engine_args.pop("compile", compile)
        if engine_args:
            raise ValueError(f"unknown DiT engine_args: {sorted(engine_args)} (dtype, device, compile)")
        if cfg_parallel not in (1, 2):
            raise ValueError(f"cfg_parallel={cfg_parallel}: use 1 (one device) or 2 (a device per CFG branch)")
        self.group = None
        self._group_jobs = 0   # cfg_parallel: requests inside group.denoise_stream
        if cfg_parallel == 2:
            # The two branches on the replica's two GPU bundles; one request at a time (a latency option).
            from .cfg_parallel import CfgParallelGroup
            self.group = CfgParallelGroup(model, variant, dtype=dtype, compile=compile)
            return
        self.runner = DiTRunner(model, variant, dtype=dtype, device=device, max_batch_size=max_batch_size,
                                compile=compile)
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit-engine")
        self._waiters: dict[DenoiseJob, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None

    async def generate_image(self, handoff: ContextHandoff) -> AsyncIterator[dict]:
        if self.group is not None:
            self._group_jobs += 1
            try:
                async for item in self.group.denoise_stream(handoff):
                    img = item.get("image")
                    yield item if img is None else {"png": img.png, "width": img.width, "height": img.height,
                                                    "latents": None}
            finally:
                self._group_jobs -= 1
            return
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
        if self.group is not None:
            self.group.check_health()
            return
        if self._driver is not None and self._driver.done():
            raise RuntimeError(f"the DiT engine loop stopped: {self._driver.exception()!r}")

    async def num_jobs(self) -> int:
        """Denoising jobs this replica holds: queued, stepping, or cancelled and not yet dropped by the
        engine, plus requests still waiting for their result (0 when idle; `/health` reports it)."""
        if self.group is not None:
            return self._group_jobs
        return len({*self.runner.engine.jobs, *self._waiters})

    async def stats(self) -> dict:
        """Memory (weights, allocator) and load, for logs and metrics."""
        if self.group is not None:
            return {"cfg_parallel": 2}
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
                    queue.put_nowait({"png": result.png, "width": result.width, "height": result.height,
                                      "latents": None})
