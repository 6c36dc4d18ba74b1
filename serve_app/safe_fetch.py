"""Fetching a client-given media URL without becoming an SSRF proxy (used only when the operator
enabled remote images and listed the hosts they may come from).

Every hop (the URL, then each redirect, at most `max_redirects`) goes through the same gate:

1. The URL is checked by one strict parser, and only what it extracted is used afterwards: http or
   https, printable ASCII only (no backslash, whitespace, control or non-ASCII characters), no
   userinfo (`user@`), no `%` in the authority (percent-encoded hosts, IPv6 zone ids), a port that
   is a number. The host is a lower-case DNS name whose last label starts with a letter (so decimal,
   octal, hex and short IPv4 forms like `2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1` are refused),
   or an IP literal in canonical form. This closes the parser differential of vLLM's CVE-2026-24779
   (`http://allowed.com\\@evil/`: one parser saw the allowed host, the HTTP client connected to
   another): the request is built from the parts checked here, never from the raw string.
2. The host must match the operator's allowlist (`host`, `*.suffix` for subdomains, optionally
   `:port`; without a port only the scheme's default port). An empty list fetches nothing
   (CVE-2025-6242: vLLM fetched any host).
3. The name is resolved once, and the fetch is refused if ANY answer is not globally routable
   (`is_global`, also refusing multicast/reserved/unspecified; IPv4-mapped, 6to4 and Teredo IPv6
   addresses are judged by the IPv4 address inside).
4. The connection goes to the checked address (a network backend that ignores the hostname when
   dialing), so a second DNS answer can never be used (DNS rebinding). Host header, TLS SNI and the
   certificate check still use the hostname.

Responses: 200 only, `Content-Type` must be the expected media type, the body is streamed under a
size cap (`Accept-Encoding: identity`: no decompression bombs), connect and total timeouts apply.
Nothing is read from the environment (no proxy variables: httpcore never looks at them).
Errors name the reason but not the addresses a name resolved to (no internal topology leaks).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Optional
from urllib.parse import urljoin, urlsplit

import httpcore

logger = logging.getLogger("ray.serve")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
# (checked address, port) -> (address, port) to dial. Identity in production; tests map a public
# address they never contact to a loopback server they own.
Dialer = Callable[[IPAddress, int], tuple[str, int]]

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
MAX_URL_LENGTH = 2048
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_ALLOWED_URL_CHARS = re.compile(r"^[\x21-\x7e]+$")
_AUTHORITY = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<host>[a-z0-9.-]+))(?::(?P<port>[0-9]{1,5}))?$")


# Why a URL was not used, as one word of a fixed set: the `reason` label of the refused-fetches
# metric (stages/metrics.py). The client sees the sentence and the code, not this.
REFUSAL_KINDS = ("invalid_url", "no_hosts_allowed", "host_not_allowed", "non_public_address",
                 "too_many_redirects")
FAILURE_KINDS = ("dns", "timeout", "connect", "http_status", "content_type", "compressed", "too_large",
                 "redirect_without_location")


class FetchRefused(Exception):
    """The URL (or a redirect) is not allowed: `reason` is safe to show the client; `kind` is one of
    REFUSAL_KINDS."""

    def __init__(self, reason: str, code: str = "image_url_refused", kind: str = "invalid_url"):
        super().__init__(reason)
        self.reason, self.code, self.kind = reason, code, kind


class FetchFailed(Exception):
    """An allowed URL that could not be fetched (timeout, connection, HTTP status, type, size);
    `kind` is one of FAILURE_KINDS."""

    def __init__(self, reason: str, code: str = "image_fetch_failed", kind: str = "connect"):
        super().__init__(reason)
        self.reason, self.code, self.kind = reason, code, kind


# -- 1. the URL ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A URL reduced to what was checked; the request is built from this alone."""

    scheme: str
    host: str                 # lower-case DNS name, or an IP literal in canonical form
    port: int
    path: str                 # path and query, starting with "/"
    ip: Optional[IPAddress] = None   # set when the host is an IP literal

    @property
    def default_port(self) -> bool:
        return self.port == DEFAULT_PORTS[self.scheme]

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        return host if self.default_port else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}"


def _dns_name(host: str) -> bool:
    labels = host.split(".")
    return (len(host) <= 253 and all(_LABEL.match(label) for label in labels)
            and labels[-1][0].isalpha())


def parse_url(url: str) -> Target:
    """The strict parse of step 1; FetchRefused names what is wrong."""
    if len(url) > MAX_URL_LENGTH:
        raise FetchRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if not _ALLOWED_URL_CHARS.match(url) or "\\" in url:
        raise FetchRefused("the URL contains characters that are not allowed (whitespace, control, "
                           "backslash or non-ASCII; percent-encode them in the path)")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise FetchRefused("only http and https URLs are fetched")
    netloc = parts.netloc.lower()
    if "@" in netloc:
        raise FetchRefused("URLs with credentials (user@host) are not fetched")
    if "%" in netloc:
        raise FetchRefused("percent-encoded hosts and IPv6 zone ids are not fetched")
    # the authority is exactly host[:port] or [v6]:port; urlsplit only cut it out of the URL
    m = _AUTHORITY.match(netloc)
    if m is None:
        raise FetchRefused("the URL's authority is not a plain host[:port]")
    bracketed = m.group("v6") is not None
    host = m.group("v6") if bracketed else m.group("host")
    port = int(m.group("port")) if m.group("port") else DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise FetchRefused("the URL's port is out of range")
    ip = None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if bracketed:
            raise FetchRefused("the bracketed host is not an IPv6 address") from None
        if not _dns_name(host):
            raise FetchRefused("the host is not a valid DNS name (numeric hosts other than a "
                               "canonical IP address are not fetched)") from None
    else:
        if str(ip) != host or isinstance(ip, ipaddress.IPv6Address) != bracketed:
            raise FetchRefused("the host is an IP address in a non-canonical form")
    path = parts.path or "/"
    if not path.startswith("/"):
        raise FetchRefused("the URL's path must start with '/'")
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port, path, ip)


# -- 2. the allowlist ------------------------------------------------------------------------------

_HOST_RULE = re.compile(r"^(?P<star>\*\.)?(?P<host>\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?$")


@dataclass(frozen=True)
class HostRule:
    host: str                 # exact host, or the suffix after "*."
    wildcard: bool
    port: Optional[int]       # None: the scheme's default port only

    def matches(self, target: Target) -> bool:
        if self.port is None:
            if not target.default_port:
                return False
        elif target.port != self.port:
            return False
        if self.wildcard:
            return target.ip is None and target.host.endswith("." + self.host)
        return target.host == self.host


def parse_host_rule(entry: str) -> HostRule:
    """`images.example.com`, `*.example.com`, `[2001:db8::1]:8443`, ... (ValueError if malformed)."""
    m = _HOST_RULE.match(entry.strip().lower())
    if m is None:
        raise ValueError(f"remote image host {entry!r}: write host, *.suffix or either with :port")
    try:
        target = parse_url(f"http://{m.group('host')}/")
    except FetchRefused as e:
        raise ValueError(f"remote image host {entry!r}: {e.reason}") from None
    wildcard = m.group("star") is not None
    if wildcard and target.ip is not None:
        raise ValueError(f"remote image host {entry!r}: a wildcard needs a DNS suffix")
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"remote image host {entry!r}: port out of range")
    return HostRule(target.host, wildcard, port)


# -- 3. resolution ---------------------------------------------------------------------------------

def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    inner = [ip.ipv4_mapped, ip.sixtofour]
    if ip.teredo:
        inner += list(ip.teredo)
    return [a for a in inner if a is not None]


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast: refuses loopback, RFC 1918, link-local (169.254.169.254),
    100.64/10, ULA, multicast, reserved, unspecified; IPv6 forms of an IPv4 by that IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return is_public(ip.ipv4_mapped)   # ::ffff:a.b.c.d is a.b.c.d on the wire
    for inner in _embedded_ipv4(ip):
        if not is_public(inner):
            return False
    return (ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified
                                  or ip.is_loopback or ip.is_link_local or ip.is_private))


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def identity_dialer(ip: IPAddress, port: int) -> tuple[str, int]:
    return str(ip), port


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Dials the checked address whatever hostname httpcore asks for (one origin per pool)."""

    def __init__(self, expected_host: str, address: tuple[str, int]):
        self._inner = httpcore.AnyIOBackend()
        self._expected_host, self._address = expected_host, address

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        if host.strip("[]").lower() != self._expected_host:   # never dial anything else
            raise httpcore.ConnectError(f"unexpected host {host!r} for a pinned connection")
        ip, dial_port = self._address
        return await self._inner.connect_tcp(ip, dial_port, timeout=timeout,
                                             local_address=local_address,
                                             socket_options=socket_options)

    async def connect_unix_socket(self, *args, **kwargs):
        raise httpcore.ConnectError("unix sockets are not used")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _ssl_context() -> ssl.SSLContext:
    try:
        import certifi
        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


# -- the fetcher -----------------------------------------------------------------------------------

@dataclass
class SafeFetcher:
    allowed_hosts: Iterable[str] = ()
    max_bytes: int = 20 * 2**20
    content_type_prefix: str = "image/"
    max_redirects: int = 3
    connect_timeout_s: float = 5.0
    timeout_s: float = 10.0            # the whole fetch, redirects included
    resolver: Resolver = system_resolver
    dialer: Dialer = identity_dialer
    rules: list[HostRule] = field(init=False)

    def __post_init__(self):
        self.rules = [parse_host_rule(h) for h in self.allowed_hosts]

    def check_target(self, target: Target) -> None:
        if not self.rules:
            raise FetchRefused("this server fetches images from no host; send the image as a "
                               "data: URL", kind="no_hosts_allowed")
        if not any(rule.matches(target) for rule in self.rules):
            raise FetchRefused(f"the host {target.authority} is not in this server's list of "
                               "image hosts", kind="host_not_allowed")

    async def resolve(self, target: Target) -> IPAddress:
        if target.ip is not None:
            answers = [target.ip]
        else:
            try:
                raw = await self.resolver(target.host, target.port)
            except (OSError, UnicodeError) as e:
                raise FetchFailed(f"the host {target.host} could not be resolved", kind="dns") from e
            try:
                answers = [ipaddress.ip_address(a.split("%", 1)[0]) for a in raw]
            except ValueError as e:
                raise FetchFailed(f"the host {target.host} could not be resolved", kind="dns") from e
            if not answers:
                raise FetchFailed(f"the host {target.host} has no address", kind="dns")
        bad = [a for a in answers if not is_public(a)]
        if bad:
            logger.warning("remote image refused: %s resolves to non-public %s", target.host,
                           ", ".join(map(str, bad)))
            raise FetchRefused(f"the host {target.host} resolves to an address that is not "
                               "publicly routable", code="image_url_refused", kind="non_public_address")
        first = answers[0]
        return first.ipv4_mapped or first if isinstance(first, ipaddress.IPv6Address) else first

    async def fetch(self, url: str) -> bytes:
        """The body of `url` (following at most max_redirects checked redirects)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise FetchFailed(f"fetching the image took longer than {self.timeout_s:g}s",
                              kind="timeout") from None

    async def _fetch(self, url: str) -> bytes:
        target = parse_url(url)
        for hop in range(self.max_redirects + 1):
            self.check_target(target)
            address = await self.resolve(target)
            status, location, body = await self._get(target, address)
            if status in REDIRECT_STATUSES:
                if location is None:
                    raise FetchFailed(f"the image URL redirected (HTTP {status}) without a Location",
                                      kind="redirect_without_location")
                if hop == self.max_redirects:
                    raise FetchRefused(f"the image URL redirected more than {self.max_redirects} "
                                       "times", code="too_many_redirects", kind="too_many_redirects")
                try:
                    target = parse_url(urljoin(target.url, location))
                except FetchRefused as e:
                    raise FetchRefused(f"the image URL redirected to a URL that is refused: "
                                       f"{e.reason}", code=e.code, kind=e.kind) from None
                continue
            return body
        raise AssertionError("unreachable")

    async def _get(self, target: Target, address: IPAddress) -> tuple[int, Optional[str], bytes]:
        backend = _PinnedBackend(target.host, self.dialer(address, target.port))
        timeouts = {"connect": self.connect_timeout_s, "read": self.timeout_s,
                    "write": self.timeout_s, "pool": self.connect_timeout_s}
        headers = [(b"Host", target.authority.encode()), (b"User-Agent", b"lance-serve"),
                   (b"Accept", f"{self.content_type_prefix}*".encode()),
                   (b"Accept-Encoding", b"identity")]
        try:
            async with httpcore.AsyncConnectionPool(ssl_context=_ssl_context(), retries=0,
                                                    max_connections=1, http1=True, http2=False,
                                                    network_backend=backend) as pool:
                async with pool.stream("GET", target.url, headers=headers,
                                       extensions={"timeout": timeouts}) as resp:
                    status = resp.status
                    hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in resp.headers}
                    if status in REDIRECT_STATUSES:
                        return status, hdrs.get("location"), b""
                    if status != 200:
                        raise FetchFailed(f"fetching the image returned HTTP {status}", kind="http_status")
                    ctype = hdrs.get("content-type", "").split(";")[0].strip().lower()
                    if not ctype.startswith(self.content_type_prefix):
                        raise FetchFailed(f"the URL returned Content-Type {ctype or 'none'!r}, "
                                          f"not {self.content_type_prefix}*",
                                          code="invalid_content_type", kind="content_type")
                    if hdrs.get("content-encoding", "identity").lower() not in ("identity", ""):
                        raise FetchFailed("the URL returned a compressed body (Content-Encoding)",
                                          kind="compressed")
                    declared = hdrs.get("content-length", "")
                    if declared.isdigit() and int(declared) > self.max_bytes:
                        raise FetchFailed(f"the image at the URL is larger than {self.max_bytes} "
                                          "bytes", code="image_too_large", kind="too_large")
                    chunks, size = [], 0
                    async for chunk in resp.aiter_stream():
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise FetchFailed(f"the image at the URL is larger than "
                                              f"{self.max_bytes} bytes", code="image_too_large",
                                              kind="too_large")
                        chunks.append(chunk)
                    return status, None, b"".join(chunks)
        except httpcore.TimeoutException:
            raise FetchFailed("fetching the image timed out", kind="timeout") from None
        except httpcore.ConnectError:
            raise FetchFailed(f"could not connect to {target.authority}") from None
        except (httpcore.ProtocolError, httpcore.NetworkError, ssl.SSLError):
            raise FetchFailed(f"the connection to {target.authority} failed") from None
