"""Images and videos in and out of the HTTP API: data URLs / uploads -> PIL images or sampled video
frames (PyAV), encoded bytes -> base64 data URLs.

Decoding a video is CPU work: callers run `decode_video_bytes` in a worker thread (asyncio.to_thread)
so the event loop keeps answering."""
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
    except Image.UnidentifiedImageError:   # its message names an in-memory file object: not for clients
        raise bad_request("the image could not be decoded: not an image file PIL reads (send PNG, JPEG, "
                          "WebP, ...)", param=param, code="invalid_image") from None
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
        raise bad_request(f"the image could not be decoded ({type(e).__name__}: {e})",
                          param=param, code="invalid_image") from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def data_url_bytes(url: str, param: str, max_bytes: int, kind: str = "image") -> bytes:
    """The payload of a `data:<kind>/<type>;base64,...` URL; anything else is a 400."""
    m = _DATA_URL.match(url)
    if m is None:
        raise bad_request(f"{kind} data URLs must look like data:{kind}/<type>;base64,<data>",
                          param=param, code=f"invalid_{kind}_url")
    mime = m.group("mime") or ""
    if mime and not mime.startswith(f"{kind}/"):
        raise bad_request(f"the data URL has media type {mime!r}; a {kind}/... URL is expected here",
                          param=param, code=f"invalid_{kind}_url")
    payload = m.group("data").strip()
    if len(payload) * 3 // 4 > max_bytes:
        raise bad_request(f"the {kind} is larger than {max_bytes} bytes", param=param,
                          code=f"{kind}_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"the {kind} data URL is not valid base64 ({e})", param=param,
                          code="invalid_base64")


def decode_data_url(url: str, param: str, max_bytes: int) -> Image.Image:
    return decode_image_bytes(data_url_bytes(url, param, max_bytes, "image"), param)


def decode_video_bytes(data: bytes, param: str):
    """An input video file -> a `VideoClip` of the frames Lance sees (blocking: run it in a thread).

    Only upstream's sampled frames are decoded (12 fps, at most 6 s, 4k+1; stages.lance.video_io),
    so a long or large input never sits in memory whole; the clip carries them at the sampler's
    rate, which the stages' sampler maps onto itself (the same frames, in the same order)."""
    import tempfile

    from stages.lance.video_io import (SAMPLE_FPS, VideoClip, decode_video_frames, probe_video,
                                       video_frame_indices)

    if not data:
        raise bad_request("the video is empty", param=param, code="invalid_video")
    with tempfile.NamedTemporaryFile(prefix="lance-input-", suffix=".video") as f:
        f.write(data)
        f.flush()
        try:
            total, fps = probe_video(f.name)
            indices = video_frame_indices(total, fps)
            try:
                frames = decode_video_frames(f.name, indices)
            except IndexError:   # the container over-stated its frame count: count by decoding
                frames = decode_video_frames(f.name)
                frames = frames[video_frame_indices(len(frames), fps)]
        except Exception:   # PyAV/FFmpeg errors of every kind for broken files
            raise bad_request("the video could not be decoded: send an MP4 (or another file "
                              "FFmpeg reads) with a video stream", param=param,
                              code="invalid_video") from None
    if frames.shape[1] * frames.shape[2] > MAX_IMAGE_PIXELS:
        raise bad_request(f"the video is {frames.shape[2]}x{frames.shape[1]}; at most "
                          f"{MAX_IMAGE_PIXELS} pixels per frame are accepted", param=param,
                          code="video_too_large")
    return VideoClip(frames, float(SAMPLE_FPS))


async def fetch_remote_image(url: str, param: str, limits, fetcher=None) -> Image.Image:
    """Download an http(s) image through the SSRF-safe fetcher (only when the operator enabled
    remote images; `limits.remote_image_hosts` lists where they may come from)."""
    data = await fetch_remote_bytes(url, param, limits, limits.max_image_bytes, "image", fetcher)
    return decode_image_bytes(data, param)


async def fetch_remote_bytes(url: str, param: str, limits, max_bytes: int, kind: str = "image",
                             fetcher=None) -> bytes:
    """Download an http(s) image or video through the SSRF-safe fetcher (safe_fetch.py): the
    operator's host list, public addresses only, pinned connections, `kind/*` content only."""
    from .metrics import fetch_refused
    from .safe_fetch import FetchFailed, FetchRefused, SafeFetcher

    if fetcher is None:
        fetcher = SafeFetcher(allowed_hosts=limits.remote_image_hosts, max_bytes=max_bytes,
                              content_type_prefix=f"{kind}/", timeout_s=limits.remote_image_timeout_s)
    try:
        return await fetcher.fetch(url)
    except (FetchRefused, FetchFailed) as e:
        fetch_refused(e.kind)
        raise bad_request(f"the {kind} URL was not fetched: {e.reason}", param=param,
                          code=e.code) from None


def image_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_data_url(item: dict) -> str:
    """A finished DiT image ({"image": bytes, "media_type", ...}) as a data URL."""
    return f"data:{item['media_type']};base64," + image_base64(item["image"])


def video_data_url(item: dict) -> str:
    """A finished DiT video ({"video": bytes, "media_type", ...}) as a data URL."""
    return f"data:{item['media_type']};base64," + image_base64(item["video"])


def first_frame_image(video: bytes, fmt: str = "webp") -> bytes:
    """The first frame of an encoded video as an image file (the Videos API's thumbnail; blocking)."""
    import av

    with av.open(io.BytesIO(video)) as container:
        frame = next(container.decode(video=0))
        img = frame.to_image()
    out = io.BytesIO()
    img.save(out, format=fmt.upper())
    return out.getvalue()
