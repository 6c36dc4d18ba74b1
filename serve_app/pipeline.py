"""The path of a request through the stages: thinker.prefill_context -> dit.generate_image (images) or
dit.generate_video (videos), or thinker.generate_text. Stage exceptions become OpenAI errors here
(errors.stage_error)."""
from __future__ import annotations

import asyncio
import contextvars
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
# Before a retry, the stage must answer check_health: a replica whose engine died stays in place
# until Serve's health check replaces it, and a retry sent to it would fail again at once. The
# request's own deadline bounds the wait too; past this, the retry goes anyway (and may fail).
RETRY_HEALTH_WAIT_S = 300.0
RETRY_HEALTH_POLL_S = 1.0


class RetryCount:
    """Stage calls run again for one HTTP request (the ingress's X-Lance-Retries header)."""

    def __init__(self):
        self.n = 0


# set per HTTP request by the ingress; the stage calls of that request (its tasks too) add to it
REQUEST_RETRIES: contextvars.ContextVar[RetryCount | None] = contextvars.ContextVar(
    "lance_request_retries", default=None)


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

    def denoise(self, handoff: ContextHandoff, encoding: ImageEncoding | None = None) -> AsyncIterator[dict]:
        """Progress dicts {"step", "total"}, then the final {"image", "format", "media_type", "width", "height"}."""
        return self._dit_stream("generate_image", "image", handoff, encoding)

    async def _dit_stream(self, method: str, final_key: str, handoff: ContextHandoff,
                          encoding) -> AsyncIterator[dict]:
        """The DiT's stream of `method`: progress dicts, then the one that carries `final_key`.
        Leaving early (the client went away, a job was deleted) cancels the stream, and the DiT
        stage drops the job before its next step or decode chunk."""
        if self.dit is None:
            raise _not_connected()
        start = time.perf_counter()
        with self.metrics.stage_call("dit"):
            stream = getattr(self.dit.options(stream=True), method).remote(handoff, encoding)
            finished = False
            try:
                async for item in stream:
                    finished = final_key in item
                    if finished:   # before the yield: its consumer closes the stream right after
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
                raise OpenAIError(f"the DiT stage ended without its {final_key}", status=500,
                                  type="server_error", code="stage_error")

    async def _retry_wait(self, failures: int, error: StageUnavailable) -> None:
        """Raise `error` once the retries are used up; else count the retry and back off."""
        if failures > MAX_RETRIES:
            raise error
        self.metrics.retry(error.stage)
        count = REQUEST_RETRIES.get()
        if count is not None:
            count.n += 1
        logger.warning("retrying a request (%d/%d): %s", failures, MAX_RETRIES, error.message)
        await asyncio.sleep(RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S)) - 1])
        # a lost hand-off is made again by the thinker: that is the stage to wait for
        await self._wait_healthy("thinker" if error.handoff_lost else error.stage)

    async def _wait_healthy(self, stage: str) -> None:
        """Until a replica of `stage` answers check_health (a restarted replica: the call waits in
        Serve's queue until it is up), or RETRY_HEALTH_WAIT_S."""
        handle = self.thinker if stage == "thinker" else self.dit
        if handle is None:
            return
        deadline = time.monotonic() + RETRY_HEALTH_WAIT_S
        while True:
            try:
                await asyncio.wait_for(handle.check_health.remote(), HEALTH_TIMEOUT_S)
                return
            except asyncio.TimeoutError:
                pass
            except Exception as e:   # noqa: BLE001 - dead engine, replica starting: try again
                logger.info("waiting for the %s stage before a retry: %s", stage, type(e).__name__)
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(RETRY_HEALTH_POLL_S)

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

    async def start_image_stream(self, req: ImageRequest
                                 ) -> tuple[ContextHandoff, AsyncIterator[dict], dict]:
        """A streamed image up to the DiT's first item (its HTTP headers wait for it): the hand-off,
        the rest of the DiT stream, and that first item. A dead replica before then is retried as
        in generate_image; after it the client has seen progress, and the stream is not retried."""
        handoff, failures = None, 0
        while True:
            items = None
            try:
                if handoff is None:
                    handoff = await self.prefill(req)
                items = self.denoise(handoff, req.encoding)
                return handoff, items, await anext(items)
            except StageUnavailable as e:
                if items is not None:
                    await items.aclose()
                failures += 1
                if e.stage == "thinker" or e.handoff_lost:
                    handoff = None
                await self._retry_wait(failures, e)
            except BaseException:
                if items is not None:
                    await items.aclose()   # stops the DiT job
                raise

    async def image_stream(self, req: ImageRequest, handoff: ContextHandoff,
                           items: AsyncIterator[dict], first: dict) -> AsyncIterator[dict]:
        """`first` and the rest of a streamed image (start_image_stream's). A replica that dies
        after progress reached the client is retried too: the new run's progress is passed on
        only past the step the client has seen, so the client sees one progress sequence, and
        the same image."""
        shown, failures, item = 0, 0, first
        try:
            while True:
                if item is None:
                    try:
                        item = await anext(items)
                    except StopAsyncIteration:
                        return
                    except StageUnavailable as e:
                        await items.aclose()
                        handoff, items, failures = await self._restart_denoise(req, handoff, e, failures)
                        continue
                if "image" in item:
                    yield item
                    return
                if (item.get("step") or 0) > shown:
                    shown = item.get("step") or 0
                    yield item
                item = None
        finally:
            await items.aclose()

    async def _restart_denoise(self, req: ImageRequest, handoff: ContextHandoff,
                               error: StageUnavailable, failures: int):
        """(hand-off, a new DiT stream, failures) after `error`; a new prefill if the thinker
        died or the hand-off's KV went with it. Raises once the retries are used up."""
        while True:
            failures += 1
            await self._retry_wait(failures, error)
            try:
                if error.stage == "thinker" or error.handoff_lost:
                    handoff = await self.prefill(req)
                return handoff, self.denoise(handoff, req.encoding), failures
            except StageUnavailable as e:
                error = e

    def denoise_video(self, handoff: ContextHandoff, encoding: VideoEncoding | None = None
                      ) -> AsyncIterator[dict]:
        """Progress dicts {"stage": "denoise" | "decode" | "encode", "step", "total"}, then the final
        {"video", "format", "media_type", "width", "height", "num_frames", "fps"}."""
        return self._dit_stream("generate_video", "video", handoff, encoding)

    async def generate_video(self, req: VideoRequest, on_progress=None
                             ) -> tuple[dict, ContextHandoff]:
        """(the encoded video, the hand-off); `on_progress(stage, step, total)` after every step.
        A dead replica is retried as in generate_image (progress then starts over, which a job's
        progress, never going back, hides)."""
        handoff, failures = None, 0
        while True:
            try:
                if handoff is None:
                    handoff = await self.prefill(req)
                async with aclosing(self.denoise_video(handoff, req.encoding)) as items:
                    async for item in items:
                        if "video" in item:
                            return item, handoff
                        if on_progress is not None:
                            on_progress(item.get("stage", "denoise"), item.get("step"),
                                        item.get("total"))
                raise AssertionError("unreachable: denoise_video() raises when no video arrives")
            except StageUnavailable as e:
                failures += 1
                if e.stage == "thinker" or e.handoff_lost:
                    handoff = None
                await self._retry_wait(failures, e)

    async def complete_text(self, req: TextRequest) -> list[dict]:
        """Every token delta of a generation that is answered in one piece (not streamed): nothing
        has reached the client until the end, so a thinker that dies at any point is retried from
        the start (same seed, same tokens)."""
        failures = 0
        while True:
            items: list[dict] = []
            try:
                async with aclosing(self.generate_text(req, retries=0)) as tokens:
                    async for item in tokens:
                        items.append(item)
                return items
            except StageUnavailable as e:
                failures += 1
                await self._retry_wait(failures, e)

    async def generate_text(self, req: TextRequest, retries: int = MAX_RETRIES
                            ) -> AsyncIterator[dict]:
        """Token deltas {"text", "token_ids", "finish_reason", "prompt_tokens", ...}. A dead
        thinker is retried (at most `retries` times before the first delta, and as often after
        it): before, the request simply runs again; after, the generation is run again from the
        start and its deltas are passed on from where the caller is (`_replay_text`)."""
        if self.thinker is None:
            raise _not_connected()
        with self.metrics.stage_call("thinker"):
            stream, item = await self._first_text_item(req, retries)
            sent: list[int] = []   # token ids the caller has had
            done, failures = False, 0
            try:
                while True:
                    sent.extend(item.get("token_ids", ()))
                    yield item
                    done = item.get("finish_reason") is not None
                    if done:
                        return
                    try:
                        item = await anext(stream)
                    except StopAsyncIteration:
                        done = True
                        return
                    except Exception as e:
                        error = stage_error(e, "thinker")
                        if not isinstance(error, StageUnavailable) or failures >= retries:
                            raise error from e
                        failures += 1
                        stream, item = await self._replay_text(req, sent, error, failures, retries)
            finally:
                if not done:
                    _cancel(stream)

    async def _replay_text(self, req: TextRequest, sent: list[int], error: StageUnavailable,
                           failures: int, retries: int):
        """Run a generation again after its thinker died mid-stream: (the new stream, its first
        delta past the `sent` tokens). Generation is a function of the request and its seed, so
        the new run repeats the tokens the caller has; they are checked and skipped. A run that
        does not repeat them, or a delta that straddles the point, ends the request with `error`."""
        while True:
            await self._retry_wait(failures, error)
            stream = self.thinker.options(stream=True).generate_text.remote(req)
            replayed: list[int] = []
            try:
                while True:
                    item = await anext(stream)
                    ids = list(item.get("token_ids", ()))
                    if len(replayed) + len(ids) <= len(sent) and item.get("finish_reason") is None:
                        replayed.extend(ids)
                        if replayed != sent[:len(replayed)]:
                            break   # not the same generation
                        continue
                    if len(replayed) == len(sent):
                        return stream, item
                    break   # straddles what was sent, or finished before it
            except StopAsyncIteration:
                pass
            except Exception as e:
                again = stage_error(e, "thinker")
                if not isinstance(again, StageUnavailable) or failures >= retries:
                    _cancel(stream)
                    raise again from e
                failures, error = failures + 1, again
                continue
            _cancel(stream)
            logger.warning("a text stream's retried generation did not repeat its first %d tokens",
                           len(sent))
            raise error

    async def _first_text_item(self, req: TextRequest, retries: int = MAX_RETRIES):
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
                if not isinstance(error, StageUnavailable) or failures >= retries:
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
