"""HTTP ingress: OpenAI-compatible routes over the thinker and DiT deployments (no model code).

  POST /v1/chat/completions   t2i / image_edit / x2t_image / chat, t2v / i2v / video_edit / x2t_video
                              (request_parsing.py routes)
  POST /v1/images/generations OpenAI images API (JSON), b64_json
  POST /v1/images/edits       OpenAI images API (multipart: image + prompt), b64_json
  POST /v1/videos             OpenAI Videos API: an async job (JSON or multipart; videos_api.py)
  GET  /v1/videos[/{id}]      list (after, limit, order) / one job
  GET  /v1/videos/{id}/content  the MP4 (variant=thumbnail: the first frame, WebP)
  DELETE /v1/videos/{id}      cancels a running job in both stages, removes its content
  POST /v1/videos/{id}/remix  video_edit of a finished video with a new prompt
  GET  /v1/models             the served model, its tasks, limits and defaults, and whether it is the
                              tiny random checkpoint
  GET  /health                200 only when every stage answers check_health; the DiT job count
  GET  /, /playground         the browser playground (serve_app/playground/), a client of the routes above

A stage graph may serve Lance_3B and Lance_3B_Video, each with its own thinker and DiT (variants.py
picks one per task). Video jobs live in a detached store actor (video_jobs.py), not in the replica.

Streaming (`stream: true`) is SSE in OpenAI's chunk format ending with `data: [DONE]`: text deltas,
or for images chunks with an empty delta and `lance_progress: {step, total}`, then one chunk whose
delta content is the image part. Errors after the stream started arrive as `data: {"error": ...}`.

Every answer says what was done with the request: a `lance` object (`{"task", "ignored_params"}`:
the routed task, and the valid parameters that do not apply to it), in the first chunk of a stream,
and the X-Lance-Ignored-Params header when something was ignored. A chat completion asking for n
images (`n` / `num_outputs_per_prompt`) gets n choices.

`build_fastapi_app(service)` makes the app; `LanceIngress` is the Serve deployment that owns one.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Literal, get_args

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from stages.lance.requests import (DEFAULT_T2I_SIZE, I2V_DEFAULT_FRAMES, T2V_DEFAULT_FRAMES,
                                   T2V_DEFAULT_SIZE, DenoiseParams, ImageRequest, ImageTask, TextRequest, VideoEncoding,
                                   VideoRequest, VideoTask)

from . import openai_protocol as oai
from .api_schema import install_openapi, request_bodies, route_docs
from .auth import (PUBLIC_PATHS, APIKeyMiddleware, KeyChecker, protected_routes, resolve_api_keys,
                   warn_if_open)
from .http_limits import RequestLimitMiddleware
from .errors import OpenAIError, bad_request, install_error_handlers, stage_error
from .media import decode_image_bytes, decode_video_bytes, image_base64, image_data_url, video_data_url
from .metrics import RequestMetricsMiddleware, StageMetrics, note_task
from .pipeline import REQUEST_RETRIES, RetryCount, StagePipeline
from .knobs import RequestLimits
from .request_parsing import form_fields, parse_chat_request, parse_edit_form, parse_generation_json
from .variants import variant_for_task
from .video_jobs import VideoStoreLimits

logger = logging.getLogger("ray.serve")

# The tasks request_parsing routes (`/v1/models` lists them as lance.tasks; clients such as the
# playground offer exactly these).
ROUTED_TASKS = (*get_args(ImageTask), "x2t_image", "chat")
VIDEO_ROUTED_TASKS = (*get_args(VideoTask), "x2t_video")   # with Lance_3B_Video served


def served_tasks(variants: tuple[str, ...]) -> tuple[str, ...]:
    """Every variant does the image tasks; the video tasks need Lance_3B_Video (variants.py)."""
    from .variants import VIDEO_VARIANT
    return ROUTED_TASKS + (VIDEO_ROUTED_TASKS if VIDEO_VARIANT in variants else ())


@dataclass(frozen=True)
class IngressSettings:
    served_model_name: str
    model_path: str
    tiny_random_weights: bool = False
    stage_graph: str = ""
    request_timeout_s: float = 600.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    variants: tuple[str, ...] = ("Lance_3B",)     # served checkpoint variants, in stage order
    video_store: VideoStoreLimits = field(default_factory=VideoStoreLimits)
    tasks: tuple[str, ...] | None = None          # None: those of the served variants
    api_keys: tuple[str, ...] = ()   # the app arg's; LANCE_SERVE_API_KEY is added on the replica

    @property
    def max_body_bytes(self) -> int:
        # one base64 image or video (4/3 of its bytes) plus generous room for text
        return max(self.limits.max_image_bytes, self.limits.max_video_bytes) * 4 // 3 + 4 * 2**20


def _timeout_error(seconds: float) -> OpenAIError:
    return OpenAIError(f"the request did not finish within {seconds:.0f}s", status=504,
                       type="timeout", code="timeout")


@asynccontextmanager
async def _deadline(seconds: float):
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise _timeout_error(seconds) from None


def _video_notes(lance: dict, video: dict) -> dict:
    """The lance object of a finished video: also its frame count, frame rate and size."""
    return dict(lance, num_frames=video.get("num_frames"), fps=video.get("fps"),
                size=f"{video.get('width')}x{video.get('height')}")


def _store_result(result: dict) -> dict:
    """A VideoJobStore answer, or the OpenAI error it carries."""
    if "http_status" in result:
        err = result["error"]
        raise OpenAIError(err["message"], status=result["http_status"], type=err.get("type") or
                          "invalid_request_error", param=err.get("param"), code=err.get("code"))
    return result


def _validated_json(model_cls, raw: bytes):
    from pydantic import ValidationError

    from .errors import validation_error
    try:
        return model_cls.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None


def _lance_notes(task: str, ignored_params: list[str]) -> tuple[dict, dict]:
    """The response's `lance` object and headers: the routed task and the ignored parameters."""
    headers = {oai.IGNORED_PARAMS_HEADER: ", ".join(ignored_params)} if ignored_params else {}
    return oai.lance_extension(task, ignored_params), headers


class LanceService:
    """What the routes do; holds the stage pipeline and the settings."""

    def __init__(self, settings: IngressSettings, thinker=None, dit=None,
                 other_variants: dict | None = None, video_store=None):
        """`thinker`, `dit`: the first served variant's stages; `other_variants`: {variant: (thinker,
        dit)} of the others; `video_store`: the VideoJobStore actor (None: /v1/videos is a 503)."""
        self.settings = settings
        self.metrics = StageMetrics()
        self.pipeline = StagePipeline(thinker, dit, self.metrics)
        self.pipelines = {settings.variants[0]: self.pipeline}
        for variant in settings.variants[1:]:
            t, d = (other_variants or {}).get(variant, (None, None))   # None: not connected (503)
            self.pipelines[variant] = StagePipeline(t, d, self.metrics)
        self.video_store = video_store

    def pipeline_for(self, task: str, param: str | None = "modalities") -> StagePipeline:
        variant = variant_for_task(task, tuple(self.pipelines), self.settings.stage_graph, param)
        return self.pipelines[variant]

    # -- helpers ------------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        s = self.settings
        if model and model not in (s.served_model_name, s.model_path):
            raise OpenAIError(f"model {model!r} is not served here; this server serves "
                              f"{s.served_model_name!r}", status=404, type="not_found_error",
                              param="model", code="model_not_found")

    def _check_body_size(self, size: int) -> None:
        limit = self.settings.max_body_bytes
        if size > limit:
            raise OpenAIError(f"the request body is larger than {limit} bytes", status=413,
                              code="request_too_large")

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            self._check_body_size(int(declared))
        body = await request.body()
        self._check_body_size(len(body))
        return body

    def _image_usage(self, handoffs) -> dict:
        return oai.usage(sum(h.cond.context_len for h in handoffs),
                         sum(h.num_target_tokens for h in handoffs))

    # -- /v1/chat/completions -----------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        parsed = await parse_chat_request(await self._read_body(request), self.settings.limits)
        note_task(request, parsed.task)
        self._check_model(parsed.model)
        model, req = self.settings.served_model_name, parsed.request
        lance, headers = _lance_notes(parsed.task, parsed.ignored_params)
        timeout = self.settings.request_timeout_s
        pipeline = self.pipeline_for(parsed.task)
        if isinstance(req, VideoRequest):
            return await self._chat_video(req, pipeline, parsed, model, lance, headers)
        if isinstance(req, ImageRequest):
            if parsed.stream:
                # prefill and the DiT's first step before the headers: a 4xx, or a stage that is
                # overloaded (503 + Retry-After), is still an HTTP status, not an event in a 200 stream
                async with _deadline(timeout):
                    handoff, items, first = await pipeline.start_image_stream(req)
                return self._sse(self._image_events(req, handoff, model, parsed.include_usage, lance,
                                                    pipeline.image_stream(req, handoff, items, first)),
                                 headers)
            results = await self._generate_images(parsed.requests, pipeline)
            choices = [oai.chat_choice(i, oai.image_content(image_data_url(image)), "stop")
                       for i, (image, _) in enumerate(results)]
            body = oai.chat_completion(req.request_id, model, choices,
                                       self._image_usage([h for _, h in results]), lance)
            return JSONResponse(body, headers=headers)
        if parsed.stream:
            tokens = pipeline.generate_text(req)
            async with _deadline(timeout):
                first = await anext(tokens)   # context overflow surfaces here, as a 400
            return self._sse(self._text_events(req, tokens, first, model, parsed.include_usage,
                                               lance, parsed.return_token_ids), headers)
        text, token_ids, finish, last = [], [], "stop", {}
        async with _deadline(timeout):
            items = await pipeline.complete_text(req)   # retried whole if the thinker dies
        for item in items:
            text.append(item.get("text", ""))
            token_ids.extend(item.get("token_ids", ()))
            finish, last = item.get("finish_reason") or finish, item
        choice = oai.chat_choice(0, "".join(text), finish,
                                 token_ids if parsed.return_token_ids else None)
        body = oai.chat_completion(req.request_id, model, [choice],
                                   oai.usage(last.get("prompt_tokens", 0),
                                             last.get("completion_tokens", 0)), lance)
        return JSONResponse(body, headers=headers)

    async def _chat_video(self, req: VideoRequest, pipeline: StagePipeline, parsed, model: str,
                          lance: dict, headers: dict):
        timeout = self.settings.request_timeout_s
        if parsed.stream:
            async with _deadline(timeout):
                handoff = await pipeline.prefill_with_retries(req)   # errors here are still 4xx
            return self._sse(self._video_events(req, handoff, model, parsed.include_usage, lance,
                                                pipeline), headers)
        async with _deadline(timeout):
            video, handoff = await pipeline.generate_video(req)
        url = await asyncio.to_thread(video_data_url, video)   # MBs of base64: off the event loop
        choice = oai.chat_choice(0, oai.video_content(url), "stop")
        body = oai.chat_completion(req.request_id, model, [choice],
                                   self._image_usage([handoff]), _video_notes(lance, video))
        return JSONResponse(body, headers=headers)

    async def _video_events(self, req: VideoRequest, handoff, model: str, include_usage: bool,
                            lance: dict, pipeline: StagePipeline):
        """Progress chunks of every phase ({stage: denoise | decode | encode, step, total}), then
        the video part; the video's frame count and fps ride in the last chunk's lance object."""
        rid = req.request_id
        yield oai.chat_chunk(rid, model, {"role": "assistant", "content": ""}, lance=lance)
        async with aclosing(pipeline.denoise_video(handoff, req.encoding)) as items:
            async for item in items:
                if "video" in item:
                    url = await asyncio.to_thread(video_data_url, item)
                    yield oai.chat_chunk(rid, model, {"content": oai.video_content(url)},
                                         lance=_video_notes(lance, item))
                else:
                    yield oai.chat_chunk(rid, model, {}, lance_progress={
                        "stage": item.get("stage", "denoise"), "step": item.get("step"),
                        "total": item.get("total")})
        yield oai.chat_chunk(rid, model, {}, finish_reason="stop")
        if include_usage:
            yield oai.usage_chunk(rid, model, self._image_usage([handoff]))

    def _sse(self, events, headers: dict) -> StreamingResponse:
        # A client that goes away (the playground's Stop) makes Serve cancel this request: closing
        # `events` cancels the stage call under it, and the DiT drops the job before its next step.
        timeout = self.settings.request_timeout_s

        async def body():
            deadline = time.monotonic() + timeout
            async with aclosing(events) as chunks:
                try:
                    while True:
                        try:
                            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                                chunk = await anext(chunks)
                        except StopAsyncIteration:
                            break
                        yield oai.sse(chunk)
                except TimeoutError:   # headers are sent: errors go into the stream
                    yield oai.sse(_timeout_error(timeout).body())
                except OpenAIError as e:
                    yield oai.sse(e.body())
                except Exception as e:
                    yield oai.sse(stage_error(e, "stream").body())
            yield oai.SSE_DONE
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **headers})

    async def _image_events(self, req: ImageRequest, handoff, model: str, include_usage: bool,
                            lance: dict, items):
        rid = req.request_id
        yield oai.chat_chunk(rid, model, {"role": "assistant", "content": ""}, lance=lance)
        async with aclosing(items) as chunks:
            async for item in chunks:
                if "image" in item:
                    yield oai.chat_chunk(rid, model, {"content": oai.image_content(
                        image_data_url(item))})
                else:
                    yield oai.chat_chunk(rid, model, {}, lance_progress={
                        "step": item.get("step"), "total": item.get("total")})
        yield oai.chat_chunk(rid, model, {}, finish_reason="stop")
        if include_usage:
            yield oai.usage_chunk(rid, model, self._image_usage([handoff]))

    async def _text_events(self, req, tokens, first: dict, model: str, include_usage: bool,
                           lance: dict, return_token_ids: bool = False):
        rid, last = req.request_id, first
        yield oai.chat_chunk(rid, model, {"role": "assistant", "content": ""}, lance=lance)
        async with aclosing(tokens):
            item = first
            while True:
                ids = list(item.get("token_ids", ())) if return_token_ids else None
                if item.get("text") or ids:
                    yield oai.chat_chunk(rid, model, {"content": item.get("text", "")},
                                         token_ids=ids)
                last = item
                if item.get("finish_reason"):
                    break
                try:
                    item = await anext(tokens)
                except StopAsyncIteration:
                    break
        yield oai.chat_chunk(rid, model, {}, finish_reason=last.get("finish_reason") or "stop")
        if include_usage:
            yield oai.usage_chunk(rid, model, oai.usage(last.get("prompt_tokens", 0),
                                                        last.get("completion_tokens", 0)))

    # -- /v1/images/* -------------------------------------------------------------------------------
    async def images_generations(self, request: Request):
        note_task(request, "t2i")
        parsed = parse_generation_json(await self._read_body(request), self.settings.limits)
        return await self._run_images(parsed)

    async def images_edits(self, request: Request):
        note_task(request, "image_edit")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("send the edit as multipart/form-data with fields image and prompt",
                              code="invalid_content_type")
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            self._check_body_size(int(declared))
        async with request.form(max_files=8, max_fields=200) as form:
            texts, files = [], []
            for key, value in form.multi_items():
                if isinstance(value, str):
                    texts.append((key, value))
                else:
                    files.append((key, value))
            image = await self._edit_image(files)
        parsed = parse_edit_form(form_fields(texts), image, self.settings.limits)
        return await self._run_images(parsed)

    async def _edit_image(self, files):
        if any(key == "mask" for key, _ in files):
            raise bad_request("masks are not supported: Lance edits follow the text instruction",
                              param="mask", code="unsupported_parameter")
        unknown = [key for key, _ in files if key not in ("image", "image[]")]
        if unknown:
            raise bad_request(f"unexpected file field {unknown[0]!r}; send the image as 'image'",
                              param=unknown[0], code="unknown_parameter")
        if not files:
            raise bad_request("the edit needs an image file field 'image'", param="image",
                              code="missing_required_parameter")
        limit = self.settings.limits
        if len(files) > limit.max_input_images:
            raise bad_request(f"{len(files)} images were sent; at most {limit.max_input_images}",
                              param="image", code="too_many_images")
        data = await files[0][1].read(limit.max_image_bytes + 1)
        if len(data) > limit.max_image_bytes:
            raise bad_request(f"the image is larger than {limit.max_image_bytes} bytes",
                              param="image", code="image_too_large")
        return decode_image_bytes(data, "image")

    async def _generate_images(self, requests: list[ImageRequest], pipeline: StagePipeline) -> list:
        """(image, handoff) per request, generated concurrently; one failure fails them all."""
        tasks = [asyncio.ensure_future(pipeline.generate_image(r)) for r in requests]
        try:
            async with _deadline(self.settings.request_timeout_s):
                return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:   # one failed image fails the request: stop the others
                t.cancel()
            raise

    async def _run_images(self, parsed):
        self._check_model(parsed.model)
        results = await self._generate_images(parsed.requests, self.pipeline_for(parsed.task, None))
        images = [img for img, _ in results]
        size = f"{images[0]['width']}x{images[0]['height']}"
        lance, headers = _lance_notes(parsed.task, parsed.ignored_params)
        body = oai.images_response([image_base64(img["image"]) for img in images], size,
                                   self._image_usage([h for _, h in results]), lance,
                                   images[0]["format"])
        return JSONResponse(body, headers=headers)

    # -- /v1/videos ----------------------------------------------------------------------------------
    def _store(self):
        if self.video_store is None:
            raise OpenAIError("the video job store is not available on this server", status=503,
                              type="service_unavailable", code="video_store_unavailable")
        return self.video_store

    async def _call_store(self, method: str, *args) -> dict:
        from .errors import stage_error
        try:
            result = await getattr(self._store(), method).remote(*args)
        except OpenAIError:
            raise
        except Exception as e:
            raise stage_error(e, "video store") from e
        return _store_result(result)

    async def videos_create(self, request: Request):
        from .videos_api import VideoCreateRequest, parse_video_create, validated_create
        limits = self.settings.limits
        image = video = None
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            declared = request.headers.get("content-length", "")
            if declared.isdigit():
                self._check_body_size(int(declared))
            async with request.form(max_files=4, max_fields=200) as form:
                texts, files = [], []
                for key, value in form.multi_items():
                    (texts if isinstance(value, str) else files).append((key, value))
                image, video = await self._reference_upload(files)
            fields = form_fields(texts)
            req = validated_create(fields)
            from_form = True
        else:
            req = _validated_json(VideoCreateRequest, await self._read_body(request))
            from_form = False
            if req.input_reference is not None:
                image = await self._reference_json(req.input_reference)
        self._check_model(req.model)
        parsed = parse_video_create(req, image, video, limits, from_form=from_form,
                                    reserved=("input_reference",))
        note_task(request, parsed.task)
        return await self._submit_video(parsed, param="model")

    async def _reference_upload(self, files):
        unknown = [key for key, _ in files if key != "input_reference"]
        if unknown:
            raise bad_request(f"unexpected file field {unknown[0]!r}; send the reference as "
                              "'input_reference'", param=unknown[0], code="unknown_parameter")
        if not files:
            return None, None
        if len(files) > 1:
            raise bad_request("send one input_reference", param="input_reference",
                              code="too_many_images")
        upload = files[0][1]
        limits = self.settings.limits
        is_video = (upload.content_type or "").startswith("video/")
        cap = limits.max_video_bytes if is_video else limits.max_image_bytes
        data = await upload.read(cap + 1)
        if len(data) > cap:
            raise bad_request(f"input_reference is larger than {cap} bytes", param="input_reference",
                              code="image_too_large")
        if is_video:   # a video reference: video_edit
            return None, await asyncio.to_thread(decode_video_bytes, data, "input_reference")
        return decode_image_bytes(data, "input_reference"), None

    async def _reference_json(self, ref: dict):
        from .chat_messages import InputImage, load_image
        if "file_id" in ref:
            raise bad_request("file ids are not served (no Files API): send input_reference as "
                              "{\"image_url\": \"data:image/png;base64,...\"} or upload it as a file",
                              param="input_reference.file_id", code="unsupported_parameter")
        url = ref.get("image_url")
        if not isinstance(url, str):
            raise bad_request("input_reference must be {\"image_url\": \"data:image/...\"} in JSON, "
                              "or a file in multipart/form-data", param="input_reference",
                              code="invalid_value")
        return await load_image(InputImage(url, "input_reference.image_url", 0),
                                self.settings.limits)

    async def _submit_video(self, parsed, param: str | None = None, remix_of: str | None = None):
        from .variants import variant_for_task
        variant = variant_for_task(parsed.task, tuple(self.pipelines), self.settings.stage_graph,
                                   param)
        lance = oai.lance_extension(parsed.task, parsed.ignored_params)
        obj = await self._call_store("create", parsed.request, variant,
                                     self.settings.served_model_name, parsed.size, parsed.seconds,
                                     lance, remix_of)
        headers = {oai.IGNORED_PARAMS_HEADER: ", ".join(parsed.ignored_params)} \
            if parsed.ignored_params else {}
        return JSONResponse(obj, headers=headers)

    async def videos_get(self, video_id: str):
        return await self._call_store("get", video_id)

    # The query parameters' types and bounds are FastAPI's (so /openapi.json states them); a value
    # outside them is a 400 naming the parameter (errors.validation_error).
    async def videos_list(self, after: str | None = None,
                          limit: Annotated[int, Query(ge=1, le=100)] = 20,
                          order: Literal["asc", "desc"] = "desc"):
        return await self._call_store("list", after, limit, order)

    async def videos_content(self, video_id: str,
                             variant: Annotated[Literal["video", "thumbnail"], Query(
                                 description="video: the MP4; thumbnail: the first frame (WebP)"
                             )] = "video"):
        from fastapi.responses import Response
        result = await self._call_store("content", video_id, variant)
        return Response(result["content"], media_type=result["media_type"])

    async def videos_delete(self, video_id: str):
        return await self._call_store("delete", video_id)

    async def videos_remix(self, video_id: str, request: Request):
        from .videos_api import VideoCreateRequest, parse_video_create
        req = _validated_json(VideoCreateRequest, await self._read_body(request))
        if req.input_reference is not None:   # was dropped without a word
            raise bad_request("a remix edits the finished video: leave input_reference out (or "
                              "create a new video with it)", param="input_reference",
                              code="unsupported_parameter")
        self._check_model(req.model)
        source = await self._call_store("remix_source", video_id)
        clip = await asyncio.to_thread(decode_video_bytes, source["content"], "video_id")
        parsed = parse_video_create(req, None, clip, self.settings.limits, from_form=False)
        note_task(request, parsed.task)
        return await self._submit_video(parsed, param="video_id", remix_of=video_id)

    # -- /v1/models, /health ------------------------------------------------------------------------
    async def models(self):
        s, limits = self.settings, self.settings.limits
        denoise, text = DenoiseParams(), TextRequest(task="chat", turns=[])
        return {"object": "list", "data": [{
            "id": s.served_model_name, "object": "model", "created": 0, "owned_by": "lance-serve",
            "root": s.model_path,
            "lance": {"tiny_random_weights": s.tiny_random_weights, "stage_graph": s.stage_graph,
                      "max_image_side": limits.max_image_side,
                      "max_model_len": limits.max_new_tokens,
                      "tasks": list(s.tasks or served_tasks(s.variants)),
                      "variants": list(s.variants),
                      "limits": {"min_image_side": limits.min_image_side,
                                 "size_multiple": limits.size_multiple,
                                 "max_inference_steps": limits.max_inference_steps,
                                 "max_images_per_request": limits.max_n,
                                 "max_image_bytes": limits.max_image_bytes,
                                 "max_num_frames": limits.max_num_frames,
                                 "max_video_bytes": limits.max_video_bytes},
                      "defaults": {"size": f"{DEFAULT_T2I_SIZE}x{DEFAULT_T2I_SIZE}",
                                   "num_inference_steps": denoise.num_inference_steps,
                                   "seed": denoise.seed, "cfg_text_scale": denoise.cfg_text_scale,
                                   "timestep_shift": denoise.timestep_shift,
                                   "cfg_interval": list(denoise.cfg_interval),
                                   "resolution": ImageRequest.resolution,
                                   "max_tokens": text.max_tokens, "temperature": text.temperature,
                                   "video_size": f"{T2V_DEFAULT_SIZE[1]}x{T2V_DEFAULT_SIZE[0]}",
                                   "num_frames": T2V_DEFAULT_FRAMES,
                                   "i2v_num_frames": I2V_DEFAULT_FRAMES,
                                   "fps": VideoEncoding.fps,
                                   "video_resolution": VideoRequest.resolution}}}]}

    async def health(self):
        stages: dict[str, str] = {}
        checks = await asyncio.gather(*(p.check_health() for p in self.pipelines.values()),
                                      *(p.dit_jobs() for p in self.pipelines.values()))
        n = len(self.pipelines)
        for i, (variant, result) in enumerate(zip(self.pipelines, checks[:n])):
            for name, state in result.items():
                stages[name if i == 0 else f"{name}@{variant}"] = state   # k8s_render.stage_key
        counts = [c for c in checks[n:] if c is not None]
        dit_jobs = sum(counts) if counts else None
        if all(v == "ok" for v in stages.values()):
            return {"status": "ok", "stages": stages, "dit_jobs": dit_jobs}
        bad = ", ".join(f"{k}: {v}" for k, v in stages.items() if v != "ok")
        err = OpenAIError(f"not ready ({bad})", status=503, type="service_unavailable",
                          code="not_ready")
        return JSONResponse(dict(err.body(), stages=stages, dit_jobs=dit_jobs), status_code=503)


# The playground's files (package data): name -> media type. Read once; served with a policy that
# lets the page talk only to this server (no CDN, nothing fetched from elsewhere).
PLAYGROUND_FILES = {"index.html": "text/html; charset=utf-8",
                    "app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PLAYGROUND_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "media-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff"}
# Public under API keys: the page asks the user for the key itself, so loading it must not need one.
# Exact paths only (an unknown /playground/... file still needs a key, like every other path).
PLAYGROUND_PATHS = frozenset({"/", "/playground", "/playground/",
                              *(f"/playground/{name}" for name in PLAYGROUND_FILES)})


def add_playground_routes(app: FastAPI) -> None:
    folder = resources.files("serve_app") / "playground"
    files = {name: folder.joinpath(name).read_bytes() for name in PLAYGROUND_FILES}

    def serve_file(name: str) -> Response:
        return Response(files[name], media_type=PLAYGROUND_FILES[name], headers=PLAYGROUND_HEADERS)

    async def page():
        return serve_file("index.html")

    async def asset(name: str):
        if name not in files:
            raise OpenAIError(f"no playground file {name!r}", status=404, type="not_found_error",
                              code="not_found")
        return serve_file(name)

    app.get("/", include_in_schema=False)(page)
    app.get("/playground", include_in_schema=False)(page)
    app.get("/playground/{name}", include_in_schema=False)(asset)


class RetryHeaderMiddleware:
    """ASGI middleware: a response whose request was run again on a stage (a replica died under
    it) says how often in `X-Lance-Retries`; the output is the same as an undisturbed run's."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        count = RetryCount()
        token = REQUEST_RETRIES.set(count)

        async def send_with_count(message):
            if message["type"] == "http.response.start" and count.n:
                message = dict(message, headers=[*message.get("headers", ()),
                                                 (b"x-lance-retries", str(count.n).encode())])
            await send(message)

        try:
            await self.app(scope, receive, send_with_count)
        finally:
            REQUEST_RETRIES.reset(token)


def build_fastapi_app(service: LanceService, api_keys: list[str] | None = None) -> FastAPI:
    """The app; with `api_keys`, every route but auth.PUBLIC_PATHS and the playground's files needs
    one of them."""
    app = FastAPI(title="lance-serve", version="0.1.0")
    install_error_handlers(app)
    # the last added runs first: request metrics -> API keys -> request limits -> routes
    app.add_middleware(RequestLimitMiddleware, max_body_bytes=service.settings.max_body_bytes)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, checker=KeyChecker(api_keys),
                           public_paths=PUBLIC_PATHS | PLAYGROUND_PATHS)
    app.add_middleware(RequestMetricsMiddleware, router=app.router)

    app.add_middleware(RetryHeaderMiddleware)   # outermost: its count covers the whole request

    # /openapi.json: every route's bodies, parameters and errors (api_schema.py)
    bodies = request_bodies(service.settings.limits)
    docs = route_docs(bodies, api_keys=bool(api_keys))
    for method, path, handler in (
            ("POST", "/v1/chat/completions", service.chat_completions),
            ("POST", "/v1/images/generations", service.images_generations),
            ("POST", "/v1/images/edits", service.images_edits),
            ("POST", "/v1/videos", service.videos_create),
            ("GET", "/v1/videos", service.videos_list),
            ("GET", "/v1/videos/{video_id}", service.videos_get),
            ("GET", "/v1/videos/{video_id}/content", service.videos_content),
            ("DELETE", "/v1/videos/{video_id}", service.videos_delete),
            ("POST", "/v1/videos/{video_id}/remix", service.videos_remix),
            ("GET", "/v1/models", service.models),
            ("GET", "/health", service.health)):
        app.add_api_route(path, handler, methods=[method], **docs[(method, path)])
    install_openapi(app, bodies, api_keys=bool(api_keys))
    add_playground_routes(app)
    if api_keys:
        logger.info("lance-serve: %d API key(s); routes needing one: %s", len(api_keys),
                    ", ".join(protected_routes(app, PUBLIC_PATHS | PLAYGROUND_PATHS)))
    return app


def _http_host() -> str | None:
    """Where Serve's HTTP proxies listen (http_options.host), if the controller says."""
    try:
        from ray.serve.context import _get_global_client
        return _get_global_client().http_config.host
    except Exception:
        return None


@serve.ingress()
class LanceIngress:
    """Serve deployment owning the FastAPI app; the app is built on the replica (late-bound)."""

    def __init__(self, thinker, dit, settings: IngressSettings, other_variants: dict | None = None):
        from .video_jobs import get_video_store
        app_name = serve.get_replica_context().app_name
        store = get_video_store(app_name, settings.video_store)
        stages = {settings.variants[0]: (thinker, dit), **(other_variants or {})}
        store.attach.remote(stages)   # the handles its jobs run on (idempotent, every replica)
        self.service = LanceService(settings, thinker=thinker, dit=dit,
                                    other_variants=other_variants, video_store=store)
        self.api_keys = resolve_api_keys(settings.api_keys)   # the replica's env: LANCE_SERVE_API_KEY
        warn_if_open(self.api_keys, _http_host())
        if settings.tiny_random_weights:
            logger.warning("SERVING THE TINY RANDOM-WEIGHTS CHECKPOINT %s: IMAGES WILL BE NOISE",
                           settings.model_path)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi_app(self.service, self.api_keys)
