"""The SSRF-safe image fetcher (serve_app/safe_fetch.py) against real HTTP servers on loopback.

No test sends traffic anywhere but 127.0.0.1: names resolve through a fake resolver, and the only
way to reach the "allowed" server is the injected dialer, which maps a public address (never
contacted) to it. The dialer passes loopback addresses through unchanged, so if a check failed, a
fetch would really reach the "blocked" loopback server, whose hits are counted; any other address
fails the test instead of being dialed.
"""
from __future__ import annotations

import asyncio
import io
import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from PIL import Image

from serve_app.errors import OpenAIError
from serve_app.knobs import RequestLimits
from serve_app.media import fetch_remote_image
from serve_app.safe_fetch import (FetchFailed, FetchRefused, SafeFetcher, is_public,
                                  parse_host_rule, parse_url)

PUBLIC_IP = "8.8.8.8"   # what allowed names resolve to; the dialer maps it to the good server


def png_bytes(size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()


class Server:
    """A loopback HTTP server counting hits. Paths: /img.png, /html, /big (chunked), /slow,
    /redirect?to=URL[&status=302]."""

    def __init__(self):
        self.hits: list[str] = []
        self.host_headers: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits.append(self.path)
                outer.host_headers.append(self.headers.get("Host", ""))
                url = urlsplit(self.path)
                if url.path == "/img.png":
                    self._send(200, PNG, "image/png")
                elif url.path == "/html":
                    self._send(200, b"<html></html>", "text/html")
                elif url.path == "/big":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for _ in range(64):
                        self.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                elif url.path == "/slow":
                    time.sleep(3)
                    self._send(200, PNG, "image/png")
                elif url.path == "/redirect":
                    q = parse_qs(url.query)
                    self.send_response(int(q.get("status", ["302"])[0]))
                    self.send_header("Location", q["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(404, b"no", "text/plain")

            def _send(self, status, body, ctype):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def good():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def blocked():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _reset(good, blocked):
    good.hits.clear()
    blocked.hits.clear()
    good.host_headers.clear()


class FakeDNS:
    def __init__(self, table):
        self.table, self.calls = table, []

    async def __call__(self, host, port):
        self.calls.append(host)
        answers = self.table.get(host)
        if answers is None:
            raise OSError("NXDOMAIN")
        return list(answers.pop(0) if answers and isinstance(answers[0], list) else answers)


def make_fetcher(good, blocked, dns=None, hosts=None, **kw) -> SafeFetcher:
    dns = dns or FakeDNS({"allowed.test": [PUBLIC_IP], "blocked.test": ["127.0.0.1"],
                          "cdn.allowed.test": [PUBLIC_IP]})

    def dialer(ip, port):
        if str(ip) == PUBLIC_IP and port == good.port:
            return "127.0.0.1", good.port
        assert ipaddress.ip_address(ip).is_loopback, f"the test would dial {ip}"
        return str(ip), port

    hosts = hosts if hosts is not None else [f"allowed.test:{good.port}", f"*.allowed.test:{good.port}",
                                             f"blocked.test:{blocked.port}",
                                             f"127.0.0.1:{blocked.port}"]
    f = SafeFetcher(allowed_hosts=hosts, resolver=dns, dialer=dialer, **kw)
    f.dns = dns
    return f


def run(coro):
    return asyncio.run(coro)


def good_url(good, path="/img.png", host="allowed.test"):
    return f"http://{host}:{good.port}{path}"


def test_allowed_fetch_goes_to_the_pinned_address_with_the_hostname(good, blocked):
    f = make_fetcher(good, blocked)
    assert run(f.fetch(good_url(good))) == PNG
    assert good.hits == ["/img.png"] and good.host_headers == [f"allowed.test:{good.port}"]
    assert run(f.fetch(good_url(good, host="cdn.allowed.test"))) == PNG


def test_blocked_name_is_never_contacted(good, blocked):
    f = make_fetcher(good, blocked)
    for url in (f"http://blocked.test:{blocked.port}/img.png", f"http://127.0.0.1:{blocked.port}/img.png"):
        with pytest.raises(FetchRefused, match="not publicly routable"):
            run(f.fetch(url))
    assert blocked.hits == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("target", ["http://blocked.test:{bp}/img.png", "http://127.0.0.1:{bp}/img.png",
                                    "http://localhost:{bp}/img.png", "http://2130706433:{bp}/img.png",
                                    "http://[::1]:{bp}/img.png", "file:///etc/passwd",
                                    "http://allowed.test\\@127.0.0.1:{bp}/img.png",
                                    "http://x@blocked.test:{bp}/img.png",
                                    "//blocked.test:{bp}/img.png"])
def test_redirect_to_a_blocked_address_reaches_it_zero_times(good, blocked, status, target):
    f = make_fetcher(good, blocked)
    to = target.format(bp=blocked.port)
    url = good_url(good, f"/redirect?status={status}&to={quote(to, safe='')}")
    with pytest.raises(FetchRefused):
        run(f.fetch(url))
    assert blocked.hits == []
    assert len(good.hits) == 1   # the redirect was answered, its target never fetched


def test_redirects_are_followed_and_bounded(good, blocked):
    f = make_fetcher(good, blocked)
    url = good_url(good)
    for _ in range(3):
        url = good_url(good, "/redirect?to=" + url.replace("&", "%26"))
    assert run(f.fetch(url)) == PNG   # 3 redirects: allowed
    good.hits.clear()
    with pytest.raises(FetchRefused, match="more than 3"):
        run(f.fetch(good_url(good, "/redirect?to=" + url)))
    assert len(good.hits) == 4 and "/img.png" not in good.hits
    # relative Location is resolved against the checked URL
    assert run(f.fetch(good_url(good, "/redirect?to=/img.png"))) == PNG


def test_dns_is_resolved_once_per_hop_and_the_answer_pinned(good, blocked):
    # rebinding: the first answer is public, any later one loopback
    dns = FakeDNS({"allowed.test": [[PUBLIC_IP], ["127.0.0.1"], ["127.0.0.1"]]})
    f = make_fetcher(good, blocked, dns=dns)
    assert run(f.fetch(good_url(good))) == PNG
    assert dns.calls == ["allowed.test"] and blocked.hits == []


@pytest.mark.parametrize("answers", [[PUBLIC_IP, "10.0.0.1"], ["10.0.0.1", PUBLIC_IP],
                                     [PUBLIC_IP, "::ffff:127.0.0.1"], [PUBLIC_IP, "fe80::1%eth0"], []])
def test_any_non_public_answer_refuses(good, blocked, answers):
    f = make_fetcher(good, blocked, dns=FakeDNS({"allowed.test": answers}))
    with pytest.raises((FetchRefused, FetchFailed)):
        run(f.fetch(good_url(good)))
    assert good.hits == [] and blocked.hits == []


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.8.9.1", "10.1.2.3", "172.16.0.1", "192.168.1.1",
                                "169.254.169.254", "100.64.0.1", "100.127.255.254", "0.0.0.0",
                                "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1",
                                "192.0.2.1", "198.18.0.1", "::1", "::", "fe80::1", "fc00::1",
                                "fd12:3456::1", "ff02::1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
                                "2002:7f00:1::1", "2002:a9fe:a9fe::1", "64:ff9b::a00:1", "2001:db8::1"])
def test_not_public(ip):
    assert not is_public(ipaddress.ip_address(ip))


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                                "::ffff:8.8.8.8"])
def test_public(ip):
    assert is_public(ipaddress.ip_address(ip))


REFUSED_URLS = [
    "http://allowed.test\\@evil.test/img.png",       # CVE-2026-24779's backslash differential
    "http://allowed.test\\\\@evil.test/",
    "http://allowed.test%5C@evil.test/",
    "http://evil.test\\.allowed.test/",
    "http://user@allowed.test/img.png",
    "http://user:pw@allowed.test/img.png",
    "http://allowed.test:80@evil.test/",
    "http://allowed.test@evil.test/",
    "http://%61llowed.test/",
    "http://allowed%2etest/",
    "http://[fe80::1%25eth0]/",
    "http://[::1%25lo]:80/",
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.0.0.1/",
    "http://0x7f000001/",
    "http://127.1/",
    "http://017700000001/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]x/",
    "http://allowed.test./",
    "http://allowed..test/",
    "http://-allowed.test/",
    "http://allowed.tést/",
    "http://allowed.test /",
    "http://allowed.test\t/",
    " http://allowed.test/",
    "http://allowed.test/\nHost: evil",
    "http://allowed.test:99999/",
    "http://allowed.test:/",
    "http://allowed.test:8o/",
    "ftp://allowed.test/",
    "file:///etc/passwd",
    "gopher://allowed.test/",
    "data:image/png;base64,AAAA",
    "http:///allowed.test/",
    "http:allowed.test/",
    "http://",
    "http://" + "a" * 2100 + ".test/",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_parser_refuses(url, good, blocked):
    with pytest.raises(FetchRefused):
        parse_url(url)
    with pytest.raises(FetchRefused):
        run(make_fetcher(good, blocked).fetch(url))
    assert good.hits == [] and blocked.hits == []


@pytest.mark.parametrize("url,host,path", [
    ("http://allowed.test/@evil.test", "allowed.test", "/@evil.test"),
    ("http://allowed.test#@evil.test/", "allowed.test", "/"),
    ("http://allowed.test?@evil.test/", "allowed.test", "/?@evil.test/"),
    ("HTTP://ALLOWED.Test/a%20b?x=1", "allowed.test", "/a%20b?x=1"),
    ("https://[2606:4700:4700::1111]:8443/x", "2606:4700:4700::1111", "/x"),
])
def test_parser_keeps_only_what_it_checked(url, host, path):
    t = parse_url(url)
    assert (t.host, t.path) == (host, path)


def test_allowlist_rules(good, blocked):
    wild = parse_host_rule("*.example.com")
    exact = parse_host_rule("images.example.com")
    ported = parse_host_rule("images.example.com:8443")
    assert wild.matches(parse_url("https://a.b.example.com/x"))
    assert not wild.matches(parse_url("https://example.com/x"))
    assert not wild.matches(parse_url("https://evilexample.com/x"))
    assert not wild.matches(parse_url("https://a.example.com:8443/x"))   # default port only
    assert exact.matches(parse_url("http://images.example.com/x"))
    assert not exact.matches(parse_url("http://images.example.com:8080/x"))
    assert not exact.matches(parse_url("http://images.example.com.evil.test/x"))
    assert ported.matches(parse_url("https://images.example.com:8443/x"))
    assert not ported.matches(parse_url("https://images.example.com/x"))
    for bad in ("", "*", "*.", "http://x.com", "x.com/path", "user@x.com", "*.1.2.3.4", "x.com:0",
                "0x7f.1"):
        with pytest.raises(ValueError):
            parse_host_rule(bad)
    # not listed, or an empty list: refused before any DNS lookup
    f = make_fetcher(good, blocked, hosts=["images.example.com"])
    with pytest.raises(FetchRefused, match="not in this server's list"):
        run(f.fetch(good_url(good)))
    f = make_fetcher(good, blocked, hosts=[])
    with pytest.raises(FetchRefused, match="from no host"):
        run(f.fetch(good_url(good)))
    assert f.dns.calls == [] and good.hits == []


def test_response_checks(good, blocked):
    f = make_fetcher(good, blocked, max_bytes=4096)
    with pytest.raises(FetchFailed) as e:
        run(f.fetch(good_url(good, "/html")))
    assert e.value.code == "invalid_content_type"
    with pytest.raises(FetchFailed) as e:
        run(f.fetch(good_url(good, "/big")))     # chunked: the cap applies while streaming
    assert e.value.code == "image_too_large"
    with pytest.raises(FetchFailed, match="HTTP 404"):
        run(f.fetch(good_url(good, "/missing")))
    small = make_fetcher(good, blocked, max_bytes=len(PNG) - 1)
    with pytest.raises(FetchFailed) as e:      # Content-Length over the cap: refused before reading
        run(small.fetch(good_url(good)))
    assert e.value.code == "image_too_large"


def test_total_timeout(good, blocked):
    f = make_fetcher(good, blocked, timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out|longer than"):
        run(f.fetch(good_url(good, "/slow")))
    assert time.monotonic() - start < 2.5


def test_media_layer_turns_refusals_into_400s(good, blocked):
    limits = RequestLimits(allow_remote_images=True)
    f = make_fetcher(good, blocked)
    img = run(fetch_remote_image(good_url(good), "messages[0].content[1].image_url", limits, f))
    assert img.size == (8, 6)
    for url, code in ((f"http://blocked.test:{blocked.port}/img.png", "image_url_refused"),
                      ("http://allowed.test\\@evil.test/", "image_url_refused"),
                      (good_url(good, "/html"), "invalid_content_type")):
        with pytest.raises(OpenAIError) as e:
            run(fetch_remote_image(url, "p", limits, f))
        assert e.value.status == 400 and e.value.code == code and e.value.param == "p"
        assert "127.0.0.1" not in e.value.message   # resolved addresses are not shown
    # the default fetcher of a server with no hosts listed fetches nothing
    with pytest.raises(OpenAIError, match="from no host"):
        run(fetch_remote_image(good_url(good), "p", limits))
    assert blocked.hits == []
