"""HTTP ingress: OpenAI-compatible routes over the thinker and DiT deployments (no model code).

  POST /v1/chat/completions   t2i / image_edit / x2t_image / chat (request_parsing.py routes)
  POST /v1/images/generations OpenAI images API (JSON), b64_json
  POST /v1/images/edits       OpenAI images API (multipart: image + prompt), b64_json
  GET  /v1/models             the served model, its tasks, limits and defaults, and whether it is the
                              tiny random checkpoint
  GET  /health                200 only when both stages answer check_health; the DiT's job count
  GET  /, /playground         the browser playground (serve_app/playground/), a client of the routes above

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
from typing import get_args

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from stages.lance.requests import (DEFAULT_T2I_SIZE, DenoiseParams, ImageRequest, ImageTask, TextRequest,
                                   TextTask)

from . import openai_protocol as oai
from .auth import (PUBLIC_PATHS, APIKeyMiddleware, KeyChecker, protected_routes, resolve_api_keys,
                   warn_if_open)
from .http_limits import RequestLimitMiddleware
from .errors import OpenAIError, bad_request, install_error_handlers, stage_error
from .media import decode_image_bytes, image_base64, image_data_url
from .metrics import StageMetrics
from .pipeline import StagePipeline
from .knobs import RequestLimits
from .request_parsing import form_fields, parse_chat_request, parse_edit_form, parse_generation_json

logger = logging.getLogger("ray.serve")

# The tasks request_parsing routes (`/v1/models` lists them as lance.tasks; clients such as the
# playground offer exactly these).
ROUTED_TASKS = (*get_args(ImageTask), *get_args(TextTask))


@dataclass(frozen=True)
class IngressSettings:
    served_model_name: str
    model_path: str
    tiny_random_weights: bool = False
    stage_graph: str = ""
    request_timeout_s: float = 600.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    tasks: tuple[str, ...] = ROUTED_TASKS
    api_keys: tuple[str, ...] = ()   # the app arg's; LANCE_SERVE_API_KEY is added on the replica

    @property
    def max_body_bytes(self) -> int:
        # one base64 image (4/3 of its bytes) plus generous room for text
        return self.limits.max_image_bytes * 4 // 3 + 4 * 2**20


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


def _lance_notes(task: str, ignored_params: list[str]) -> tuple[dict, dict]:
    """The response's `lance` object and headers: the routed task and the ignored parameters."""
    headers = {oai.IGNORED_PARAMS_HEADER: ", ".join(ignored_params)} if ignored_params else {}
    return oai.lance_extension(task, ignored_params), headers


class LanceService:
    """What the routes do; holds the stage pipeline and the settings."""

    def __init__(self, settings: IngressSettings, thinker=None, dit=None):
        self.settings = settings
        self.metrics = StageMetrics()
        self.pipeline = StagePipeline(thinker, dit, self.metrics)

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
        self._check_model(parsed.model)
        model, req = self.settings.served_model_name, parsed.request
        lance, headers = _lance_notes(parsed.task, parsed.ignored_params)
        timeout = self.settings.request_timeout_s
        if isinstance(req, ImageRequest):
            if parsed.stream:
                # prefill and the DiT's first step before the headers: a 4xx, or a stage that is
                # overloaded (503 + Retry-After), is still an HTTP status, not an event in a 200 stream
                items = None
                try:
                    async with _deadline(timeout):
                        handoff = await self.pipeline.prefill_with_retries(req)
                        items = self.pipeline.denoise(handoff, req.encoding)
                        first = await anext(items)
                except BaseException:
                    if items is not None:
                        await items.aclose()   # stops the DiT job
                    raise
                return self._sse(self._image_events(req, handoff, model, parsed.include_usage, lance,
                                                    items, first), headers)
            results = await self._generate_images(parsed.requests)
            choices = [oai.chat_choice(i, oai.image_content(image_data_url(image)), "stop")
                       for i, (image, _) in enumerate(results)]
            body = oai.chat_completion(req.request_id, model, choices,
                                       self._image_usage([h for _, h in results]), lance)
            return JSONResponse(body, headers=headers)
        if parsed.stream:
            tokens = self.pipeline.generate_text(req)
            async with _deadline(timeout):
                first = await anext(tokens)   # context overflow surfaces here, as a 400
            return self._sse(self._text_events(req, tokens, first, model, parsed.include_usage,
                                               lance, parsed.return_token_ids), headers)
        text, token_ids, finish, last = [], [], "stop", {}
        async with _deadline(timeout), aclosing(self.pipeline.generate_text(req)) as tokens:
            async for item in tokens:
                text.append(item.get("text", ""))
                token_ids.extend(item.get("token_ids", ()))
                finish, last = item.get("finish_reason") or finish, item
        choice = oai.chat_choice(0, "".join(text), finish,
                                 token_ids if parsed.return_token_ids else None)
        body = oai.chat_completion(req.request_id, model, [choice],
                                   oai.usage(last.get("prompt_tokens", 0),
                                             last.get("completion_tokens", 0)), lance)
        return JSONResponse(body, headers=headers)

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
                            lance: dict, items, first: dict):
        rid = req.request_id
        yield oai.chat_chunk(rid, model, {"role": "assistant", "content": ""}, lance=lance)

        async def all_items():
            yield first
            async for item in items:
                yield item

        async with aclosing(items), aclosing(all_items()) as chunks:
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
        parsed = parse_generation_json(await self._read_body(request), self.settings.limits)
        return await self._run_images(parsed)

    async def images_edits(self, request: Request):
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

    async def _generate_images(self, requests: list[ImageRequest]) -> list:
        """(image, handoff) per request, generated concurrently; one failure fails them all."""
        tasks = [asyncio.ensure_future(self.pipeline.generate_image(r)) for r in requests]
        try:
            async with _deadline(self.settings.request_timeout_s):
                return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:   # one failed image fails the request: stop the others
                t.cancel()
            raise

    async def _run_images(self, parsed):
        self._check_model(parsed.model)
        results = await self._generate_images(parsed.requests)
        images = [img for img, _ in results]
        size = f"{images[0]['width']}x{images[0]['height']}"
        lance, headers = _lance_notes(parsed.task, parsed.ignored_params)
        body = oai.images_response([image_base64(img["image"]) for img in images], size,
                                   self._image_usage([h for _, h in results]), lance, images[0]["format"])
        return JSONResponse(body, headers=headers)

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
                      "tasks": list(s.tasks),
                      "limits": {"min_image_side": limits.min_image_side,
                                 "size_multiple": limits.size_multiple,
                                 "max_inference_steps": limits.max_inference_steps,
                                 "max_images_per_request": limits.max_n,
                                 "max_image_bytes": limits.max_image_bytes},
                      "defaults": {"size": f"{DEFAULT_T2I_SIZE}x{DEFAULT_T2I_SIZE}",
                                   "num_inference_steps": denoise.num_inference_steps,
                                   "seed": denoise.seed, "cfg_text_scale": denoise.cfg_text_scale,
                                   "timestep_shift": denoise.timestep_shift,
                                   "cfg_interval": list(denoise.cfg_interval),
                                   "resolution": ImageRequest.resolution,
                                   "max_tokens": text.max_tokens, "temperature": text.temperature}}}]}

    async def health(self):
        stages, dit_jobs = await asyncio.gather(self.pipeline.check_health(),
                                                self.pipeline.dit_jobs())
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


def build_fastapi_app(service: LanceService, api_keys: list[str] | None = None) -> FastAPI:
    """The app; with `api_keys`, every route but auth.PUBLIC_PATHS and the playground's files needs
    one of them."""
    app = FastAPI(title="lance-serve", version="0.1.0")
    install_error_handlers(app)
    # the last added runs first: count_requests (below) -> API keys -> request limits -> routes
    app.add_middleware(RequestLimitMiddleware, max_body_bytes=service.settings.max_body_bytes)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, checker=KeyChecker(api_keys),
                           public_paths=PUBLIC_PATHS | PLAYGROUND_PATHS)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")  # bounded label set
        service.metrics.requests.inc(tags={"route": route, "status": str(response.status_code)})
        return response

    app.post("/v1/chat/completions")(service.chat_completions)
    app.post("/v1/images/generations")(service.images_generations)
    app.post("/v1/images/edits")(service.images_edits)
    app.get("/v1/models")(service.models)
    app.get("/health")(service.health)
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

    def __init__(self, thinker, dit, settings: IngressSettings):
        self.service = LanceService(settings, thinker=thinker, dit=dit)
        self.api_keys = resolve_api_keys(settings.api_keys)   # the replica's env: LANCE_SERVE_API_KEY
        warn_if_open(self.api_keys, _http_host())
        if settings.tiny_random_weights:
            logger.warning("SERVING THE TINY RANDOM-WEIGHTS CHECKPOINT %s: IMAGES WILL BE NOISE",
                           settings.model_path)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi_app(self.service, self.api_keys)
