"""Typed requests the ingress hands to the stages (no HTTP in here, no model code).

One definition for the ingress, the thinker, the DiT stage and the offline pipeline: the defaults are
upstream's (`inference_lance.sh`, lance_spec.md §3.8), so a request that sets nothing gets upstream's image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from .limits import CFG_RENORM_TYPES, MIN_VIDEO_FPS

ImageTask = Literal["t2i", "image_edit"]
VideoTask = Literal["t2v", "i2v", "video_edit"]
TextTask = Literal["x2t_image", "x2t_video", "chat"]
DEFAULT_T2I_SIZE = 768  # upstream's t2i height and width (inference_lance.sh)


@dataclass(frozen=True)
class DenoiseParams:
    """Knobs of the flow-matching loop (lance_spec.md §3.4, §3.5)."""

    num_inference_steps: int = 30
    timestep_shift: float = 3.5
    cfg_text_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: Literal[CFG_RENORM_TYPES] = "global"
    cfg_renorm_min: float = 0.0
    seed: int = 42

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_text_scale != 1.0


IMAGE_FORMATS = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}   # format -> media type


@dataclass(frozen=True)
class ImageEncoding:
    """How a finished image is encoded for the response. PNG (lossless) is the default; the OpenAI
    images API's `output_format` / `output_compression` pick WebP or JPEG (lossy, smaller, faster)."""

    format: Literal["png", "webp", "jpeg"] = "png"
    quality: int = 100                 # webp/jpeg: 0..100 (OpenAI's output_compression); png ignores it
    png_compress_level: int = 6        # zlib level 0..9 (PIL's default 6); the pixels are the same at any level

    def __post_init__(self):
        if self.format not in IMAGE_FORMATS:
            raise ValueError(f"unknown image format {self.format!r} ({', '.join(IMAGE_FORMATS)})")
        if not 0 <= self.quality <= 100:
            raise ValueError(f"quality must be in [0, 100], got {self.quality}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must be in [0, 9], got {self.png_compress_level}")

    @property
    def media_type(self) -> str:
        return IMAGE_FORMATS[self.format]


@dataclass
class ImageRequest:
    """t2i (no image) or image_edit (one input image)."""

    task: ImageTask
    prompt: str
    height: int | None = None          # t2i target size; edits take the bucketed input size
    width: int | None = None
    image: Image.Image | None = None
    resolution: str = "image_768res"   # bucket preset of the edit input (lance_spec.md §4.2)
    negative_prompt: str | None = None  # replaces the caption in the text-uncond branch
    system_prompt: str | None = None    # None: upstream's system prompt for the task
    params: DenoiseParams = field(default_factory=DenoiseParams)
    request_id: str = ""
    encoding: ImageEncoding = ImageEncoding()   # of the finished image (the DiT stage encodes)


# Upstream's video defaults (README / inference_lance.sh): t2v 121 frames at 480x848, i2v 61 frames.
T2V_DEFAULT_FRAMES, T2V_DEFAULT_SIZE = 121, (480, 848)
I2V_DEFAULT_FRAMES = 61


@dataclass
class ChatTurn:
    role: Literal["system", "user", "assistant"]
    text: str


@dataclass
class TextRequest:
    """Understanding (an image and a question) or plain chat, generated token by token."""

    task: TextTask
    turns: list[ChatTurn]                # user/assistant turns in order; the last one is the user's
    image: Image.Image | None = None     # x2t_image: placed before the text of the first user turn
    video: Any = None                    # x2t_video: a video file path or an object with .frames and .fps, placed alike
    system_prompt: str | None = None
    resolution: str = "image_768res"     # x2t_video: a video preset ("video_480p")
    max_tokens: int = 256
    temperature: float = 0.0             # 0 = greedy, as upstream
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    request_id: str = ""


VIDEO_FORMATS = {"mp4": "video/mp4"}   # format -> media type
DEFAULT_VIDEO_FPS = 12.0               # upstream saves generated videos at 12 fps (its frame sampler's rate)


@dataclass(frozen=True)
class VideoEncoding:
    """How a finished video is encoded for the response: H.264 in MP4.

    Default: yuv420p at `crf` (plays everywhere, lossy). `lossless`: H.264 RGB at qp 0 (libx264rgb),
    which decodes to exactly the generated frames - the path for checking frames, not for browsers.
    """

    format: Literal["mp4"] = "mp4"
    fps: float = DEFAULT_VIDEO_FPS
    lossless: bool = False
    crf: int = 18          # x264 constant rate factor 0..51 (lower = better); ignored when lossless
    preset: str = "fast"   # x264 speed/size trade-off

    def __post_init__(self):
        if self.format not in VIDEO_FORMATS:
            raise ValueError(f"unknown video format {self.format!r} ({', '.join(VIDEO_FORMATS)})")
        if not MIN_VIDEO_FPS <= self.fps <= 240:
            raise ValueError(f"fps must be in [{MIN_VIDEO_FPS:g}, 240], got {self.fps}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
        if self.preset not in X264_PRESETS:
            raise ValueError(f"unknown x264 preset {self.preset!r} ({', '.join(X264_PRESETS)})")

    @property
    def media_type(self) -> str:
        return VIDEO_FORMATS[self.format]


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass
class VideoRequest:
    """t2v (text only), i2v (a first-frame image) or video_edit (an input video)."""

    task: VideoTask
    prompt: str
    num_frames: int | None = None       # t2v / i2v (4k+1); video_edit takes the sampled input's count
    height: int | None = None           # t2v; i2v and video_edit take the bucketed input size
    width: int | None = None
    image: Image.Image | None = None    # i2v
    video: Any = None                   # video_edit: a video file path or an object with .frames and .fps
    resolution: str = "video_480p"      # bucket preset of the i2v image / video_edit input (spec §4.2)
    negative_prompt: str | None = None
    system_prompt: str | None = None
    params: DenoiseParams = field(default_factory=DenoiseParams)
    request_id: str = ""
    encoding: VideoEncoding = VideoEncoding()   # of the finished video (the DiT stage encodes it)
