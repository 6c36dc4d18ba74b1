"""Limits on the HTTP request itself, enforced before any handler reads it.

- headers: at most MAX_HEADERS of them, MAX_HEADER_BYTES in all (431);
- body: a declared Content-Length over the cap is refused before a byte is read (413), and a body
  without one (chunked) is counted as it arrives and cut off at the cap (413), so no route (JSON or
  multipart) ever holds more than the cap in memory or on disk.
"""
from __future__ import annotations

from .errors import OpenAIError

MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024   # what nginx and uvicorn's h11 accept by default


class RequestTooLarge(OpenAIError):
    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than {limit} bytes", status=413,
                         code="request_too_large")


def header_problem(headers) -> OpenAIError | None:
    if len(headers) > MAX_HEADERS:
        return OpenAIError(f"the request has {len(headers)} headers; at most {MAX_HEADERS}",
                           status=431, code="headers_too_large")
    size = sum(len(k) + len(v) + 4 for k, v in headers)
    if size > MAX_HEADER_BYTES:
        return OpenAIError(f"the request headers are {size} bytes; at most {MAX_HEADER_BYTES}",
                           status=431, code="headers_too_large")
    return None


class RequestLimitMiddleware:
    """ASGI middleware applying the header and body limits to every HTTP request."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        problem = header_problem(headers)
        declared = [v for k, v in headers if k.lower() == b"content-length"]
        if problem is None and declared:
            value = declared[0].strip()
            if len(declared) > 1 or not value.isdigit():
                problem = OpenAIError("the Content-Length header is not a single number",
                                      code="invalid_content_length")
            elif int(value) > self.max_body_bytes:
                problem = RequestTooLarge(self.max_body_bytes)
        if problem is not None:
            await problem.response()(scope, receive, send)
            return

        limit, received = self.max_body_bytes, 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(limit)   # the route's handler answers 413 (errors.py)
            return message

        await self.app(scope, limited_receive, send)
