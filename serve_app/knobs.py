"""Generation knobs and request limits: where clients may put a knob, and what values are valid.

Knobs (height, width, size, num_inference_steps, seed, negative_prompt, cfg_*, modalities, ...) are
read wherever clients put them: top level (the OpenAI SDK flattens `extra_body` into the payload), a
nested `extra_body` object (raw JSON, read the way vLLM-Omni reads `request.extra_body or
request.model_extra`) and vLLM-Omni's `extra_args`. The same key given twice with different values
is an error, never a silent pick; so are two names of one knob (`guidance_scale` and
`cfg_text_scale`) with different values.

Every knob's value is checked whatever the task; a valid knob that does not apply to the task the
request is routed to (`KNOBS_BY_TASK`) is ignored and reported (`ignored_knobs`), never an error.
Image sizes are multiples of 16 between 64 (a 4x4 latent grid; smaller is not a meaningful image) and
the model's maximum, 1024 (max_latent_size 64 x VAE downsample 16); videos use the same sides
(default 848x480) and 4k+1 frames up to 121 (the 31 latent frames of the position table).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import ConfigDict, Field, ValidationError, field_validator

from stages.lance.limits import (CFG_RENORM_TYPES, IMAGE_SIDE_MULTIPLE, MAX_CFG_RENORM_MIN, MAX_CFG_TEXT_SCALE,
                                 MAX_IMAGE_SIDE, MAX_INFERENCE_STEPS, MAX_INPUT_IMAGES, MAX_TIMESTEP_SHIFT,
                                 MIN_IMAGE_SIDE, MIN_VIDEO_FPS)
from stages.lance.requests import DenoiseParams

from .errors import bad_request, validation_error
from .stage_graph import DEFAULT_MAX_MODEL_LEN
from .strict_model import StrictModel


@dataclass(frozen=True)
class RequestLimits:
    """What the served model and the operator allow; the builder fills it from the stage graph."""

    max_image_side: int = MAX_IMAGE_SIDE
    min_image_side: int = MIN_IMAGE_SIDE
    size_multiple: int = IMAGE_SIDE_MULTIPLE
    max_inference_steps: int = MAX_INFERENCE_STEPS
    max_input_images: int = MAX_INPUT_IMAGES
    max_new_tokens: int = DEFAULT_MAX_MODEL_LEN   # the thinker's max_model_len
    max_n: int = 4                  # images per /v1/images request
    max_image_bytes: int = 20 * 2**20
    max_video_bytes: int = 64 * 2**20   # an input video (data URL or upload)
    max_num_frames: int = 121       # 4k+1 output frames; 31 latent frames of the position table
    frame_stride: int = 4           # the VAE's temporal downsample: frame counts are 4k+1
    max_fps: float = 120.0          # output frame rate (the frames are the same; only timing changes)
    allow_remote_images: bool = False
    remote_image_timeout_s: float = 10.0
    remote_image_hosts: tuple[str, ...] = ()   # allowlist (safe_fetch.py); empty: nothing fetched


class GenerationKnobs(StrictModel):
    """Lance knobs, as vLLM-Omni's Lance server names them. All optional: None = stage default."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    height: Optional[int] = None
    width: Optional[int] = None
    size: Optional[str] = None                       # "WIDTHxHEIGHT" (OpenAI order) or "auto"
    num_inference_steps: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    negative_prompt: Optional[str] = None
    cfg_text_scale: Optional[float] = Field(None, ge=0, le=MAX_CFG_TEXT_SCALE)
    # the ecosystem's names for cfg_text_scale (diffusers / SGLang-Diffusion / BAGEL / GLM-Image,
    # Qwen-Image, vLLM-Omni): the same classifier-free guidance scale on the text condition
    guidance_scale: Optional[float] = Field(None, ge=0, le=MAX_CFG_TEXT_SCALE)
    true_cfg_scale: Optional[float] = Field(None, ge=0, le=MAX_CFG_TEXT_SCALE)
    cfg_scale: Optional[float] = Field(None, ge=0, le=MAX_CFG_TEXT_SCALE)
    timestep_shift: Optional[float] = Field(None, gt=0, le=MAX_TIMESTEP_SHIFT)
    cfg_interval: Optional[list[float]] = Field(None, min_length=2, max_length=2)  # [low, high]
    cfg_renorm_type: Optional[Literal[CFG_RENORM_TYPES + ("",)]] = None   # "": vLLM-Omni's spelling of none
    cfg_renorm_min: Optional[float] = Field(None, ge=0, le=MAX_CFG_RENORM_MIN)
    cfg_img_scale: Optional[float] = None            # Lance's image CFG is off: only 1.0
    system_prompt: Optional[str] = None
    resolution: Optional[Literal["image_768res", "image_512res", "image_256res",
                                 "video_480p", "video_360p", "video_192p"]] = None
    num_frames: Optional[int] = None                 # videos: 4k+1 output frames (checked by route)
    fps: Optional[float] = Field(None, ge=MIN_VIDEO_FPS)   # videos: output frame rate (default 12)
    lossless: Optional[bool] = None                  # videos: H.264 RGB qp 0 (exact frames, big)
    do_sample: Optional[bool] = None                 # vLLM-Omni x2t sampling switch
    text_temperature: Optional[float] = Field(None, ge=0, le=2)
    modalities: Optional[list[str]] = None    # ["image"], ["video"] or ["text"]; checked when routing
    n: Optional[int] = Field(None, ge=1)             # images per request (image output)
    num_outputs_per_prompt: Optional[int] = Field(None, ge=1)   # vLLM-Omni's name for n

    @field_validator("cfg_interval")
    @classmethod
    def _interval(cls, v):
        if v is not None and not (0 <= v[0] <= v[1] <= 1):
            raise ValueError("cfg_interval must be [low, high] with 0 <= low <= high <= 1")
        return v

    @field_validator("cfg_img_scale")
    @classmethod
    def _img_cfg_off(cls, v):
        if v is not None and v != 1.0:
            raise ValueError("Lance serves image CFG off: cfg_img_scale must be 1.0")
        return v


# What each task reads; any other knob that was given is ignored and reported. seed, system_prompt,
# modalities and n are read by every task (seed seeds text sampling; n > 1 is refused for text).
_DENOISE = frozenset({"num_inference_steps", "cfg_text_scale", "guidance_scale", "true_cfg_scale",
                      "cfg_scale", "timestep_shift", "cfg_interval", "cfg_renorm_type",
                      "cfg_renorm_min", "cfg_img_scale"})
_SAMPLING = frozenset({"do_sample", "text_temperature"})
_EVERY_TASK = frozenset({"seed", "system_prompt", "modalities", "n", "num_outputs_per_prompt"})
_VIDEO_OUT = frozenset({"fps", "lossless"})
KNOBS_BY_TASK = {
    "t2i": _DENOISE | {"height", "width", "size", "negative_prompt"} | _EVERY_TASK,
    "t2v": _DENOISE | _VIDEO_OUT | {"height", "width", "size", "negative_prompt", "num_frames"}
    | _EVERY_TASK,
    # i2v: the video takes the image's aspect ratio at the `resolution` bucket (as image_edit)
    "i2v": _DENOISE | _VIDEO_OUT | {"resolution", "negative_prompt", "num_frames"} | _EVERY_TASK,
    # video_edit: the output has the input's sampled frame count and bucketed size
    "video_edit": _DENOISE | _VIDEO_OUT | {"resolution"} | _EVERY_TASK,
    "x2t_video": _SAMPLING | {"resolution"} | _EVERY_TASK,
    # an edit's output takes the input's aspect ratio at the `resolution` bucket (upstream's, and
    # vLLM-Omni's, behaviour): size / height / width do not apply; nor does negative_prompt, which
    # replaces the caption of t2i's text-uncond branch (an edit's uncond branch keeps the image)
    "image_edit": _DENOISE | {"resolution"} | _EVERY_TASK,
    "x2t_image": _SAMPLING | {"resolution"} | _EVERY_TASK,
    "chat": _SAMPLING | _EVERY_TASK,
}
CFG_TEXT_SCALE_NAMES = ("cfg_text_scale", "guidance_scale", "true_cfg_scale", "cfg_scale")
N_NAMES = ("n", "num_outputs_per_prompt")
DEFAULT_X2T_TEMPERATURE = 0.3   # vLLM-Omni's text_temperature when do_sample is on


# -- knobs ------------------------------------------------------------------------------------------

def merge_knob_sources(sources: list[tuple[str, dict]]) -> dict:
    """Merge knob dicts from the places clients put them; conflicting duplicates are a 400."""
    merged: dict = {}
    origin: dict[str, str] = {}
    for where, values in sources:
        if values is None:
            continue
        if not isinstance(values, dict):
            raise bad_request(f"{where} must be an object", param=where, code="invalid_type")
        for key, value in values.items():
            if key in merged and merged[key] != value:
                raise bad_request(f"{key} is given twice with different values ({origin[key]}: "
                                  f"{merged[key]!r}, {where}: {value!r})", param=key,
                                  code="conflicting_values")
            merged[key], origin[key] = value, where
    return merged


def validate_knobs(values: dict, *, from_form: bool = False) -> GenerationKnobs:
    try:
        if from_form:  # multipart values arrive as strings: coerce "30" -> 30
            return GenerationKnobs.model_validate(values)
        # JSON types are checked strictly ("30" is not a number), through pydantic's JSON mode.
        return GenerationKnobs.model_validate_json(json.dumps(values), strict=True)
    except ValidationError as e:
        raise validation_error(e) from None


def knob_sources(top_level: dict, extra_body: dict | None,
                 extra_args: dict | None) -> list[tuple[str, dict]]:
    body = dict(extra_body or {}) if isinstance(extra_body, dict) else extra_body
    nested_args = body.pop("extra_args", None) if isinstance(body, dict) else None
    return [("top level", top_level), ("extra_body", body), ("extra_args", extra_args),
            ("extra_body.extra_args", nested_args)]


def one_value(knobs: GenerationKnobs, names: tuple[str, ...]):
    """The value of a knob that has several names; names given with different values are a 400."""
    given = [(name, getattr(knobs, name)) for name in names if getattr(knobs, name) is not None]
    for name, value in given[1:]:
        if value != given[0][1]:
            raise bad_request(f"{given[0][0]} ({given[0][1]!r}) and {name} ({value!r}) are two names "
                              f"for one knob with different values: send one of them", param=name,
                              code="conflicting_values")
    return given[0][1] if given else None


def given_knobs(knobs: GenerationKnobs) -> set[str]:
    return {name for name in GenerationKnobs.model_fields if getattr(knobs, name) is not None}


def ignored_knobs(knobs: GenerationKnobs, task: str) -> set[str]:
    """The knobs given that the task does not read (accepted, ignored, reported)."""
    return given_knobs(knobs) - KNOBS_BY_TASK[task]


def _check_side(value: int, name: str, limits: RequestLimits) -> None:
    m = limits.size_multiple
    if value % m:
        raise bad_request(f"{name} {value} is not a multiple of {m}", param=name, code="invalid_size")
    if not limits.min_image_side <= value <= limits.max_image_side:
        raise bad_request(f"{name} {value} is outside [{limits.min_image_side}, "
                          f"{limits.max_image_side}] (the model's maximum is "
                          f"{limits.max_image_side})", param=name, code="invalid_size")


def target_size(k: GenerationKnobs, limits: RequestLimits) -> tuple[int | None, int | None]:
    """(height, width) from `size` and/or `height`+`width`; (None, None) = the stage's default."""
    from_size = None
    if k.size not in (None, "auto"):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", k.size)
        if m is None:
            raise bad_request(f"size {k.size!r} must be 'WIDTHxHEIGHT' (e.g. '768x768') or 'auto'",
                              param="size", code="invalid_size")
        from_size = (int(m.group(2)), int(m.group(1)))
    if (k.height is None) != (k.width is None):
        missing = "width" if k.width is None else "height"
        raise bad_request(f"give both height and width (or size); {missing} is missing",
                          param=missing, code="invalid_size")
    hw = (k.height, k.width) if k.height is not None else from_size
    if from_size and k.height is not None and from_size != hw:
        raise bad_request(f"size {k.size!r} disagrees with height {k.height} / width {k.width}",
                          param="size", code="conflicting_values")
    if hw is None:
        return None, None
    _check_side(hw[0], "height", limits)
    _check_side(hw[1], "width", limits)
    return hw


IMAGE_RESOLUTIONS = ("image_768res", "image_512res", "image_256res")
VIDEO_RESOLUTIONS = ("video_480p", "video_360p", "video_192p")
VIDEO_TASKS = ("t2v", "i2v", "video_edit", "x2t_video")


def resolution_for(k: GenerationKnobs, task: str) -> Optional[str]:
    """The bucket preset a task reads, checked against its family (image_* for images, video_* for
    videos); None: the stage's default. A preset of the other family is a 400 naming the right ones."""
    if k.resolution is None or "resolution" not in KNOBS_BY_TASK[task]:
        return None
    allowed = VIDEO_RESOLUTIONS if task in VIDEO_TASKS else IMAGE_RESOLUTIONS
    if k.resolution not in allowed:
        raise bad_request(f"resolution {k.resolution!r} is not a preset of {task}; use one of "
                          f"{', '.join(allowed)}", param="resolution", code="invalid_value")
    return k.resolution


def check_num_frames(value: int, limits: "RequestLimits", param: str = "num_frames") -> int:
    s, top = limits.frame_stride, limits.max_num_frames
    if not 1 <= value <= top or (value - 1) % s:
        raise bad_request(f"{param} {value} is not 4k+1 in [1, {top}]: send one of 1, 5, 9, ..., "
                          f"{top} (frames = {s}*(latent frames - 1) + 1)", param=param,
                          code="invalid_value")
    return value


def video_knobs(k: GenerationKnobs, limits: "RequestLimits") -> tuple[Optional[int], Optional[float]]:
    """(num_frames, fps), checked whatever the task; None = the default."""
    frames = None if k.num_frames is None else check_num_frames(k.num_frames, limits)
    if k.fps is not None and k.fps > limits.max_fps:   # the lower bound is the field's own (ge=MIN_VIDEO_FPS)
        raise bad_request(f"fps {k.fps} is outside [{MIN_VIDEO_FPS:g}, {limits.max_fps:g}]", param="fps",
                          code="invalid_value")
    return frames, k.fps


def denoise_params(k: GenerationKnobs, limits: RequestLimits) -> DenoiseParams:
    if k.num_inference_steps is not None and k.num_inference_steps > limits.max_inference_steps:
        raise bad_request(f"num_inference_steps {k.num_inference_steps} is outside "
                          f"[1, {limits.max_inference_steps}]", param="num_inference_steps",
                          code="invalid_value")
    given = {"num_inference_steps": k.num_inference_steps, "timestep_shift": k.timestep_shift,
             "cfg_text_scale": one_value(k, CFG_TEXT_SCALE_NAMES), "cfg_renorm_min": k.cfg_renorm_min,
             "seed": k.seed,
             "cfg_interval": tuple(k.cfg_interval) if k.cfg_interval is not None else None,
             "cfg_renorm_type": "none" if k.cfg_renorm_type == "" else k.cfg_renorm_type}
    return DenoiseParams(**{name: v for name, v in given.items() if v is not None})
