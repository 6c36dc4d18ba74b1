"""OpenAI-style errors: every failure leaves the ingress as {"error": {message, type, param, code}}.

Request problems are 4xx; a stage that is gone or overloaded is 503, a request that ran past its
deadline 504. A 500 is only ever a bug in our own code, and it still carries the OpenAI body.
"""
from __future__ import annotations

import logging
import re
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")


MAX_MESSAGE_CHARS = 2000   # error bodies stay far below 32 kB whatever an exception says
# absolute file paths (/a/b..., C:\\a\\b...) and traceback lines: never shown to a client
_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.@+~-]+){2,}/?|\b[A-Za-z]:\\[^\s'\"]+")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):.*", re.DOTALL)


def client_message(message: str, status: int) -> str:
    """What a client may see of a message: short, and for server errors without paths or
    tracebacks (the full text goes to the log)."""
    message = str(message)
    if status >= 500:
        message = _PATH.sub("<path>", _TRACEBACK.sub("(traceback in the server log)", message))
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 16] + " ... (truncated)"
    return message


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer (OpenAIError.body)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class OpenAIError(Exception):
    """An error that is returned to the client as an OpenAI error body."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        message = client_message(message, status)
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class StageUnavailable(OpenAIError):
    """A stage replica died or is unreachable: the request may be retried (generation is a pure
    function of the request and its seed). `handoff_lost`: the context hand-off is gone with the
    thinker replica that owned it, so a retry starts from the prefill."""

    def __init__(self, stage: str, reason: str, handoff_lost: bool = False):
        super().__init__(f"the {stage} stage is unavailable ({reason}); retry later", status=503,
                         type="service_unavailable", code="stage_unavailable")
        self.stage, self.handoff_lost = stage, handoff_lost


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, status=400, param=param, code=code)


def _loc_to_param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def _openai_code(pydantic_type: str) -> str:
    if pydantic_type in ("unknown_key", "extra_forbidden"):
        return "unknown_parameter"
    if pydantic_type == "missing":
        return "missing_required_parameter"
    if pydantic_type.endswith(("_type", "_parsing")) or pydantic_type in ("union_tag_invalid",
                                                                           "model_attributes_type"):
        return "invalid_type"
    return "invalid_value"


def validation_error(exc: Exception) -> OpenAIError:
    """Reshape a pydantic/FastAPI validation error (its first problem) into a 400."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return bad_request(str(exc))
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                           code="invalid_json")
    loc = list(first.get("loc", ()))
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "unknown_key":   # StrictModel: the offending key is the parameter
        loc.append(first["ctx"]["key"])
        text = msg
    else:
        text = f"{_loc_to_param(loc)}: {msg}" if _loc_to_param(loc) else msg
    more = len(errors) - 1
    if more:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return bad_request(text, param=_loc_to_param(loc), code=_openai_code(first.get("type", "")))


# -- errors raised by the stages ------------------------------------------------------------------

def _exception_chain(exc: BaseException):
    """The exception and its causes; a RayTaskError is skipped for the exception it carries
    (its own str() is the remote traceback, not the message)."""
    from ray.exceptions import RayTaskError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
            exc = exc.cause
            continue
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_vllm_client_error(exc: BaseException) -> bool:
    # vLLM classifies request problems as VLLMClientError (e.g. prompt longer than max_model_len).
    # Checked through sys.modules: if the class was never imported, no such exception arrived.
    mod = sys.modules.get("vllm.exceptions")
    return mod is not None and isinstance(exc, mod.VLLMClientError)


def _is_vllm_engine_dead(exc: BaseException) -> bool:
    # the replica's vLLM engine died under the request: the replica is as good as dead (its
    # check_health fails, Serve replaces it), so the request may be retried
    mod = sys.modules.get("vllm.v1.engine.exceptions")
    return mod is not None and isinstance(exc, mod.EngineDeadError)


def stage_error(exc: BaseException, stage: str) -> OpenAIError:
    """Map an exception raised by (or on the way to) a stage to the error the client gets.

    Request problems: the thinker's ContextTooLongError, any stage exception with `http_status`
    (4xx) and optional `param`/`code` (e.g. the DiT's DiTRequestError), and vLLM's VLLMClientError.
    """
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    from stages.thinker.errors import ContextTooLongError, KVExportError  # plain classes, no vLLM

    for e in _exception_chain(exc):
        if isinstance(e, ContextTooLongError):
            return bad_request(str(e), param="messages", code="context_length_exceeded")
        if isinstance(e, KVExportError):   # the context's KV never reached the DiT: transient
            return OpenAIError(f"the context hand-off failed ({e}); retry", status=503,
                               type="service_unavailable", code="kv_handoff_failed")
        status = getattr(e, "http_status", None)
        if isinstance(status, int) and 400 <= status < 500:
            return OpenAIError(str(getattr(e, "message", None) or e), status=status,
                               param=getattr(e, "param", None),
                               code=getattr(e, "code", None) or "invalid_request")
        if _is_vllm_client_error(e):
            msg = str(e)
            code = "context_length_exceeded" if "maximum model length" in msg else "invalid_request"
            return bad_request(msg, param="messages", code=code)
    if isinstance(exc, serve_exc.BackPressureError):
        return OpenAIError(f"the {stage} stage is overloaded; retry later", status=503,
                           type="server_overloaded", code="overloaded")
    if isinstance(exc, (serve_exc.DeploymentUnavailableError, ray_exc.RayActorError,
                        ray_exc.ActorUnavailableError)) and not isinstance(exc, ray_exc.RayTaskError):
        return StageUnavailable(stage, type(exc).__name__)   # the stage's replica itself
    for e in _exception_chain(exc):
        # the context's KV objects died with their owner (the thinker replica that put them)
        if isinstance(e, ray_exc.ObjectLostError):
            return StageUnavailable(stage, type(e).__name__, handoff_lost=True)
        if isinstance(e, (ray_exc.RayActorError, ray_exc.ActorUnavailableError)):
            # an actor the stage's call depended on died (the thinker's export registry, or for
            # the DiT what Serve calls an upstream crash: the hand-off's owner): a new prefill
            return StageUnavailable(stage, type(e).__name__, handoff_lost=True)
        if _is_vllm_engine_dead(e):
            return StageUnavailable(stage, "its engine died")
    logger.error("%s stage failed", stage, exc_info=exc)
    root = next(_exception_chain(exc), exc)   # the stage's own exception, not Ray's traceback
    return OpenAIError(f"the {stage} stage failed: {type(root).__name__}: {root}", status=500,
                       type="server_error", code="stage_error")


def _allowed_methods(request: Request) -> str:
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= route.methods
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    async def on_openai_error(_: Request, exc: OpenAIError):
        return exc.response()

    async def on_validation_error(_: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    async def on_http_error(request: Request, exc: StarletteHTTPException):
        err_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = OpenAIError(str(exc.detail), status=exc.status_code, type=err_type).response()
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:   # RFC 9110: Allow lists every method of the path, not only
            response.headers["Allow"] = _allowed_methods(request)   # the first route's
        return response

    async def on_bug(_: Request, exc: Exception):
        logger.exception("unhandled error in the ingress", exc_info=exc)
        return OpenAIError(f"internal error: {type(exc).__name__}", status=500,
                           type="server_error", code="internal_error").response()

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_bug)
