"""Generation knobs and request limits: where clients may put a knob, and what values are valid.

Knobs (height, width, size, num_inference_steps, seed, negative_prompt, cfg_*, ...) are read
wherever clients put them (spec §7.3): top level (the OpenAI SDK flattens `extra_body` into the
payload), a nested `extra_body` object (raw JSON, read the way vLLM-Omni reads
`request.extra_body or request.model_extra`) and vLLM-Omni's `extra_args`. The same key given twice
with different values is an error, never a silent pick. Image sizes are multiples of 16 between 64
(a 4x4 latent grid; smaller is not a meaningful image) and the model's maximum, 1024
(max_latent_size 64 x VAE downsample 16).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import ConfigDict, Field, ValidationError, field_validator

from stages.lance.requests import DenoiseParams

from .errors import bad_request, validation_error
from .strict_model import StrictModel


@dataclass(frozen=True)
class RequestLimits:
    """What the served model and the operator allow; the builder fills it from the stage graph."""

    max_image_side: int = 1024      # latent max_latent_size (64) * VAE downsample (16)
    min_image_side: int = 64        # 4x4 latents; smaller sizes are not meaningful images
    size_multiple: int = 16         # one latent token per 16x16 pixels
    max_inference_steps: int = 200
    max_input_images: int = 1       # Lance_3B edits and understands one image per request
    max_new_tokens: int = 8192      # the thinker's max_model_len
    max_n: int = 4                  # images per /v1/images request
    max_image_bytes: int = 20 * 2**20
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
    cfg_text_scale: Optional[float] = Field(None, ge=0, le=100)
    timestep_shift: Optional[float] = Field(None, gt=0, le=100)
    cfg_interval: Optional[list[float]] = Field(None, min_length=2, max_length=2)  # [low, high]
    cfg_renorm_type: Optional[Literal["global", "channel", "none", ""]] = None
    cfg_renorm_min: Optional[float] = Field(None, ge=0, le=1)
    cfg_img_scale: Optional[float] = None            # Lance's image CFG is off: only 1.0
    system_prompt: Optional[str] = None
    resolution: Optional[Literal["image_768res", "image_512res", "image_256res"]] = None
    do_sample: Optional[bool] = None                 # vLLM-Omni x2t sampling switch
    text_temperature: Optional[float] = Field(None, ge=0, le=2)

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


IMAGE_KNOBS = frozenset({"height", "width", "size", "num_inference_steps", "negative_prompt",
                         "cfg_text_scale", "timestep_shift", "cfg_interval", "cfg_renorm_type",
                         "cfg_renorm_min", "cfg_img_scale", "resolution"})
TEXT_KNOBS = frozenset({"do_sample", "text_temperature"})
_GUIDANCE = "Lance has no {k}; its text guidance knob is cfg_text_scale"
_VIDEO = "video generation is not served by this deployment (image checkpoint)"
UNSUPPORTED_KNOBS = {
    "guidance_scale": _GUIDANCE, "true_cfg_scale": _GUIDANCE, "cfg_scale": _GUIDANCE,
    "guidance_scale_2": _GUIDANCE, "num_frames": _VIDEO, "video_height": _VIDEO,
    "video_width": _VIDEO, "origin_fps": _VIDEO,
    "think": "think mode is not supported: upstream Lance has none (spec §3.9)",
    "max_think_tokens": "think mode is not supported: upstream Lance has none (spec §3.9)",
    "num_outputs_per_prompt": "one image per chat completion; use n on /v1/images/generations",
    "lora": "LoRA adapters are not supported", "layers": "{k} is not supported by Lance",
    "user_text": "send the user's text as the message content",
}
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
    for key in values:
        if key in UNSUPPORTED_KNOBS:
            raise bad_request(UNSUPPORTED_KNOBS[key].format(k=key), param=key,
                              code="unsupported_parameter")
    try:
        if from_form:  # multipart values arrive as strings: coerce "30" -> 30
            return GenerationKnobs.model_validate(values)
        # JSON types are checked strictly ("30" is not a number), through pydantic's JSON mode.
        return GenerationKnobs.model_validate_json(json.dumps(values), strict=True)
    except ValidationError as e:
        raise validation_error(e) from None


def knob_sources(extra: dict, extra_body: dict | None, extra_args: dict | None,
                  seed: int | None) -> list[tuple[str, dict]]:
    body = dict(extra_body or {})
    nested_args = body.pop("extra_args", None)
    body.pop("modalities", None)
    return [("top level", dict(extra, **({"seed": seed} if seed is not None else {}))),
            ("extra_body", body), ("extra_args", extra_args), ("extra_body.extra_args", nested_args)]


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


def denoise_params(k: GenerationKnobs, limits: RequestLimits) -> DenoiseParams:
    if k.num_inference_steps is not None and k.num_inference_steps > limits.max_inference_steps:
        raise bad_request(f"num_inference_steps {k.num_inference_steps} is outside "
                          f"[1, {limits.max_inference_steps}]", param="num_inference_steps",
                          code="invalid_value")
    given = {"num_inference_steps": k.num_inference_steps, "timestep_shift": k.timestep_shift,
             "cfg_text_scale": k.cfg_text_scale, "cfg_renorm_min": k.cfg_renorm_min,
             "seed": k.seed,
             "cfg_interval": tuple(k.cfg_interval) if k.cfg_interval is not None else None,
             "cfg_renorm_type": "none" if k.cfg_renorm_type == "" else k.cfg_renorm_type}
    return DenoiseParams(**{name: v for name, v in given.items() if v is not None})
