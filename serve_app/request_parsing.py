"""OpenAI requests -> typed stage requests (ImageRequest / TextRequest), with every check a 400.

Knobs and limits: knobs.py. Other servers' fields: other_fields.py. Messages: chat_messages.py.

Routing (`modalities`, a knob, defaults to ["text"] as OpenAI's):
  image out, no input image -> t2i     image out, one input image -> image_edit
  video out, no input -> t2v           video out, an image -> i2v     video out, a video -> video_edit
  text out, one input image -> x2t_image   text out, a video -> x2t_video   text out, neither -> chat

Every value is checked, whatever the task (a wrong one is a 400 naming the field); a valid parameter
that the routed task does not read is accepted and listed in `ignored_params`, which the response
carries in its `lance` object and X-Lance-Ignored-Params header.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, replace
from typing import Optional, Union

from pydantic import ValidationError

from stages.lance.requests import (I2V_DEFAULT_FRAMES, T2V_DEFAULT_FRAMES, T2V_DEFAULT_SIZE,
                                   IMAGE_FORMATS, DenoiseParams, ImageEncoding, ImageRequest,
                                   TextRequest, VideoEncoding, VideoRequest)

from .chat_messages import (Conversation, collect_messages, load_image, load_video,
                            no_special_tokens, one_system_prompt, unwrap_prompt)
from .errors import bad_request, validation_error
from .knobs import (DEFAULT_X2T_TEMPERATURE, N_NAMES, GenerationKnobs, RequestLimits, denoise_params,
                    ignored_knobs, knob_sources, merge_knob_sources, one_value, resolution_for,
                    target_size, validate_knobs, video_knobs)
from .openai_protocol import TEXT_OUTPUT_FIELDS, ChatCompletionRequest, ImageGenerationRequest
from .other_fields import screen_other_fields, split_other_fields


def _validated(model_cls, raw: bytes):
    try:
        return model_cls.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None


def read_knobs(sources: list[tuple[str, dict]], *,
               from_form: bool = False) -> tuple[GenerationKnobs, dict]:
    """(Lance's knobs, checked; the other servers' fields, to screen once the output is known)."""
    lance, other = split_other_fields(merge_knob_sources(sources))
    return validate_knobs(lance, from_form=from_form), other


@dataclass(frozen=True)
class ImageKnobs:
    """An image request's size and denoising knobs, checked for every request (text ones too)."""

    height: Optional[int]
    width: Optional[int]
    params: DenoiseParams
    num_frames: Optional[int] = None   # videos (None: the default)
    fps: Optional[float] = None

    @classmethod
    def of(cls, knobs: GenerationKnobs, limits: RequestLimits) -> "ImageKnobs":
        height, width = target_size(knobs, limits)
        return cls(height, width, denoise_params(knobs, limits), *video_knobs(knobs, limits))


# -- routing ----------------------------------------------------------------------------------------

def output_modality(modalities: list[str] | None) -> str:
    if modalities is None:
        return "text"
    if modalities in (["image"], ["video"], ["text"]):
        return modalities[0]
    raise bad_request(f"unsupported modalities {modalities}: use [\"image\"] (generate or edit an "
                      "image), [\"video\"] (generate or edit a video) or [\"text\"] (answer in "
                      "text)", param="modalities", code="unsupported_modality")


def route(output: str, has_image: bool, has_video: bool = False) -> str:
    if has_image and has_video:
        raise bad_request("send one image or one video per request, not both", param="messages",
                          code="too_many_inputs")
    if output == "image":
        if has_video:
            raise bad_request("a video input makes a video: send modalities [\"video\"] to edit it "
                              "or [\"text\"] to ask about it", param="modalities",
                              code="unsupported_modality")
        return "image_edit" if has_image else "t2i"
    if output == "video":
        return "video_edit" if has_video else "i2v" if has_image else "t2v"
    return "x2t_video" if has_video else "x2t_image" if has_image else "chat"


# -- how many images --------------------------------------------------------------------------------

def image_count(knobs: GenerationKnobs, limits: RequestLimits, stream: bool) -> int:
    """n (or num_outputs_per_prompt): images of one prompt, seeds seed, seed+1, ..."""
    n = one_value(knobs, N_NAMES) or 1
    name = "n" if knobs.n is not None else "num_outputs_per_prompt"
    if n > limits.max_n:
        raise bad_request(f"{name} {n} is outside [1, {limits.max_n}]", param=name,
                          code="invalid_value")
    if stream and n > 1:
        raise bad_request(f"a stream carries one image: send {name} 1 (or leave it out) with "
                          "stream, or stream false for several images", param=name,
                          code="unsupported_parameter")
    return n


def _one_text_answer(knobs: GenerationKnobs, what: str = "text output: one answer") -> None:
    n = one_value(knobs, N_NAMES)
    if n is not None and n != 1:
        name = "n" if knobs.n is not None else "num_outputs_per_prompt"
        raise bad_request(f"{name} must be 1 for {what} per chat completion "
                          "(send several requests)", param=name, code="unsupported_parameter")


def n_requests(first: ImageRequest, n: int) -> list[ImageRequest]:
    # n images of one prompt differ only by seed: seed, seed+1, ... (one seed would give n copies)
    if first.params.seed + n > 2**63:
        raise bad_request(f"seed {first.params.seed} leaves no room for n={n} seeds "
                          "(seed, seed+1, ...) below 2**63", param="seed", code="invalid_value")
    out = []
    for i in range(n):
        params = replace(first.params, seed=first.params.seed + i)
        rid = first.request_id if n == 1 else f"{first.request_id}-{i}"
        out.append(replace(first, params=params, request_id=rid))
    return out


# -- chat completions -------------------------------------------------------------------------------

@dataclass
class ParsedChat:
    # n images (seeds seed, seed+1, ...), or one video or one text
    requests: list[Union[ImageRequest, VideoRequest, TextRequest]]
    stream: bool
    include_usage: bool
    model: Optional[str]
    task: str
    ignored_params: list[str]
    return_token_ids: bool = False

    @property
    def request(self) -> Union[ImageRequest, VideoRequest, TextRequest]:
        return self.requests[0]


def _sampling(req: ChatCompletionRequest, k: GenerationKnobs, limits: RequestLimits) -> dict:
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree",
                          param="max_completion_tokens", code="conflicting_values")
    max_tokens = next((v for v in (req.max_completion_tokens, req.max_tokens) if v is not None), 256)
    if not 1 <= max_tokens <= limits.max_new_tokens:
        raise bad_request(f"max_tokens {max_tokens} is outside [1, {limits.max_new_tokens}]",
                          param="max_tokens", code="invalid_value")
    temperature = req.temperature
    if k.text_temperature is not None:
        if temperature is not None and temperature != k.text_temperature:
            raise bad_request("temperature and text_temperature disagree", param="text_temperature",
                              code="conflicting_values")
        temperature = k.text_temperature
    if k.do_sample is False:
        if temperature not in (None, 0):
            raise bad_request("do_sample is false but temperature > 0", param="do_sample",
                              code="conflicting_values")
        temperature = 0.0
    elif k.do_sample and temperature is None:
        temperature = DEFAULT_X2T_TEMPERATURE
    temperature = 0.0 if temperature is None else temperature
    if not (0 <= temperature <= 2 and math.isfinite(temperature)):
        raise bad_request(f"temperature {temperature} is outside [0, 2]", param="temperature",
                          code="invalid_value")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p {top_p} is outside (0, 1]", param="top_p", code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise bad_request("stop takes at most 4 non-empty strings", param="stop",
                          code="invalid_value")
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": stop}


def _system_prompt(candidates: list[tuple[str, str]], knobs: GenerationKnobs) -> Optional[str]:
    if knobs.system_prompt is not None:
        candidates = candidates + [("system_prompt",
                                    no_special_tokens(knobs.system_prompt, "system_prompt"))]
    return one_system_prompt(candidates)


def _check_image_count(conv: Conversation, limits: RequestLimits) -> None:
    if len(conv.images) > limits.max_input_images:
        raise bad_request(f"{len(conv.images)} images were sent; at most {limits.max_input_images} "
                          "per request", param=conv.images[-1].param, code="too_many_images")
    if len(conv.videos) > 1:
        raise bad_request(f"{len(conv.videos)} videos were sent; at most 1 per request",
                          param=conv.videos[-1].param, code="too_many_videos")


def _given_text_fields(req: ChatCompletionRequest) -> set[str]:
    return {name for name in TEXT_OUTPUT_FIELDS if getattr(req, name) not in (None, False)}


async def parse_chat_request(raw: bytes, limits: RequestLimits) -> ParsedChat:
    req = _validated(ChatCompletionRequest, raw)
    knobs, other_fields = read_knobs(knob_sources(req.model_extra or {}, req.extra_body,
                                                  req.extra_args))
    output = output_modality(knobs.modalities)
    ignored = set(screen_other_fields(other_fields, image_output=output != "text"))
    conv = collect_messages(req.messages)
    system_prompt = _system_prompt(conv.system_prompts, knobs)
    _check_image_count(conv, limits)
    image_knobs, sampling = ImageKnobs.of(knobs, limits), _sampling(req, knobs, limits)
    task = route(output, bool(conv.images), bool(conv.videos))
    resolution_for(knobs, task)
    image = await load_image(conv.images[0], limits) if conv.images else None
    video = await load_video(conv.videos[0], limits) if conv.videos else None
    request_id = f"chatcmpl-{uuid.uuid4().hex}"

    if output == "video":
        _one_text_answer(knobs, "video output: one video")
        requests = [video_request(task, conv.user_text(), "messages", image, video, knobs,
                                  image_knobs, system_prompt, request_id)]
        ignored |= _given_text_fields(req)
    elif output == "image":
        first = _image_request(task, conv.user_text(), "messages", image, knobs, image_knobs,
                               system_prompt, request_id)
        requests = n_requests(first, image_count(knobs, limits, req.stream))
        ignored |= _given_text_fields(req)
    else:
        _one_text_answer(knobs)
        requests = [_text_request(task, conv, image, video, knobs, sampling, system_prompt,
                                  request_id)]
        if sampling["temperature"] == 0 and knobs.seed is not None:
            ignored.add("seed")   # greedy decoding draws nothing
    ignored |= ignored_knobs(knobs, task)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ParsedChat(requests=requests, stream=req.stream, include_usage=include_usage,
                      model=req.model, task=task, ignored_params=sorted(ignored),
                      return_token_ids=bool(req.return_token_ids) and output == "text")


def _image_request(task: str, prompt: str, prompt_param: str, image, knobs: GenerationKnobs,
                   image_knobs: ImageKnobs, system_prompt: Optional[str],
                   request_id: str) -> ImageRequest:
    if not prompt.strip():
        raise bad_request("the prompt is empty", param=prompt_param, code="invalid_prompt")
    common = dict(task=task, prompt=prompt, system_prompt=system_prompt, params=image_knobs.params,
                  request_id=request_id)
    if task == "t2i":
        return ImageRequest(height=image_knobs.height, width=image_knobs.width,
                            negative_prompt=knobs.negative_prompt, **common)
    # an edit's output size is the input's bucketed size (see knobs.KNOBS_BY_TASK)
    extra = {"resolution": knobs.resolution} if knobs.resolution else {}
    return ImageRequest(image=image, **common, **extra)


def video_request(task: str, prompt: str, prompt_param: str, image, video,
                  knobs: GenerationKnobs, image_knobs: ImageKnobs, system_prompt: Optional[str],
                  request_id: str) -> VideoRequest:
    """t2v / i2v / video_edit with the offline pipeline's defaults (requests.VideoRequest)."""
    if not prompt.strip():
        raise bad_request("the prompt is empty", param=prompt_param, code="invalid_prompt")
    encoding = VideoEncoding(fps=image_knobs.fps or VideoEncoding.fps, lossless=bool(knobs.lossless))
    common = dict(task=task, prompt=prompt, system_prompt=system_prompt, params=image_knobs.params,
                  request_id=request_id, encoding=encoding)
    resolution = resolution_for(knobs, task)
    if resolution:
        common["resolution"] = resolution
    if task == "t2v":   # upstream's defaults: 121 frames of 848x480 (t2v), 61 frames (i2v)
        return VideoRequest(num_frames=image_knobs.num_frames or T2V_DEFAULT_FRAMES,
                            height=image_knobs.height or T2V_DEFAULT_SIZE[0],
                            width=image_knobs.width or T2V_DEFAULT_SIZE[1],
                            negative_prompt=knobs.negative_prompt, **common)
    if task == "i2v":
        return VideoRequest(num_frames=image_knobs.num_frames or I2V_DEFAULT_FRAMES, image=image,
                            negative_prompt=knobs.negative_prompt, **common)
    return VideoRequest(video=video, **common)


def _text_request(task: str, conv: Conversation, image, video, knobs: GenerationKnobs,
                  sampling: dict, system_prompt: Optional[str], request_id: str) -> TextRequest:
    turns = conv.turns
    for visual, what in ((conv.images, "image"), (conv.videos, "video")):
        if visual and visual[0].message_index != conv.first_user_message:
            raise bad_request(f"the {what} must be in the first user message",
                              param=visual[0].param, code=f"invalid_{what}_position")
    if turns[-1].role != "user":
        raise bad_request("the last message must be the user's", param="messages",
                          code="invalid_value")
    if image is None and video is None and not turns[-1].text.strip():
        raise bad_request("the last user message is empty", param="messages",
                          code="invalid_prompt")
    resolution = resolution_for(knobs, task)
    if resolution is None and task == "x2t_video":
        resolution = VideoRequest.resolution
    extra = {"resolution": resolution} if resolution else {}
    return TextRequest(task=task, turns=turns, image=image, video=video,
                       system_prompt=system_prompt, seed=knobs.seed, request_id=request_id,
                       **sampling, **extra)


# -- images API -------------------------------------------------------------------------------------

@dataclass
class ParsedImages:
    requests: list[ImageRequest]   # one per image asked for (n), seeds seed, seed+1, ...
    model: Optional[str]
    task: str
    ignored_params: list[str]


def _check_images_fields(req: ImageGenerationRequest, knobs: GenerationKnobs) -> None:
    if req.response_format not in (None, "b64_json"):
        raise bad_request("only response_format 'b64_json' is served (no image hosting)",
                          param="response_format", code="invalid_value")
    if req.output_format not in (None, *IMAGE_FORMATS):
        raise bad_request(f"output_format {req.output_format!r} is not served; use one of "
                          f"{', '.join(IMAGE_FORMATS)}", param="output_format", code="invalid_value")
    if req.output_compression is not None and not 0 <= req.output_compression <= 100:
        raise bad_request(f"output_compression {req.output_compression} is outside [0, 100]",
                          param="output_compression", code="invalid_value")
    if req.stream:
        raise bad_request("streaming is served on /v1/chat/completions (stream: true)",
                          param="stream", code="unsupported_parameter")
    if knobs.modalities not in (None, ["image"]):
        raise bad_request("the images API answers with images: leave modalities out (text answers "
                          "are served on /v1/chat/completions)", param="modalities",
                          code="unsupported_modality")


def _image_encoding(req: ImageGenerationRequest) -> ImageEncoding:
    # output_compression is the OpenAI API's webp/jpeg quality; a PNG is lossless and ignores it
    fmt = req.output_format or "png"
    quality = req.output_compression if req.output_compression is not None and fmt != "png" else 100
    return ImageEncoding(fmt, quality)


def parse_images_request(req: ImageGenerationRequest, image, limits: RequestLimits,
                         from_form: bool) -> ParsedImages:
    top_level = dict(req.model_extra or {})
    top_level.update({k: v for k, v in (("size", req.size), ("n", req.n)) if v is not None})
    knobs, other_fields = read_knobs(knob_sources(top_level, req.extra_body, req.extra_args),
                                     from_form=from_form)
    _check_images_fields(req, knobs)
    ignored = set(screen_other_fields(other_fields, image_output=True, typed=not from_form))
    template_system, prompt = unwrap_prompt(req.prompt, "prompt")
    system_prompt = _system_prompt([("prompt (template)", template_system)]
                                   if template_system else [], knobs)
    task = "image_edit" if image is not None else "t2i"
    first = _image_request(task, prompt, "prompt", image, knobs, ImageKnobs.of(knobs, limits),
                           system_prompt, f"img-{uuid.uuid4().hex}")
    first = replace(first, encoding=_image_encoding(req))
    requests = n_requests(first, image_count(knobs, limits, stream=False))
    ignored |= ignored_knobs(knobs, task)
    return ParsedImages(requests=requests, model=req.model, task=task,
                        ignored_params=sorted(ignored))


def parse_generation_json(raw: bytes, limits: RequestLimits) -> ParsedImages:
    return parse_images_request(_validated(ImageGenerationRequest, raw), None, limits,
                                from_form=False)


def form_fields(items: list[tuple[str, str]]) -> dict:
    """Multipart text fields -> dict. `key[]` repeats become lists; `a[b]` (how the OpenAI SDK
    sends a nested extra_body dict in a form) becomes {"a": {"b": ...}}; JSON-looking lists
    ("[0.4, 1.0]") are decoded so cfg_interval can be sent as one field."""
    out: dict = {}
    kinds: dict = {}   # how each name was sent: plain, key[] or key[sub]
    for key, value in items:
        if value.startswith("["):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):   # too deep is as undecodable as malformed
                pass
        m = re.fullmatch(r"([^\[\]]+)\[([^\[\]]*)\]", key)
        name, kind = (key, None) if m is None else (m.group(1), list if m.group(2) == "" else dict)
        if kinds.setdefault(name, kind) is not kind or (kind is None and name in out):
            raise bad_request(f"form field {name} is given twice", param=name,
                              code="conflicting_values")
        if kind is None:
            out[name] = value
        elif kind is list:
            out.setdefault(name, []).append(value)
        else:
            out.setdefault(name, {})[m.group(2)] = value
    return out


def parse_edit_form(fields: dict, image, limits: RequestLimits) -> ParsedImages:
    try:
        req = ImageGenerationRequest.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e) from None
    return parse_images_request(req, image, limits, from_form=True)

