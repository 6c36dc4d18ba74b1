"""The path of a request through the stages: thinker.prefill_context -> dit.generate_image, or
thinker.generate_text. Stage exceptions become OpenAI errors here (errors.stage_error)."""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

from stages.lance.handoff import ContextHandoff
from stages.lance.requests import ImageEncoding, ImageRequest, TextRequest

from .errors import OpenAIError, stage_error
from .metrics import StageMetrics

HEALTH_TIMEOUT_S = 10.0


def _not_connected() -> OpenAIError:
    return OpenAIError("the model stages are not connected to this ingress", status=503,
                       type="service_unavailable", code="stage_unavailable")


class StagePipeline:
    """Calls the ThinkerStage and DiTStage deployments through their handles."""

    def __init__(self, thinker: Optional[Any], dit: Optional[Any], metrics: StageMetrics):
        self.thinker, self.dit, self.metrics = thinker, dit, metrics

    async def prefill(self, req: ImageRequest) -> ContextHandoff:
        if self.thinker is None:
            raise _not_connected()
        with self.metrics.stage_call("thinker"), \
                self.metrics.timed(self.metrics.prefill_latency, req.task):
            response = self.thinker.prefill_context.remote(req)
            try:
                handoff = await response
            except asyncio.CancelledError:
                response.cancel()
                raise
            except Exception as e:
                raise stage_error(e, "thinker") from e
        self.metrics.kv_bytes.inc(max(int(handoff.kv_bytes), 0))
        return handoff

    async def denoise(self, handoff: ContextHandoff, encoding: ImageEncoding | None = None) -> AsyncIterator[dict]:
        """Progress dicts {"step", "total"}, then the final {"image", "format", "media_type", "width", "height"}."""
        if self.dit is None:
            raise _not_connected()
        with self.metrics.stage_call("dit"), \
                self.metrics.timed(self.metrics.denoise_latency, handoff.task):
            stream = self.dit.options(stream=True).generate_image.remote(handoff, encoding)
            finished = False
            try:
                async for item in stream:
                    finished = "image" in item
                    yield item
                    if finished:
                        return
            except Exception as e:
                raise stage_error(e, "dit") from e
            finally:
                if not finished:
                    stream.cancel()
            if not finished:
                raise OpenAIError("the DiT stage ended without an image", status=500,
                                  type="server_error", code="stage_error")

    async def generate_image(self, req: ImageRequest) -> tuple[dict, ContextHandoff]:
        handoff = await self.prefill(req)
        async with aclosing(self.denoise(handoff, req.encoding)) as items:
            async for item in items:
                if "image" in item:
                    return item, handoff
        raise AssertionError("unreachable: denoise() raises when no image arrives")

    async def generate_text(self, req: TextRequest) -> AsyncIterator[dict]:
        """Token deltas {"text", "token_ids", "finish_reason", "prompt_tokens", ...}."""
        if self.thinker is None:
            raise _not_connected()
        with self.metrics.stage_call("thinker"):
            stream = self.thinker.options(stream=True).generate_text.remote(req)
            done = False
            try:
                with self.metrics.timed(self.metrics.prefill_latency, req.task):
                    first = await stream.__anext__()
                yield first
                done = first.get("finish_reason") is not None
                async for item in stream:
                    yield item
                    done = item.get("finish_reason") is not None
            except StopAsyncIteration:
                raise OpenAIError("the thinker ended without any output", status=500,
                                  type="server_error", code="stage_error") from None
            except Exception as e:
                raise stage_error(e, "thinker") from e
            finally:
                if not done:
                    stream.cancel()

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
        return dict(results)

    async def dit_jobs(self) -> int | None:
        """The denoising jobs held by the DiT replica that answers; None if it does not answer."""
        if self.dit is None:
            return None
        try:
            return await asyncio.wait_for(self.dit.num_jobs.remote(), HEALTH_TIMEOUT_S)
        except Exception:
            return None
