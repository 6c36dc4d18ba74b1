"""API keys: `Authorization: Bearer <key>` on every route of the app except an explicit public list.

Keys come from the app arg `api_keys` and the env `LANCE_SERVE_API_KEY` (one key, or several separated
by commas); with none, authentication is off. The check is an ASGI middleware in front of the router,
so it fails closed: every path the app answers (its route table, FastAPI's /docs and /openapi.json,
paths that would 404 or redirect, any method including OPTIONS) needs a key unless the path is in
PUBLIC_PATHS or the public paths the app adds (the playground's page and files, ingress.py). A route
added later is protected without touching this module.

Keys are compared as SHA-256 digests with `secrets.compare_digest`, against every configured key with
no early exit, so neither a key's content nor which key matched shows in the timing.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import secrets
from typing import Iterable, Mapping

API_KEY_ENV = "LANCE_SERVE_API_KEY"
# The load balancer's / kubelet's probe must work without a key. (/metrics is served by Ray's metrics
# agent on its own port, not by this app.)
PUBLIC_PATHS = frozenset({"/health"})

logger = logging.getLogger("ray.serve")


class APIKeyError(ValueError):
    """An API key that cannot be sent in an HTTP header (empty, whitespace, control characters)."""


def check_key(key: str) -> str:
    if not key:
        raise APIKeyError("an API key is empty")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in key):
        raise APIKeyError("an API key contains whitespace, control or non-ASCII characters; "
                          "use printable ASCII (e.g. `python -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))'`)")
    return key


def keys_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    raw = (os.environ if environ is None else environ).get(API_KEY_ENV, "")
    return [check_key(k.strip()) for k in raw.split(",") if k.strip()]


def resolve_api_keys(arg_keys: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> list[str]:
    """The app arg's keys plus the env's, de-duplicated, order kept."""
    keys = [check_key(k) for k in arg_keys] + keys_from_env(environ)
    return list(dict.fromkeys(keys))


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("latin-1") if isinstance(key, str) else key).digest()


class KeyChecker:
    """Holds only the keys' digests; `matches` runs in the same time whatever the token."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(check_key(k)) for k in keys]
        if not self._digests:
            raise APIKeyError("no API keys given")

    def matches(self, token: bytes) -> bool:
        presented = _digest(token)
        ok = False
        for d in self._digests:   # no early exit: every key is compared
            ok |= secrets.compare_digest(d, presented)
        return ok


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token or b" " in token:
        return None
    return token


UNAUTHORIZED_BODY = json.dumps({"error": {
    "message": "a valid API key is required: send it as 'Authorization: Bearer <key>'",
    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()


class APIKeyMiddleware:
    """ASGI middleware: 401 for any request outside PUBLIC_PATHS without a valid bearer key."""

    def __init__(self, app, checker: KeyChecker, public_paths: Iterable[str] = PUBLIC_PATHS):
        self.app, self.checker, self.public_paths = app, checker, frozenset(public_paths)

    def _path(self, scope) -> str:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        # Serve may mount the app under its route_prefix; judge the path the app itself routes
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        return path

    def _authorized(self, scope) -> bool:
        if self._path(scope) in self.public_paths:
            return True
        header = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                if header is not None:   # two Authorization headers: ambiguous, refuse
                    return False
                header = value
        token = bearer_token(header)
        return token is not None and self.checker.matches(token)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(UNAUTHORIZED_BODY)).encode()),
            (b"www-authenticate", b'Bearer realm="lance-serve"')]})
        await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})


def protected_routes(app, public_paths: Iterable[str] = PUBLIC_PATHS) -> list[str]:
    """The app's own route table minus the public paths (for the start-up log)."""
    public = frozenset(public_paths)
    return sorted({getattr(r, "path", "?") for r in app.routes} - public)


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_open(keys: list[str], host: str | None) -> str | None:
    """The loud start-up warning when the server is reachable beyond loopback without a key."""
    if keys or is_loopback_host(host):
        return None
    msg = (f"!! NO API KEY: lance-serve listens on {host or 'an unknown host'} and anyone who can "
           f"reach the port can use the model. Set {API_KEY_ENV} (or the app arg api_keys), or bind "
           "http_options.host to 127.0.0.1.")
    logger.warning(msg)
    return msg
