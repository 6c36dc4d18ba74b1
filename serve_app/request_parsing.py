"""OpenAI requests -> typed stage requests (ImageRequest / TextRequest), with every check a 400.

Generation knobs (height, width, size, num_inference_steps, seed, negative_prompt, cfg_*, ...)
are read wherever clients put them (spec §7.3): top level (the OpenAI SDK flattens `extra_body`
into the payload), a nested `extra_body` object (raw JSON, read the way vLLM-Omni reads
`request.extra_body or request.model_extra`) and vLLM-Omni's `extra_args`. The same key given twice
with different values is an error, never a silent pick.

Routing (`modalities` defaults to ["text"], as OpenAI's):
  image out, no input image -> t2i     image out, one input image -> image_edit
  text out, one input image -> x2t_image   text out, no image -> chat
"""
from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, replace
from typing import Literal, Optional, Union

from pydantic import ConfigDict, Field, ValidationError, field_validator

from stages.lance.requests import ChatTurn, DenoiseParams, ImageRequest, TextRequest

from .errors import OpenAIError, bad_request, validation_error
from .media import decode_data_url, fetch_remote_image
from .openai_protocol import ChatCompletionRequest, ImageGenerationRequest, ImagePart, TextPart
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


def _knob_sources(extra: dict, extra_body: dict | None, extra_args: dict | None,
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


# -- prompts ----------------------------------------------------------------------------------------

_TURN = re.compile(r"<\|im_start\|>(?:(system|user|assistant)\n)?(.*?)(?:<\|im_end\|>|\Z)", re.S)
_VISUAL = re.compile(r"<\|vision_start\|>(?:<\|(?:video_pad|image_pad)\|>)*<\|vision_end\|>")
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


def _no_special_tokens(text: str, param: str) -> str:
    m = _SPECIAL.search(text)
    if m:
        raise bad_request(f"the prompt contains the special token {m.group(0)}; send plain text "
                          "and images as image_url parts", param=param, code="invalid_prompt")
    return text


def unwrap_prompt(text: str, param: str) -> tuple[Optional[str], str]:
    """(system prompt or None, user text) from a prompt clients may have wrapped in chat markers.

    `<|im_start|>cat<|im_end|>` (the BAGEL client's wrapping) -> "cat"; a rendered Lance template
    (`<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...`) -> its system and user text,
    with image placeholders dropped (the image itself comes as an image_url part).
    """
    if "<|im_start|>" not in text:
        return None, _no_special_tokens(text, param)
    system, users, end = None, [], 0
    for m in _TURN.finditer(text):
        if text[end:m.start()].strip():
            raise bad_request("the prompt mixes plain text with <|im_start|> blocks", param=param,
                              code="invalid_prompt")
        end = m.end()
        role, body = m.group(1), _VISUAL.sub("", m.group(2))
        if role == "system":
            system = _no_special_tokens(body, param)
        elif role in (None, "user"):
            users.append(_no_special_tokens(body, param))
        # an assistant block is the generation header the template ends with: nothing to keep
    if text[end:].strip():
        raise bad_request("the prompt mixes plain text with <|im_start|> blocks", param=param,
                          code="invalid_prompt")
    return system, " ".join(u.strip("\n") for u in users)


def _one_system_prompt(candidates: list[tuple[str, str]]) -> Optional[str]:
    distinct = {text for _, text in candidates}
    if len(distinct) > 1:
        where = ", ".join(w for w, _ in candidates)
        raise bad_request(f"the system prompt is given in several places that disagree ({where})",
                          param="system_prompt", code="conflicting_values")
    return candidates[0][1] if candidates else None


# -- chat completions -------------------------------------------------------------------------------

@dataclass
class ParsedChat:
    request: Union[ImageRequest, TextRequest]
    stream: bool
    include_usage: bool
    model: Optional[str]


@dataclass
class _Image:
    url: str
    param: str
    message_index: int


def _output_modality(modalities: list | None) -> str:
    if modalities is None:
        return "text"
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise bad_request("modalities must be a list of strings", param="modalities",
                          code="invalid_type")
    if modalities in (["image"], ["text"]):
        return modalities[0]
    raise bad_request(f"unsupported modalities {modalities}: use [\"image\"] (generate or edit an "
                      "image) or [\"text\"] (answer in text)", param="modalities",
                      code="unsupported_modality")


async def load_image(img: _Image, limits: RequestLimits):
    url = img.url.strip()
    if url.startswith("data:"):
        return decode_data_url(url, img.param, limits.max_image_bytes)
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise bad_request("image URLs are disabled on this server; send the image as a "
                              "data:image/...;base64 URL", param=img.param,
                              code="remote_images_disabled")
        return await fetch_remote_image(url, img.param, limits.max_image_bytes,
                                        limits.remote_image_timeout_s)
    raise bad_request("image_url.url must be a data: URL (or http(s) if the operator enabled it)",
                      param=img.param, code="invalid_image_url")


def _check_openai_features(req: ChatCompletionRequest) -> None:
    def reject(param: str, msg: str):
        raise bad_request(msg, param=param, code="unsupported_parameter")

    if req.n != 1:
        reject("n", "n must be 1: one choice per chat completion (send several requests)")
    if req.logprobs or req.top_logprobs:
        reject("logprobs", "logprobs are not supported")
    if req.logit_bias:
        reject("logit_bias", "logit_bias is not supported")
    if req.tools or req.tool_choice not in (None, "none"):
        reject("tools", "tool calling is not supported by Lance")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            reject(name, f"{name} is not supported")


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


def _message_parts(msg, i: int) -> list[tuple[object, str]]:
    """(part, param path) of a message; a string content is one text part."""
    if isinstance(msg.content, str):
        return [(TextPart(type="text", text=msg.content), f"messages[{i}].content")]
    return [(part, f"messages[{i}].content[{j}]") for j, part in enumerate(msg.content or [])]


def _given(knobs: GenerationKnobs, names) -> list[str]:
    return sorted(k for k in names if getattr(knobs, k) is not None)


async def parse_chat_request(raw: bytes, limits: RequestLimits) -> ParsedChat:
    try:
        req = ChatCompletionRequest.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None
    _check_openai_features(req)
    nested = (req.extra_body or {}).get("modalities")
    modalities = merge_knob_sources([
        ("top level", {"modalities": req.modalities} if req.modalities is not None else {}),
        ("extra_body", {"modalities": nested} if nested is not None else {})]).get("modalities")
    output = _output_modality(modalities)
    knobs = validate_knobs(merge_knob_sources(
        _knob_sources(req.model_extra or {}, req.extra_body, req.extra_args, req.seed)))

    system_messages: list[str] = []
    templated_systems: list[tuple[str, str]] = []
    turns: list[ChatTurn] = []
    images: list[_Image] = []
    for i, msg in enumerate(req.messages):
        texts = []
        for part, param in _message_parts(msg, i):
            if isinstance(part, ImagePart):
                if msg.role != "user":
                    raise bad_request("images are accepted in user messages only", param=param,
                                      code="invalid_image_position")
                images.append(_Image(part.image_url.url, param, i))
            elif msg.role == "user":
                tmpl_system, text = unwrap_prompt(part.text, param)
                if tmpl_system is not None:
                    templated_systems.append((f"{param} (template)", tmpl_system))
                texts.append(text)
            else:
                texts.append(_no_special_tokens(part.text, param))
        text = " ".join(t for t in texts if t)
        if msg.role in ("system", "developer"):
            system_messages.append(text)
        else:
            turns.append(ChatTurn(msg.role, text))

    candidates = [("system message", "\n\n".join(system_messages))] if system_messages else []
    candidates += templated_systems
    if knobs.system_prompt is not None:
        candidates.append(("system_prompt", _no_special_tokens(knobs.system_prompt,
                                                               "system_prompt")))
    system_prompt = _one_system_prompt(candidates)

    if len(images) > limits.max_input_images:
        raise bad_request(f"{len(images)} images were sent; at most {limits.max_input_images} "
                          "per request", param=images[-1].param, code="too_many_images")
    if not any(t.role == "user" for t in turns):
        raise bad_request("messages need at least one user message", param="messages",
                          code="invalid_value")
    image = await load_image(images[0], limits) if images else None
    request_id = f"chatcmpl-{uuid.uuid4().hex}"

    if output == "image":
        prompt = " ".join(t.text for t in turns if t.role == "user" and t.text)
        request = _image_request(prompt, image, knobs, limits, system_prompt, request_id)
    else:
        if images and images[0].message_index != next(
                i for i, m in enumerate(req.messages) if m.role == "user"):
            raise bad_request("the image must be in the first user message",
                              param=images[0].param, code="invalid_image_position")
        request = _text_request(req, turns, image, knobs, limits, system_prompt, request_id)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ParsedChat(request=request, stream=req.stream, include_usage=include_usage,
                      model=req.model)


def _image_request(prompt: str, image, knobs: GenerationKnobs, limits: RequestLimits,
                   system_prompt: Optional[str], request_id: str) -> ImageRequest:
    if _given(knobs, TEXT_KNOBS):
        key = _given(knobs, TEXT_KNOBS)[0]
        raise bad_request(f"{key} applies to text output only", param=key, code="invalid_value")
    if not prompt.strip():
        raise bad_request("the prompt is empty", param="messages", code="invalid_prompt")
    height, width = target_size(knobs, limits)
    task = "image_edit" if image is not None else "t2i"
    if task == "image_edit":
        if height is not None:
            raise bad_request("image edits keep the input's bucketed size: leave size, height and "
                              "width out (or size 'auto')", param="size", code="invalid_size")
        if knobs.negative_prompt is not None:
            raise bad_request("negative_prompt applies to text-to-image only (spec §7.3)",
                              param="negative_prompt", code="invalid_value")
    elif knobs.resolution is not None:
        raise bad_request("resolution is the bucket of an edit's input image; for text-to-image "
                          "use size", param="resolution", code="invalid_value")
    extra = {"resolution": knobs.resolution} if knobs.resolution else {}
    return ImageRequest(task=task, prompt=prompt, height=height, width=width, image=image,
                        negative_prompt=knobs.negative_prompt, system_prompt=system_prompt,
                        params=denoise_params(knobs, limits), request_id=request_id, **extra)


def _text_request(req: ChatCompletionRequest, turns: list[ChatTurn], image,
                  knobs: GenerationKnobs, limits: RequestLimits, system_prompt: Optional[str],
                  request_id: str) -> TextRequest:
    if _given(knobs, IMAGE_KNOBS - {"resolution"}):
        key = _given(knobs, IMAGE_KNOBS - {"resolution"})[0]
        raise bad_request(f"{key} applies to image output; set modalities to [\"image\"]",
                          param=key, code="invalid_value")
    if turns[-1].role != "user":
        raise bad_request("the last message must be the user's", param="messages",
                          code="invalid_value")
    if image is None and not turns[-1].text.strip():
        raise bad_request("the last user message is empty", param="messages",
                          code="invalid_prompt")
    extra = {"resolution": knobs.resolution} if knobs.resolution else {}
    return TextRequest(task="x2t_image" if image is not None else "chat", turns=turns,
                       image=image, system_prompt=system_prompt, seed=knobs.seed,
                       request_id=request_id, **_sampling(req, knobs, limits), **extra)


# -- images API -------------------------------------------------------------------------------------

@dataclass
class ParsedImages:
    requests: list[ImageRequest]   # one per image asked for (n), seeds seed, seed+1, ...
    model: Optional[str]


def _check_images_fields(req: ImageGenerationRequest, limits: RequestLimits) -> None:
    if not 1 <= req.n <= limits.max_n:
        raise bad_request(f"n {req.n} is outside [1, {limits.max_n}]", param="n",
                          code="invalid_value")
    if req.response_format not in (None, "b64_json"):
        raise bad_request("only response_format 'b64_json' is served (no image hosting)",
                          param="response_format", code="invalid_value")
    if req.output_format not in (None, "png"):
        raise bad_request("only output_format 'png' is served", param="output_format",
                          code="invalid_value")
    if req.stream:
        raise bad_request("streaming is served on /v1/chat/completions (stream: true)",
                          param="stream", code="unsupported_parameter")


def _n_requests(first: ImageRequest, n: int) -> list[ImageRequest]:
    # n images of one prompt differ only by seed: seed, seed+1, ... (one seed would give n copies)
    out = []
    for i in range(n):
        params = replace(first.params, seed=first.params.seed + i)
        rid = first.request_id if n == 1 else f"{first.request_id}-{i}"
        out.append(replace(first, params=params, request_id=rid))
    return out


def parse_images_request(req: ImageGenerationRequest, knob_values: dict, image,
                         limits: RequestLimits, from_form: bool) -> ParsedImages:
    if req.size is not None:
        knob_values = merge_knob_sources([("size", {"size": req.size}), ("knobs", knob_values)])
    knobs = validate_knobs(knob_values, from_form=from_form)
    _check_images_fields(req, limits)
    system_prompt, prompt = unwrap_prompt(req.prompt, "prompt")
    if knobs.system_prompt is not None:
        system_prompt = _one_system_prompt(
            ([("prompt (template)", system_prompt)] if system_prompt else [])
            + [("system_prompt", _no_special_tokens(knobs.system_prompt, "system_prompt"))])
    if not prompt.strip():
        raise bad_request("the prompt is empty", param="prompt", code="invalid_prompt")
    first = _image_request(prompt, image, knobs, limits, system_prompt,
                           f"img-{uuid.uuid4().hex}")
    return ParsedImages(requests=_n_requests(first, req.n), model=req.model)


def parse_generation_json(raw: bytes, limits: RequestLimits) -> ParsedImages:
    try:
        req = ImageGenerationRequest.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None
    knob_values = merge_knob_sources(_knob_sources(req.model_extra or {}, req.extra_body,
                                                   req.extra_args, None))
    return parse_images_request(req, knob_values, None, limits, from_form=False)


def form_fields(items: list[tuple[str, str]]) -> dict:
    """Multipart text fields -> dict. `key[]` repeats become lists; `a[b]` (how the OpenAI SDK
    sends a nested extra_body dict in a form) becomes {"a": {"b": ...}}; JSON-looking lists
    ("[0.4, 1.0]") are decoded so cfg_interval can be sent as one field."""
    out: dict = {}
    for key, value in items:
        if value.startswith("["):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        m = re.fullmatch(r"([^\[\]]+)\[([^\[\]]*)\]", key)
        if m is None:
            if key in out:
                raise bad_request(f"form field {key} is given twice", param=key,
                                  code="conflicting_values")
            out[key] = value
        elif m.group(2) == "":
            out.setdefault(m.group(1), []).append(value)
        else:
            out.setdefault(m.group(1), {})[m.group(2)] = value
    return out


def parse_edit_form(fields: dict, image, limits: RequestLimits) -> ParsedImages:
    try:
        req = ImageGenerationRequest.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e) from None
    knob_values = merge_knob_sources(_knob_sources(req.model_extra or {}, req.extra_body,
                                                   req.extra_args, None))
    return parse_images_request(req, knob_values, image, limits, from_form=True)

