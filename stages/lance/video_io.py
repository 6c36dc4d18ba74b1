"""Input videos: decode a file with PyAV and sample the frames Lance sees (upstream's frame sampler).

Upstream reads videos with decord and samples one clip covering the whole video with its
`MultiClipsFrameSampler(temporal=4, sample_fps=12, max_duration=6, length_type="kn+1",
assert_seconds=False, truncate=False)`: the frame rate is rounded to an integer first, the frame
count is `round(min(n / fps, 6) * 12)` forced down to 4k+1, and the indices are
`np.linspace(0, n - 1, count, dtype=int)` (spec §4.2). A video is either a path to a file (its own
frame rate is used) or any object with `.frames` (uint8 [N, H, W, 3] or a list of images) and `.fps`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

SAMPLE_FPS = 12         # frames per second Lance sees
MAX_DURATION_S = 6.0    # longer videos are sampled more sparsely, never beyond this many seconds of frames
TEMPORAL_STRIDE = 4     # Wan2.2 VAE temporal downsample: frame counts are 4k+1


@dataclass
class VideoClip:
    """Decoded frames of a video (uint8 [N, H, W, 3], RGB) and its frame rate."""

    frames: np.ndarray
    fps: float

    def __post_init__(self):
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f"video frames must be uint8 [N, H, W, 3], got {self.frames.dtype} "
                             f"{list(self.frames.shape)}")
        if len(self.frames) == 0:
            raise ValueError("the video has no frames")


def sampled_frame_count(total_frames: int, fps: float, sample_fps: int = SAMPLE_FPS,
                        max_duration: float = MAX_DURATION_S, temporal: int = TEMPORAL_STRIDE) -> int:
    """How many frames upstream samples from a video of `total_frames` at `fps` (4k+1, at least 1)."""
    fps = int(round(float(fps)))  # upstream: int(round(decord's average fps))
    if total_frames < 1 or fps < 1:
        raise ValueError(f"cannot sample frames from a video of {total_frames} frames at {fps} fps")
    n = int(round(min(total_frames / fps, max_duration) * sample_fps))  # Python round: half to even
    n = n // temporal * temporal + 1 - (temporal if n % temporal == 0 else 0)
    # Upstream fails on videos shorter than ~1/24 s (n <= 0); the one frame they have is what they mean.
    return max(n, 1)


def video_frame_indices(total_frames: int, fps: float, sample_fps: int = SAMPLE_FPS,
                        max_duration: float = MAX_DURATION_S, temporal: int = TEMPORAL_STRIDE) -> list[int]:
    """Frame indices upstream samples: `sampled_frame_count` frames spread evenly over the whole video."""
    n = sampled_frame_count(total_frames, fps, sample_fps, max_duration, temporal)
    return np.linspace(0, total_frames - 1, n, dtype=int).tolist()


# ---------------------------------------------------------------------------------------------
# Decoding files (PyAV)
# ---------------------------------------------------------------------------------------------

def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    if stream.duration and stream.time_base and stream.frames:
        return stream.frames / float(stream.duration * stream.time_base)
    raise ValueError("the video file does not state its frame rate")


def _frame_count(path: str) -> int:
    """Frames of the first video stream: the container's count, else its packets (no decoding)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def probe_video(path: str | os.PathLike) -> tuple[int, float]:
    """(frame count, frame rate) of a video file's first video stream."""
    import av

    path = str(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{Path(path).name} has no video stream")
            fps = _stream_fps(container.streams.video[0])
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read {Path(path).name} as a video: {e}") from None
    return _frame_count(path), fps


def decode_video_frames(path: str | os.PathLike, indices: Sequence[int] | None = None) -> np.ndarray:
    """Decode the frames at `indices` (all frames if None) as uint8 [len, H, W, 3] RGB.

    Frames are decoded in order and only the wanted ones are kept, so a long video never sits in
    memory whole. Repeated indices repeat the frame.
    """
    import av

    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    last = None if wanted is None else wanted[-1]
    keep: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if wanted is None or i in wanted:
                keep[i] = frame.to_ndarray(format="rgb24")
            if last is not None and i >= last:
                break
    if not keep:
        raise ValueError(f"{Path(path).name} has no decodable video frames")
    order = sorted(keep) if indices is None else [int(i) for i in indices]
    missing = [i for i in order if i not in keep]
    if missing:
        raise IndexError(f"{Path(path).name} has {max(keep) + 1} decodable frames, frame {missing[0]} was asked for")
    return np.stack([keep[i] for i in order])


def read_video(path: str | os.PathLike) -> VideoClip:
    """Every frame of a video file and its frame rate."""
    _, fps = probe_video(path)
    return VideoClip(decode_video_frames(path), fps)


# ---------------------------------------------------------------------------------------------
# What Lance sees
# ---------------------------------------------------------------------------------------------

def _as_uint8_frames(frames: Any) -> np.ndarray:
    if isinstance(frames, np.ndarray):
        array = frames
    elif hasattr(frames, "numpy") and hasattr(frames, "dim"):  # a torch tensor
        array = frames.detach().cpu().numpy()
    else:
        array = np.stack([np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f) for f in frames])
    if array.dtype != np.uint8:
        raise ValueError(f"video frames must be uint8 RGB, got {array.dtype}")
    return array


def sample_video(video: Any) -> tuple[list[int], list[Image.Image]]:
    """Upstream's frame sampling of a video (a file path, a `VideoClip`, any object with `.frames` and `.fps`,
    or a dict with those keys): the sampled indices and the frames as RGB PIL images."""
    if isinstance(video, (str, os.PathLike)):
        total, fps = probe_video(video)
        indices = video_frame_indices(total, fps)
        try:
            frames = decode_video_frames(video, indices)
        except IndexError:  # the container over-stated its frame count: count by decoding
            total = len(decode_video_frames(video))
            indices = video_frame_indices(total, fps)
            frames = decode_video_frames(video, indices)
    elif (hasattr(video, "frames") and hasattr(video, "fps")) or (isinstance(video, Mapping) and {"frames", "fps"} <= video.keys()):
        frames, fps = (video["frames"], video["fps"]) if isinstance(video, Mapping) else (video.frames, video.fps)
        clip = VideoClip(_as_uint8_frames(frames), float(fps))
        indices = video_frame_indices(len(clip.frames), clip.fps)
        frames = clip.frames[indices]
    else:
        raise TypeError("a video is a path to a video file or an object with .frames and .fps (or such a dict), "
                        f"got {type(video).__name__}")
    return indices, [Image.fromarray(np.ascontiguousarray(f)) for f in frames]


# ---------------------------------------------------------------------------------------------
# Encoding generated videos (PyAV, H.264 MP4)
# ---------------------------------------------------------------------------------------------

class Mp4Writer:
    """H.264 MP4 in memory, written frame chunk by frame chunk (e.g. as the VAE decodes them).

    yuv420p (what browsers and players take) at `fps` (upstream saves at 12 fps); `crf` 18 is visually
    close to lossless. Width and height must be even (Lance's are multiples of 16)."""

    def __init__(self, width: int, height: int, fps: int = SAMPLE_FPS, crf: int = 18):
        import io

        import av

        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs an even size, got {width}x{height}")
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=fps)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": str(crf)}
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        """uint8 [T, H, W, 3] RGB frames."""
        import av

        for frame in np.asarray(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> bytes:
        """Flush the encoder and return the file's bytes."""
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        return self._buffer.getvalue()


def encode_mp4(frames: np.ndarray, fps: int = SAMPLE_FPS, crf: int = 18) -> bytes:
    """uint8 frames [T, H, W, 3] -> H.264 MP4 bytes."""
    frames = np.asarray(frames)
    writer = Mp4Writer(frames.shape[2], frames.shape[1], fps, crf)
    writer.write(frames)
    return writer.close()
