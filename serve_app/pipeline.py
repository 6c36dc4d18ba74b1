"""The path of a request through the stages: thinker.prefill_context -> dit.generate_image (images) or
dit.generate_video (videos), or thinker.generate_text. Stage exceptions become OpenAI errors here
(errors.stage_error)."""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

from stages.lance.handoff import ContextHandoff
from stages.lance.requests import ImageEncoding, ImageRequest, TextRequest, VideoEncoding, VideoRequest

from .errors import OpenAIError, StageUnavailable, client_message, stage_error
from .metrics import StageMetrics

logger = logging.getLogger("ray.serve")
HEALTH_TIMEOUT_S = 10.0
# A request whose stage replica died is run again (bounded; never for a 4xx): the DiT gets the same
# hand-off again (its KV objects live on in the object store while the thinker replica does), a
# dead thinker means a fresh prefill. Serve restarts the replica; a retry waits for it in the queue.
MAX_RETRIES = 2
RETRY_BACKOFF_S = (0.5, 2.0)


def _cancel(response) -> None:
    """Cancel a handle call that may still run. Best effort and quiet: Serve's `cancel()` re-raises
    a failed assignment's error (e.g. BackPressureError), which must not replace the error the
    request is already answering with."""
    try:
        response.cancel()
    except Exception:
        pass


def _not_connected() -> OpenAIError:
    return OpenAIError("the model stages are not connected to this ingress", status=503,
                       type="service_unavailable", code="stage_unavailable")


class StagePipeline:
    """Calls the ThinkerStage and DiTStage deployments through their handles."""

    def __init__(self, thinker: Optional[Any], dit: Optional[Any], metrics: StageMetrics):
        self.thinker, self.dit, self.metrics = thinker, dit, metrics

    async def prefill(self, req: ImageRequest | VideoRequest) -> ContextHandoff:
        if self.thinker is None:
            raise _not_connected()
        with self.metrics.stage_call("thinker"), self.metrics.timed("thinker", req.task):
            response = self.thinker.prefill_context.remote(req)
            try:
                handoff = await response
            except asyncio.CancelledError:
                _cancel(response)
                raise
            except Exception as e:
                raise stage_error(e, "thinker") from e
        return handoff

    async def denoise(self, handoff: ContextHandoff, encoding: ImageEncoding | None = None) -> AsyncIterator[dict]:
        """Progress dicts {"step", "total"}, then the final {"image", "format", "media_type", "width", "height"}."""
        if self.dit is None:
            raise _not_connected()
        start = time.perf_counter()
        with self.metrics.stage_call("dit"):
            stream = self.dit.options(stream=True).generate_image.remote(handoff, encoding)
            finished = False
            try:
                async for item in stream:
                    finished = "image" in item
                    if finished:
                        self.metrics.call_done("dit", handoff.task, start)
                    yield item
                    if finished:
                        return
            except Exception as e:
                raise stage_error(e, "dit") from e
            finally:
                if not finished:
                    _cancel(stream)
            if not finished:
                raise OpenAIError("the DiT stage ended without an image", status=500,
                                  type="server_error", code="stage_error")

    async def _retry_wait(self, failures: int, error: StageUnavailable) -> None:
        """Raise `error` once the retries are used up; else count the retry and back off."""
        if failures > MAX_RETRIES:
            raise error
        self.metrics.retry(error.stage)
        logger.warning("retrying a request (%d/%d): %s", failures, MAX_RETRIES, error.message)
        await asyncio.sleep(RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S)) - 1])

    async def prefill_with_retries(self, req: ImageRequest) -> ContextHandoff:
        failures = 0
        while True:
            try:
                return await self.prefill(req)
            except StageUnavailable as e:
                failures += 1
                await self._retry_wait(failures, e)

    async def generate_image(self, req: ImageRequest) -> tuple[dict, ContextHandoff]:
        handoff, failures = None, 0
        while True:
            try:
                if handoff is None:
                    handoff = await self.prefill(req)
                async with aclosing(self.denoise(handoff, req.encoding)) as items:
                    async for item in items:
                        if "image" in item:
                            return item, handoff
                raise AssertionError("unreachable: denoise() raises when no image arrives")
            except StageUnavailable as e:
                failures += 1
                if e.stage == "thinker" or e.handoff_lost:
                    handoff = None   # start again from the prefill
                await self._retry_wait(failures, e)

    async def denoise_video(self, handoff: ContextHandoff, encoding: VideoEncoding | None = None
                            ) -> AsyncIterator[dict]:
        """Progress dicts {"stage": "denoise" | "decode" | "encode", "step", "total"}, then the final
        {"video", "format", "media_type", "width", "height", "num_frames", "fps"}. Leaving early (the
        client went away, a job was deleted) cancels the DiT job: its stream is cancelled, and the
        DiT stage drops the job before its next step or decode chunk."""
        if self.dit is None:
            raise _not_connected()
        start = time.perf_counter()
        with self.metrics.stage_call("dit"):
            stream = self.dit.options(stream=True).generate_video.remote(handoff, encoding)
            finished = False
            try:
                async for item in stream:
                    finished = "video" in item
                    if finished:
                        self.metrics.call_done("dit", handoff.task, start)
                    yield item
                    if finished:
                        return
            except Exception as e:
                raise stage_error(e, "dit") from e
            finally:
                if not finished:
                    stream.cancel()
            if not finished:
                raise OpenAIError("the DiT stage ended without a video", status=500,
                                  type="server_error", code="stage_error")

    async def generate_video(self, req: VideoRequest, on_progress=None
                             ) -> tuple[dict, ContextHandoff]:
        """(the encoded video, the hand-off); `on_progress(stage, step, total)` after every step."""
        handoff = await self.prefill(req)
        async with aclosing(self.denoise_video(handoff, req.encoding)) as items:
            async for item in items:
                if "video" in item:
                    return item, handoff
                if on_progress is not None:
                    on_progress(item.get("stage", "denoise"), item.get("step"), item.get("total"))
        raise AssertionError("unreachable: denoise_video() raises when no video arrives")

    async def generate_text(self, req: TextRequest) -> AsyncIterator[dict]:
        """Token deltas {"text", "token_ids", "finish_reason", "prompt_tokens", ...}."""
        if self.thinker is None:
            raise _not_connected()
        with self.metrics.stage_call("thinker"):
            stream, first = await self._first_text_item(req)
            done = False
            try:
                yield first
                done = first.get("finish_reason") is not None
                async for item in stream:
                    yield item
                    done = item.get("finish_reason") is not None
            except Exception as e:
                raise stage_error(e, "thinker") from e
            finally:
                if not done:
                    _cancel(stream)

    async def _first_text_item(self, req: TextRequest):
        """The thinker's stream and its first item; a dead replica before any output is retried
        (nothing has reached the client yet)."""
        failures = 0
        while True:
            stream = self.thinker.options(stream=True).generate_text.remote(req)
            try:
                with self.metrics.timed("thinker", req.task):
                    return stream, await stream.__anext__()
            except StopAsyncIteration:
                raise OpenAIError("the thinker ended without any output", status=500,
                                  type="server_error", code="stage_error") from None
            except asyncio.CancelledError:
                _cancel(stream)
                raise
            except Exception as e:
                error = stage_error(e, "thinker")
                if not isinstance(error, StageUnavailable):
                    raise error from e
            failures += 1
            await self._retry_wait(failures, error)

    async def check_health(self) -> dict[str, str]:
        """{"thinker": "ok" | reason, "dit": ...}; both stages are asked concurrently."""
        async def one(name, handle):
            if handle is None:
                return name, "not connected"
            try:
                await asyncio.wait_for(handle.check_health.remote(), HEALTH_TIMEOUT_S)
                return name, "ok"
            except asyncio.TimeoutError:
                return name, f"no answer within {HEALTH_TIMEOUT_S:.0f}s"
            except Exception as e:
                return name, f"{type(e).__name__}: {e}"

        results = await asyncio.gather(one("thinker", self.thinker), one("dit", self.dit))
        return {name: client_message(state, 503) for name, state in results}

    async def dit_jobs(self) -> int | None:
        """The denoising jobs held by the DiT replica that answers; None if it does not answer."""
        if self.dit is None:
            return None
        try:
            return await asyncio.wait_for(self.dit.num_jobs.remote(), HEALTH_TIMEOUT_S)
        except Exception:
            return None
