"""`DiTServingLoop`: the DiT stage's request loop, without Ray (the deployment wraps it; the benchmark
drives it in-process on a GPU machine).

Requests are async generators on one event loop. One background task drives the engine from a single
worker thread, one step at a time, so requests join and leave between steps and the event loop stays
free. Finished images leave the engine thread as uint8 pixels still being copied to the host; an
`EncoderPool` waits for the copy and encodes them (PNG by default, WebP/JPEG on request) while the
engine thread already runs the next step. Each request gets {"step": i, "total": n} after every step,
then {"image": bytes, "format", "media_type", "width", "height"}.

Videos (`generate_video`) take the same engine steps; after denoising, the runner decodes one latent
frame per step and hands each chunk's uint8 frames over; an encoder thread appends them to the
request's MP4 (`Mp4Encoder`) in order, so decode and encode overlap and only the file leaves the
replica. Progress covers the three phases: {"stage": "denoise" | "decode" | "encode", "step", "total"}
(decode and encode count latent frames), then {"video": bytes, "format", "media_type", "width",
"height", "num_frames", "fps"}.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from stages import metrics
from stages.lance.handoff import ContextHandoff
from stages.lance.requests import ImageEncoding, VideoEncoding

from .encode import EncoderPool, with_png_level
from .engine import DenoiseJob, DiTRequestError
from .runner import DecodedImage, DiTRunner
from .video import DecodedVideo, Mp4Encoder

log = logging.getLogger(__name__)
MAX_FAILED_STEPS = 3   # consecutive failed engine steps after which the replica reports unhealthy


@dataclass(eq=False)
class _Waiter:
    queue: asyncio.Queue
    encoding: ImageEncoding | VideoEncoding
    frames: asyncio.Queue | None = None   # videos: decoded chunks, then the DecodedVideo, for the encoder
    task: str = "other"                   # metrics label
    submitted_at: float = 0.0             # perf_counter() when the job was submitted to the engine
    denoised_at: float = 0.0              # ... when its last denoising step ended (set on the engine thread)

    def stepped(self, done: int, total: int) -> None:
        if done >= total:
            self.denoised_at = time.perf_counter()

    def decoded(self) -> None:
        """On the event loop, when the decoded pixels (a video: its last chunk) arrive."""
        now = time.perf_counter()
        if self.submitted_at and self.denoised_at:
            metrics.observe(metrics.DENOISE_DURATION, self.denoised_at - self.submitted_at, task=self.task)
            metrics.observe(metrics.DECODE_DURATION, now - self.denoised_at, task=self.task)


class DiTServingLoop:
    def __init__(self, runner: DiTRunner, batch_wait_timeout_s: float = 0.0, encode_workers: int | None = None,
                 png_compress_level: int = 6):
        """`png_compress_level` (zlib 0..9) applies to PNG responses; the pixels are the same at any level."""
        self.runner = runner
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.png_compress_level = ImageEncoding(png_compress_level=png_compress_level).png_compress_level
        self.encoder = EncoderPool(encode_workers)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit-engine")
        self._waiters: dict[DenoiseJob, _Waiter] = {}
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self.steps_run = 0
        self.failed_steps = 0   # consecutive engine steps that raised (check_health)
        metrics.set_gauge(metrics.DIT_QUEUE_DEPTH, 0)   # idle until the first request, not "no data"
        metrics.set_gauge(metrics.DIT_ACTIVE_BATCH, 0)
        metrics.declare(metrics.DIT_STEPS)

    async def generate_image(self, handoff: ContextHandoff, cond_kv, uncond_kv,
                             encoding: ImageEncoding | None = None) -> AsyncIterator[dict]:
        """Progress after every step, then the encoded image (see the module docstring)."""
        if handoff.is_video:
            raise DiTRequestError(f"a {handoff.task} hand-off of latent grid {tuple(handoff.latent_grid)} makes a "
                                  "video; call generate_video", param="task")
        encoding = with_png_level(encoding, self.png_compress_level)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_step(done: int, total: int) -> None:   # called on the engine thread
            waiter.stepped(done, total)
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, {"step": done, "total": total})

        waiter = _Waiter(queue, encoding, task=metrics.task_label(handoff.task))

        job = await self._submit(waiter, handoff, cond_kv, uncond_kv, on_step)
        async with aclosing(self._items(job, queue, "image")) as items:   # closed with this one
            async for item in items:
                yield item

    async def generate_video(self, handoff: ContextHandoff, cond_kv, uncond_kv,
                             encoding: VideoEncoding | None = None) -> AsyncIterator[dict]:
        """Progress of denoise, decode and encode, then the MP4 (see the module docstring)."""
        if not handoff.is_video:
            raise DiTRequestError(f"generate_video got an image hand-off (task {handoff.task!r}, latent_grid "
                                  f"{tuple(handoff.latent_grid)}); images go through generate_image", param="task")
        encoding = encoding or VideoEncoding()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        frames: asyncio.Queue = asyncio.Queue()

        def put(q: asyncio.Queue, item) -> None:   # from the engine thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(q.put_nowait, item)

        def on_step(done: int, total: int) -> None:
            waiter.stepped(done, total)
            put(queue, {"stage": "denoise", "step": done, "total": total})

        def on_frames(done: int, total: int, chunk) -> None:
            put(queue, {"stage": "decode", "step": done, "total": total})
            put(frames, (done, total, chunk))

        waiter = _Waiter(queue, encoding, frames, task=metrics.task_label(handoff.task))

        job = await self._submit(waiter, handoff, cond_kv, uncond_kv, on_step, on_frames)
        encoder = loop.create_task(self._encode_video(frames, queue, encoding, waiter.task))
        async with aclosing(self._items(job, queue, "video", on_leave=encoder.cancel)) as items:
            async for item in items:
                yield item

    async def _submit(self, waiter: "_Waiter", handoff: ContextHandoff, cond_kv, uncond_kv,
                      *callbacks) -> DenoiseJob:
        """Prepare the job and queue it in the engine, on the engine thread: device copies never race
        a running step, and a job prepared before a step that is already queued behind it joins that
        step (submitting from the event loop afterwards would let the queued step start without it)."""
        def prepare_and_submit() -> DenoiseJob:
            job = self.runner.prepare(handoff, cond_kv, uncond_kv, *callbacks)
            self._waiters[job] = waiter
            waiter.submitted_at = time.perf_counter()
            self.runner.submit(job)
            return job

        prepared = self._executor.submit(prepare_and_submit)
        try:
            job = await asyncio.wrap_future(prepared)
        except asyncio.CancelledError:   # the client left while its job was being prepared: drop the job
            prepared.add_done_callback(self._drop_prepared)
            raise
        metrics.set_gauge(metrics.DIT_QUEUE_DEPTH, self.runner.engine.num_pending)
        return job

    async def _items(self, job: DenoiseJob, queue: asyncio.Queue, final_key: str, on_leave=None
                     ) -> AsyncIterator[dict]:
        """The job's queued progress, then the item carrying `final_key`. Left early (the client went
        away), the job is cancelled: the engine drops it before its next step or decode chunk."""
        self._ensure_driver()
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if final_key in item:
                    finished = True
                    return
        finally:
            if not finished:
                job.cancelled = True
                if on_leave is not None:
                    on_leave()
            self._waiters.pop(job, None)

    async def _encode_video(self, frames: asyncio.Queue, queue: asyncio.Queue, encoding: VideoEncoding,
                            task: str = "other") -> None:
        """Append each decoded chunk to the MP4 on an encoder thread, in order; the file after the last."""
        encoder: Mp4Encoder | None = None
        encoding_s = 0.0   # time spent in the encoder's calls (they overlap the decode of the next chunks)
        try:
            while True:
                item = await frames.get()
                start = time.perf_counter()
                if isinstance(item, DecodedVideo):
                    if encoder is None:
                        raise RuntimeError("the video finished decoding without any frames")
                    data = await self.encoder.run(encoder.finish)
                    encoder = None
                    metrics.observe(metrics.ENCODE_DURATION, encoding_s + time.perf_counter() - start, task=task)
                    queue.put_nowait({"video": data, "format": encoding.format, "media_type": encoding.media_type,
                                      "width": item.width, "height": item.height, "num_frames": item.num_frames,
                                      "fps": encoding.fps})
                    return
                done, total, chunk = item
                if encoder is None:
                    encoder = await self.encoder.run(Mp4Encoder, chunk.shape[2], chunk.shape[1], encoding)
                await self.encoder.run(encoder.write, chunk)
                encoding_s += time.perf_counter() - start
                queue.put_nowait({"stage": "encode", "step": done, "total": total})
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("encoding a finished video failed")
            queue.put_nowait(e)
        finally:
            if encoder is not None:   # on the pool: it waits for a write still in flight
                self.encoder.run(encoder.abort)

    def _drop_prepared(self, prepared) -> None:
        if not prepared.cancelled() and prepared.exception() is None:
            job = prepared.result()
            job.cancelled = True
            self._waiters.pop(job, None)

    def num_jobs(self) -> int:
        """Jobs held: queued, stepping, or cancelled and not yet dropped, plus requests awaiting delivery."""
        return len({*self.runner.engine.jobs, *(d.job for d in self.runner.decoding), *self._waiters})

    def check_health(self) -> None:
        """Raises when this replica cannot serve (Serve then replaces it): the engine loop stopped,
        its thread pool is gone, or the last MAX_FAILED_STEPS engine steps all failed (a device in
        a sticky error state fails every step after)."""
        if self._driver is not None and self._driver.done():
            error = None if self._driver.cancelled() else self._driver.exception()
            raise RuntimeError(f"the DiT engine loop stopped: {error!r}")
        if getattr(self._executor, "_shutdown", False):
            raise RuntimeError("the DiT engine thread was shut down")
        if self.failed_steps >= MAX_FAILED_STEPS:
            raise RuntimeError(f"the last {self.failed_steps} DiT engine steps failed")

    def stats(self) -> dict:
        return {"memory": self.runner.memory(), "active": len(self.runner.engine.active),
                "waiting": len(self._waiters), "jobs": self.num_jobs(), "encode_workers": self.encoder.workers,
                "failed_steps": self.failed_steps}

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
                self.steps_run += 1
                self.failed_steps = 0
            except Exception as e:  # a bug outside any one job: fail the active jobs, keep serving
                log.exception("DiT engine step failed")
                self.failed_steps += 1
                results = [(job, e) for job in self.runner.engine.active]
                self.runner.engine.active.clear()
                if not results and self.failed_steps >= MAX_FAILED_STEPS:
                    await asyncio.sleep(0.1)   # no job to fail: do not spin while health fails
            self._record_step()
            for job, result in results:
                waiter = self._waiters.get(job)
                if waiter is None:
                    continue
                if isinstance(result, BaseException):
                    waiter.queue.put_nowait(result)
                elif isinstance(result, DecodedVideo):
                    waiter.decoded()
                    waiter.frames.put_nowait(result)   # after its last chunk: the encoder finishes the file
                else:
                    waiter.decoded()
                    loop.create_task(self._deliver(waiter, result))

    def _record_step(self) -> None:
        """The step's metrics, on the event loop (the engine thread only counted its batch)."""
        engine = self.runner.engine
        metrics.inc(metrics.DIT_STEPS)
        if engine.last_batch_size:
            metrics.observe(metrics.DIT_STEP_BATCH, engine.last_batch_size)
        metrics.set_gauge(metrics.DIT_ACTIVE_BATCH, len(engine.active))
        metrics.set_gauge(metrics.DIT_QUEUE_DEPTH, engine.num_pending)

    async def _deliver(self, waiter: _Waiter, image: DecodedImage) -> None:
        start = time.perf_counter()
        try:
            data = await self.encoder.encode(image, waiter.encoding)
        except Exception as e:
            log.exception("encoding a finished image failed")
            waiter.queue.put_nowait(e)
            return
        metrics.observe(metrics.ENCODE_DURATION, time.perf_counter() - start, task=waiter.task)
        waiter.queue.put_nowait({"image": data, "format": waiter.encoding.format,
                                 "media_type": waiter.encoding.media_type,
                                 "width": image.width, "height": image.height})
