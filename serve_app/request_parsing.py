"""OpenAI requests -> typed stage requests (ImageRequest / TextRequest), with every check a 400.

Knobs and limits: knobs.py. Prompts: plain text, or text clients wrapped in `<|im_start|>` markers.

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
from typing import Optional, Union

from pydantic import ValidationError

from stages.lance.requests import ChatTurn, ImageRequest, TextRequest

from .errors import bad_request, validation_error
from .knobs import (DEFAULT_X2T_TEMPERATURE, IMAGE_KNOBS, TEXT_KNOBS, GenerationKnobs, RequestLimits,
                    denoise_params, knob_sources, merge_knob_sources, target_size, validate_knobs)
from .media import decode_data_url, fetch_remote_image
from .openai_protocol import ChatCompletionRequest, ImageGenerationRequest, ImagePart, TextPart


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
    return_token_ids: bool = False


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
        return await fetch_remote_image(url, img.param, limits)
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
        knob_sources(req.model_extra or {}, req.extra_body, req.extra_args, req.seed)))

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
        if req.return_token_ids:
            raise bad_request("return_token_ids applies to text output", param="return_token_ids",
                              code="invalid_value")
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
                      model=req.model, return_token_ids=bool(req.return_token_ids))


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
    if first.params.seed + req.n > 2**63:
        raise bad_request(f"seed {first.params.seed} leaves no room for n={req.n} seeds "
                          "(seed, seed+1, ...) below 2**63", param="seed", code="invalid_value")
    return ParsedImages(requests=_n_requests(first, req.n), model=req.model)


def parse_generation_json(raw: bytes, limits: RequestLimits) -> ParsedImages:
    try:
        req = ImageGenerationRequest.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None
    knob_values = merge_knob_sources(knob_sources(req.model_extra or {}, req.extra_body,
                                                   req.extra_args, None))
    return parse_images_request(req, knob_values, None, limits, from_form=False)


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
    knob_values = merge_knob_sources(knob_sources(req.model_extra or {}, req.extra_body,
                                                   req.extra_args, None))
    return parse_images_request(req, knob_values, image, limits, from_form=True)

