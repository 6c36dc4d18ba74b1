"""OpenAI Videos API requests (POST /v1/videos, POST /v1/videos/{id}/remix) -> `VideoRequest`.

OpenAI's fields: `prompt` (required), `model`, `seconds` (num_frames = 12 * seconds + 1: Lance makes 12
frames a second, 4k+1 frames, so seconds 0..10 in steps of 1/3), `size` ("WIDTHxHEIGHT"), and
`input_reference` (an image: the clip's first frame, i2v; a video file: video_edit). Lance's knobs
(knobs.py: num_frames, fps, lossless, num_inference_steps, seed, cfg_*, negative_prompt, resolution,
...) are read top level or in `extra_body` / `extra_args`, as on the other routes; a knob that does not
apply to the routed task is accepted and reported in the video object's `lance.ignored_params`.
The body is JSON or multipart/form-data (what the OpenAI SDK sends); a remix is JSON.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from stages.lance.requests import VideoRequest

from .errors import bad_request, validation_error
from .knobs import RequestLimits, check_num_frames, ignored_knobs, knob_sources, resolution_for
from .other_fields import screen_other_fields
from .request_parsing import ImageKnobs, _system_prompt, read_knobs, video_request
from .chat_messages import unwrap_prompt

FRAMES_PER_SECOND = 12   # upstream's rate: seconds -> frames, and the default output fps


class VideoCreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str
    model: Optional[str] = None
    seconds: Union[str, int, float, None] = None
    input_reference: Optional[dict[str, Any]] = None   # JSON: {"image_url": "data:..."}
    extra_body: Optional[dict[str, Any]] = None
    extra_args: Optional[dict[str, Any]] = None


@dataclass
class ParsedVideo:
    request: VideoRequest
    model: Optional[str]
    task: str
    ignored_params: list[str]
    size: str        # "WIDTHxHEIGHT" of t2v; the bucketed size of i2v / video_edit once known
    seconds: str


def frames_of_seconds(seconds: Union[str, int, float], limits: RequestLimits) -> int:
    try:
        s = Fraction(str(seconds).strip())
    except (ValueError, ZeroDivisionError):
        raise bad_request(f"seconds {seconds!r} is not a number", param="seconds",
                          code="invalid_value") from None
    frames = FRAMES_PER_SECOND * s + 1
    top = (limits.max_num_frames - 1) / FRAMES_PER_SECOND
    if frames.denominator != 1 or s < 0 or frames > limits.max_num_frames \
            or (int(frames) - 1) % limits.frame_stride:
        raise bad_request(f"seconds {seconds} does not give a Lance clip: frames are "
                          f"{FRAMES_PER_SECOND} * seconds + 1, 4k+1, at most "
                          f"{limits.max_num_frames}; send seconds from 0 to {top:g} in steps of "
                          f"1/3 (e.g. 4 or 10), or num_frames", param="seconds",
                          code="invalid_value")
    return check_num_frames(int(frames), limits, "seconds")


def seconds_of_frames(num_frames: int) -> str:
    return f"{(num_frames - 1) / FRAMES_PER_SECOND:g}"


def parse_video_create(req: VideoCreateRequest, image, video, limits: RequestLimits, *,
                       from_form: bool, reserved: tuple[str, ...] = ()) -> ParsedVideo:
    """`image` (i2v) or `video` (video_edit, a VideoClip) is the decoded input_reference, if any."""
    top_level = {k: v for k, v in (req.model_extra or {}).items() if k not in reserved}
    knobs, other = read_knobs(knob_sources(top_level, req.extra_body, req.extra_args),
                              from_form=from_form)
    if knobs.modalities not in (None, ["video"]):
        raise bad_request("the videos API makes videos: leave modalities out (text answers are "
                          "served on /v1/chat/completions)", param="modalities",
                          code="unsupported_modality")
    if knobs.n is not None and knobs.n != 1 or knobs.num_outputs_per_prompt not in (None, 1):
        raise bad_request("one video per job: leave n out", param="n", code="unsupported_parameter")
    ignored = set(screen_other_fields(other, image_output=True, typed=not from_form))
    image_knobs = ImageKnobs.of(knobs, limits)
    num_frames = image_knobs.num_frames
    if req.seconds is not None:
        from_seconds = frames_of_seconds(req.seconds, limits)
        if num_frames is not None and num_frames != from_seconds:
            raise bad_request(f"seconds {req.seconds} ({from_seconds} frames) and num_frames "
                              f"{num_frames} disagree: send one of them", param="num_frames",
                              code="conflicting_values")
        num_frames = from_seconds
    template_system, prompt = unwrap_prompt(req.prompt, "prompt")
    system_prompt = _system_prompt([("prompt (template)", template_system)]
                                   if template_system else [], knobs)
    task = "video_edit" if video is not None else "i2v" if image is not None else "t2v"
    resolution_for(knobs, task)
    from dataclasses import replace
    request = video_request(task, prompt, "prompt", image, video, knobs,
                            replace(image_knobs, num_frames=num_frames), system_prompt,
                            f"video_{uuid.uuid4().hex}")
    ignored |= ignored_knobs(knobs, task)
    if req.seconds is not None and task == "video_edit":
        ignored.add("seconds")   # an edit keeps its input's sampled length
    size = f"{request.width}x{request.height}" if task == "t2v" else "auto"
    seconds = seconds_of_frames(request.num_frames) if request.num_frames else "auto"
    return ParsedVideo(request, req.model, task, sorted(ignored), size, seconds)


def validated_create(fields: dict) -> VideoCreateRequest:
    try:
        return VideoCreateRequest.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e) from None
