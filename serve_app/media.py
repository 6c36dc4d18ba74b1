"""Images in and out of the HTTP API: data URLs / uploads -> PIL, PNG bytes -> base64."""
from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from .errors import OpenAIError, bad_request

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$",
                       re.DOTALL)
# Decompression-bomb guard: 8192^2 is far above anything Lance's 768/1024 buckets use.
MAX_IMAGE_PIXELS = 8192 * 8192


def decode_image_bytes(data: bytes, param: str) -> Image.Image:
    """Decode and fully load an image; anything that is not a readable image is a 400."""
    if not data:
        raise bad_request("the image is empty", param=param, code="invalid_image")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:  # checked from the header, before decoding
            raise bad_request(f"the image is {img.width}x{img.height}; at most "
                              f"{MAX_IMAGE_PIXELS} pixels are accepted", param=param,
                              code="image_too_large")
        img.load()
    except OpenAIError:
        raise
    except Image.DecompressionBombError as e:
        raise bad_request(f"the image is too large: {e}", param=param, code="image_too_large")
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
        raise bad_request(f"the image could not be decoded ({type(e).__name__}: {e})",
                          param=param, code="invalid_image")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def decode_data_url(url: str, param: str, max_bytes: int) -> Image.Image:
    m = _DATA_URL.match(url)
    if m is None:
        raise bad_request("image data URLs must look like data:image/<type>;base64,<data>",
                          param=param, code="invalid_image_url")
    mime = m.group("mime") or ""
    if mime and not mime.startswith("image/"):
        raise bad_request(f"the data URL has media type {mime!r}; only images are accepted",
                          param=param, code="invalid_image_url")
    payload = m.group("data").strip()
    if len(payload) * 3 // 4 > max_bytes:
        raise bad_request(f"the image is larger than {max_bytes} bytes", param=param,
                          code="image_too_large")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"the image data URL is not valid base64 ({e})", param=param,
                          code="invalid_base64")
    return decode_image_bytes(raw, param)


async def fetch_remote_image(url: str, param: str, limits, fetcher=None) -> Image.Image:
    """Download an http(s) image through the SSRF-safe fetcher (only when the operator enabled
    remote images; `limits.remote_image_hosts` lists where they may come from)."""
    from .safe_fetch import FetchFailed, FetchRefused, SafeFetcher

    if fetcher is None:
        fetcher = SafeFetcher(allowed_hosts=limits.remote_image_hosts,
                              max_bytes=limits.max_image_bytes,
                              timeout_s=limits.remote_image_timeout_s)
    try:
        data = await fetcher.fetch(url)
    except (FetchRefused, FetchFailed) as e:
        raise bad_request(f"the image URL was not fetched: {e.reason}", param=param,
                          code=e.code) from None
    return decode_image_bytes(data, param)


def image_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_data_url(item: dict) -> str:
    """A finished DiT image ({"image": bytes, "media_type", ...}) as a data URL."""
    return f"data:{item['media_type']};base64," + image_base64(item["image"])
