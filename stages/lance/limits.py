"""What a request (and a deployment) may ask for: the single home of the knob, size and dtype limits.

The API (`serve_app/knobs.py`) rejects a request outside these limits with a 400 before any stage sees
it; the thinker, the DiT engine and the offline pipeline check the same limits for callers that reach
them directly. Import-light (no torch): the stage-graph schema and deployment tooling read it too.
"""
from __future__ import annotations

from .config import VAE_SPATIAL_DOWNSAMPLE, LatentConfig

# Denoising
MAX_INFERENCE_STEPS = 200
CFG_RENORM_TYPES = ("global", "channel", "none")
MAX_CFG_TEXT_SCALE = 100.0
MAX_TIMESTEP_SHIFT = 100.0
MAX_CFG_RENORM_MIN = 1.0      # the renorm ratio is clamped to [renorm_min, 1]

# Image sizes: one latent token per 16x16 pixels, at most max_latent_size (64) tokens per side.
IMAGE_SIDE_MULTIPLE = VAE_SPATIAL_DOWNSAMPLE
MAX_IMAGE_SIDE = LatentConfig().max_image_side
MIN_IMAGE_SIDE = 64     # what the API serves: smaller than 4x4 latents is not a meaningful image

# Videos: 4k+1 frames, at most 121 (31 latent frames, the latent position table of Lance_3B_Video).
MAX_NUM_FRAMES = LatentConfig().max_num_frames
# The MP4 writer's frame rate is a fraction with a denominator of at most 1001 (stages/dit/video.py): a
# rate much below 1/1000 fps (one frame per ~17 minutes) rounds to 0 there.
MIN_VIDEO_FPS = 0.001

# Inputs: Lance_3B edits and understands one image per request.
MAX_INPUT_IMAGES = 1

# Model dtypes by name ("auto": bfloat16 on a GPU, float32 on the CPU); the aliases are accepted too.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class LimitError(ValueError):
    """A request value outside the limits; `param` names the knob."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def check_image_size(height: int, width: int, latent: LatentConfig = LatentConfig()) -> None:
    """A generated image's size must be whole latent tokens and within the model's largest latent grid."""
    m = latent.spatial_downsample
    if height % m or width % m:
        raise LimitError(f"height and width must be multiples of {m}, got {height}x{width}", "size")
    if max(height, width) > latent.max_image_side:
        raise LimitError(f"at most {latent.max_image_side} px per side, got {height}x{width}", "size")


def check_target_size(num_frames: int, height: int, width: int,
                      latent: LatentConfig = LatentConfig()) -> tuple[int, int, int]:
    """The latent grid (t, h, w) of a generated image or video, or a LimitError naming what is wrong.

    Frame counts are 4k+1 (the VAE keeps frame 0 alone, then 4 frames per latent frame); another count
    rounds down to 4k+1 as upstream's `t = (frames - 1) // 4 + 1` does. The latent position table covers
    `max_latent_frames` (31: 121 frames) x `max_latent_size`^2."""
    if num_frames < 1:
        raise LimitError(f"num_frames must be at least 1, got {num_frames}", "num_frames")
    if min(height, width) < latent.spatial_downsample:
        raise LimitError(f"height and width must be positive multiples of {latent.spatial_downsample}, "
                         f"got {height}x{width}", "size")
    check_image_size(height, width, latent)
    grid = latent.latent_grid(num_frames, height, width)
    if grid[0] > latent.max_latent_frames:
        raise LimitError(f"num_frames {num_frames} is more than the {latent.max_num_frames} frames "
                         f"({latent.max_latent_frames} latent frames) the model supports", "num_frames")
    return grid


def check_denoise_params(p) -> None:
    """The knobs of one denoising loop (`stages.lance.requests.DenoiseParams`)."""
    if not 1 <= p.num_inference_steps <= MAX_INFERENCE_STEPS:
        raise LimitError(f"num_inference_steps must be in [1, {MAX_INFERENCE_STEPS}], got {p.num_inference_steps}",
                         "num_inference_steps")
    if not 0 < p.timestep_shift <= MAX_TIMESTEP_SHIFT:
        raise LimitError(f"timestep_shift must be in (0, {MAX_TIMESTEP_SHIFT:g}], got {p.timestep_shift}",
                         "timestep_shift")
    if not 0 <= p.cfg_text_scale <= MAX_CFG_TEXT_SCALE:
        raise LimitError(f"cfg_text_scale must be in [0, {MAX_CFG_TEXT_SCALE:g}], got {p.cfg_text_scale}",
                         "cfg_text_scale")
    lo, hi = p.cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise LimitError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {p.cfg_interval}", "cfg_interval")
    if p.cfg_renorm_type not in CFG_RENORM_TYPES:
        raise LimitError(f"cfg_renorm_type must be one of {', '.join(CFG_RENORM_TYPES)}; got {p.cfg_renorm_type!r}",
                         "cfg_renorm_type")
    if not 0 <= p.cfg_renorm_min <= MAX_CFG_RENORM_MIN:
        raise LimitError(f"cfg_renorm_min must be in [0, {MAX_CFG_RENORM_MIN:g}], got {p.cfg_renorm_min}",
                         "cfg_renorm_min")


def torch_dtype(name: str):
    """The torch dtype of a name in DTYPE_NAMES (or an alias)."""
    import torch

    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r} (auto, {', '.join(DTYPE_NAMES + tuple(DTYPE_ALIASES))})")
    return getattr(torch, name)
