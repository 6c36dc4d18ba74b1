"""Videos out of the DiT stage: chunked multi-frame decode and H.264/MP4 encoding with PyAV.

A finished video is decoded one latent frame at a time (`LanceVAE.decode_chunks`: 1 frame, then 4 per
latent frame, with the causal decoder's feature cache carried between chunks), so decoding never holds
every frame's activations, and the runner can interleave one chunk per engine step with other requests'
denoising. The chunks leave the device as uint8 frames and are encoded incrementally by `Mp4Encoder`
on an encoder thread; only the encoded file crosses Ray.
"""
from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterator

import numpy as np
import torch

from stages.lance.requests import VideoEncoding
from stages.lance.vae import LanceVAE, decode_to_uint8

from .engine import DenoiseJob

FrameSink = Callable[[int, int, torch.Tensor], None]   # (latent frames decoded, total, uint8 [f, H, W, 3])


@dataclass(eq=False)
class DecodedVideo:
    """A finished video: its size, and (when no frame sink took them) the frames themselves."""

    width: int
    height: int
    num_frames: int
    frames: torch.Tensor | None = None    # uint8 [T, H, W, 3] on the CPU, collected when nothing streamed them
    latents: torch.Tensor | None = None   # final [t, h, w, channels] fp32 on the CPU (small next to the frames)


@dataclass(eq=False)
class VideoDecode:
    """One finished video's decode in progress: `advance()` decodes its next latent frame."""

    job: DenoiseJob
    chunks: Iterator[torch.Tensor]
    total: int                            # latent frames
    sink: FrameSink | None = None         # gets each chunk's frames; None: collect them into the result
    done: int = 0
    frames: int = 0
    size: tuple[int, int] = (0, 0)        # (height, width)
    collected: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(cls, vae: LanceVAE, job: DenoiseJob, dtype: torch.dtype, sink: FrameSink | None = None) -> "VideoDecode":
        t, h, w = job.grid
        z = job.x.view(t, h, w, -1).permute(3, 0, 1, 2)[None].to(dtype)   # [1, C, t, h, w]
        return cls(job, vae.decode_chunks(z), t, sink)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def advance(self) -> DecodedVideo | None:
        """Decode the next latent frame and hand its frames on; the result once the last one is done."""
        chunk = next(self.chunks)                       # [1, 3, f, H, W] in [-1, 1]
        frames = decode_to_uint8(chunk).cpu()           # [f, H, W, 3]
        self.done += 1
        self.frames += frames.shape[0]
        self.size = tuple(frames.shape[1:3])
        if self.sink is not None:
            self.sink(self.done, self.total, frames)
        else:
            self.collected.append(frames)
        if not self.finished:
            return None
        self.chunks.close()
        t, h, w = self.job.grid
        return DecodedVideo(self.size[1], self.size[0], self.frames,
                            torch.cat(self.collected) if self.collected else None,
                            self.job.x.view(t, h, w, -1).cpu())


class Mp4Encoder:
    """Incremental H.264 in MP4 with PyAV: `write` frames as they are decoded, `finish` for the file.

    One encoder per video. Its calls may come from different threads of a pool: a lock keeps them one
    at a time (x264 itself is threaded), so an `abort` waits for a `write` still in flight.
    """

    def __init__(self, width: int, height: int, encoding: VideoEncoding = VideoEncoding()):
        import av

        if width % 2 or height % 2:
            raise ValueError(f"H.264 needs even frame sizes, got {width}x{height}")
        self.encoding = encoding
        # denominators up to 1001 keep NTSC rates (30000/1001) exact; a rate >= MIN_VIDEO_FPS never rounds to 0
        self.rate = Fraction(encoding.fps).limit_denominator(1001)
        # faststart puts the index in front (a player can start before the whole file has arrived); the
        # muxer rewrites the file for it by name, so it is written to a temporary file, not to memory
        self._file = tempfile.NamedTemporaryFile(prefix="lance-video-", suffix=".mp4")
        self._container = av.open(self._file.name, mode="w", format="mp4", options={"movflags": "+faststart"})
        if encoding.lossless:   # RGB H.264 at qp 0: the frames come back bit-exact
            stream = self._container.add_stream("libx264rgb", rate=self.rate)
            stream.pix_fmt = "rgb24"
            stream.options = {"qp": "0", "preset": encoding.preset}
        else:
            stream = self._container.add_stream("libx264", rate=self.rate)
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(encoding.crf), "preset": encoding.preset}
        stream.width, stream.height = width, height
        self._stream = stream
        self._lock = threading.Lock()
        self._closed = False
        self.frames_written = 0

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """uint8 frames [f, H, W, 3]."""
        import av

        array = frames.numpy() if isinstance(frames, torch.Tensor) else frames
        if array.ndim != 4 or array.shape[1:] != (self._stream.height, self._stream.width, 3):
            raise ValueError(f"frames must be [f, {self._stream.height}, {self._stream.width}, 3], "
                             f"got {list(array.shape)}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the video encoder is closed")
            for frame in array:
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                vf.pts = self.frames_written
                vf.time_base = 1 / self.rate
                self._container.mux(self._stream.encode(vf))
                self.frames_written += 1

    def finish(self) -> bytes:
        """Flush the encoder and close the file; its bytes."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the video encoder is closed")
            self._closed = True
            try:
                self._container.mux(self._stream.encode(None))
                self._container.close()
                with open(self._file.name, "rb") as f:
                    return f.read()
            finally:
                self._file.close()

    def abort(self) -> None:
        """Drop the file (after a write in flight, if any)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._container.close()
            except Exception:  # an encoder that never got a frame may refuse to write a trailer
                pass
            finally:
                self._file.close()


def encode_mp4(frames: torch.Tensor | np.ndarray, encoding: VideoEncoding = VideoEncoding()) -> bytes:
    """uint8 frames [T, H, W, 3] -> an MP4 file in one call."""
    encoder = Mp4Encoder(frames.shape[2], frames.shape[1], encoding)
    encoder.write(frames)
    return encoder.finish()
