"""Image encoding of finished images, off the engine thread.

PNG encoding costs 150-190 ms for a photo-like 1024² image with PIL on a small VM (~40 ms at 512²):
done on the thread that drives the GPU, every batched request waits for it. `EncoderPool` runs it on
a few worker threads instead (PIL's encoders release the GIL), and waits for the image's device to
host copy there as well, so the engine thread launches the next step while the pixels are in flight.
"""
from __future__ import annotations

import asyncio
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from stages.lance.requests import ImageEncoding

PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def encode_pixels(pixels: torch.Tensor | np.ndarray, encoding: ImageEncoding = ImageEncoding()) -> bytes:
    """uint8 [H, W, 3] -> the encoded file."""
    array = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    image = Image.fromarray(np.ascontiguousarray(array))
    buf = io.BytesIO()
    if encoding.format == "png":
        image.save(buf, format="PNG", compress_level=encoding.png_compress_level)
    elif encoding.format == "webp":
        # quality 100 is lossless-looking but still lossy; method 4 (PIL's default) balances size and speed
        image.save(buf, format="WEBP", quality=encoding.quality)
    else:
        image.save(buf, format="JPEG", quality=encoding.quality)
    return buf.getvalue()


def with_png_level(encoding: ImageEncoding | None, png_compress_level: int) -> ImageEncoding:
    """The request's encoding (PNG if none) with the operator's PNG compression level."""
    encoding = encoding or ImageEncoding()
    if encoding.format == "png" and encoding.png_compress_level != png_compress_level:
        encoding = ImageEncoding("png", encoding.quality, png_compress_level)
    return encoding


def default_encode_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class EncoderPool:
    """A small thread pool that turns finished images into encoded files."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or default_encode_workers()
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="dit-encode")

    def run(self, fn, *args) -> "asyncio.Future":
        """Awaitable result of fn(*args) on an encoder thread (video encoding: one call per chunk)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def encode(self, image, encoding: ImageEncoding) -> "asyncio.Future[bytes]":
        """Awaitable encoded bytes of a `DecodedImage` (waits for its pixels' device copy first)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, image.encode, encoding)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
