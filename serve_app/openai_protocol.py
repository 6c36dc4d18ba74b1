"""OpenAI wire format: request models as clients send them, and the response objects we return.

Only the shapes live here; turning a request into a stage request (routing, knobs, limits) is
request_parsing.py.
"""
from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import ErrorResponse


class _Lenient(BaseModel):
    # Parts of OpenAI objects may gain fields over time (e.g. image_url.detail); ignore those.
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: Optional[str] = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Lenient):
    url: str


class VideoPart(_Lenient):
    """vLLM's video input part: {"type": "video_url", "video_url": {"url": "data:video/mp4;..."}}."""
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ResponseFormat(_Lenient):
    type: Literal["text"]   # json_object / json_schema: no constrained decoding in the thinker


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions: the fields Lance reads here. Every other top-level key lands in
    `model_extra` and is read as a generation knob (that is what the OpenAI SDK's `extra_body` turns
    into on the wire; knobs.py), including `modalities`, `seed` and `n`, or as another server's field
    (other_fields.py: the penalties, tools, logprobs, vLLM's and SGLang's extensions, ...)."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Union[str, list[str], None] = None
    response_format: Optional[ResponseFormat] = None
    # vLLM's extension: the generated token ids in choices[i].token_ids (text output only)
    return_token_ids: Optional[bool] = None
    # vLLM-Omni style knob containers (raw JSON clients send them nested).
    extra_body: Optional[dict[str, Any]] = None
    extra_args: Optional[dict[str, Any]] = None


# chat fields that only text output reads: on image output they are ignored (and reported)
TEXT_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                      "response_format", "return_token_ids")


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations (and the form fields of /v1/images/edits). `size` and `n` are
    read as knobs; the images API's presentation fields (quality, style, ...) are other_fields.py's."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    model: Optional[str] = None
    n: Optional[int] = None
    size: Optional[str] = None
    response_format: Optional[str] = None
    output_format: Optional[str] = None
    output_compression: Optional[int] = None   # webp/jpeg quality 0..100 (png: ignored)
    stream: bool = False
    extra_body: Optional[dict[str, Any]] = None
    extra_args: Optional[dict[str, Any]] = None


# -- responses ------------------------------------------------------------------------------------
# The models describe what the builders below return (/openapi.json's response bodies); extra="forbid"
# so that a field added to a builder but not here fails the schema-conformance fuzz and the tests.

class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LanceNotes(_Out):
    """The `lance` object: the routed task and the accepted parameters that do not apply to it; a
    finished video also carries its frame count, frame rate and size."""

    task: str
    ignored_params: list[str]
    num_frames: Optional[int] = None
    fps: Optional[float] = None
    size: Optional[str] = None


class MediaURL(_Out):
    url: str = Field(description="a data: URL of the generated image or video")


class ImageOutputPart(_Out):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoOutputPart(_Out):
    type: Literal["video_url"]
    video_url: MediaURL


OutputContent = Union[str, list[Annotated[Union[ImageOutputPart, VideoOutputPart],
                                          Field(discriminator="type")]]]


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: OutputContent


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    finish_reason: Optional[str]
    logprobs: None
    token_ids: Optional[list[int]] = Field(None, description="with return_token_ids (text output)")


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    lance: LanceNotes


class ChunkDelta(_Out):
    role: Optional[Literal["assistant"]] = None
    content: Optional[OutputContent] = None


class ChunkChoice(_Out):
    index: int
    delta: ChunkDelta
    finish_reason: Optional[str]
    logprobs: None
    token_ids: Optional[list[int]] = None


class Progress(_Out):
    stage: Optional[Literal["denoise", "decode", "encode"]] = None
    step: Optional[int]
    total: Optional[int]


class ChatCompletionChunk(_Out):
    """One SSE event of a stream (`data: {...}`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    lance: Optional[LanceNotes] = None
    lance_progress: Optional[Progress] = None


class ImageData(_Out):
    b64_json: str


class ImagesResponse(_Out):
    created: int
    data: list[ImageData]
    output_format: str
    size: str = Field(description="WIDTHxHEIGHT")
    usage: Usage
    lance: LanceNotes


class ModelLimits(_Out):
    min_image_side: int
    size_multiple: int
    max_inference_steps: int
    max_images_per_request: int
    max_image_bytes: int
    max_num_frames: int
    max_video_bytes: int


class ModelDefaults(_Out):
    size: str
    num_inference_steps: int
    seed: int
    cfg_text_scale: float
    timestep_shift: float
    cfg_interval: list[float]
    resolution: str
    max_tokens: int
    temperature: float
    video_size: str
    num_frames: int
    i2v_num_frames: int
    fps: float
    video_resolution: str


class ModelLance(_Out):
    tiny_random_weights: bool
    stage_graph: str
    max_image_side: int
    max_model_len: int
    tasks: list[str]
    variants: list[str]
    limits: ModelLimits
    defaults: ModelDefaults


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    lance: ModelLance


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class HealthError(ErrorResponse):
    """/health's 503: the error, and each stage's state."""

    stages: dict[str, str]
    dit_jobs: Optional[int]


class HealthResponse(_Out):
    status: Literal["ok"]
    stages: dict[str, str] = Field(description="stage -> 'ok' or what is wrong")
    dit_jobs: Optional[int] = Field(description="jobs the DiT stages hold")



def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


IGNORED_PARAMS_HEADER = "X-Lance-Ignored-Params"


def lance_extension(task: str, ignored_params: list[str]) -> dict:
    """The `lance` object of a response: the task the request was routed to, and the parameters
    that were accepted but do not apply to it (also in the X-Lance-Ignored-Params header)."""
    return {"task": task, "ignored_params": list(ignored_params)}


def chat_choice(index: int, content: Any, finish_reason: str,
                token_ids: list[int] | None = None) -> dict:
    choice = {"index": index, "message": {"role": "assistant", "content": content},
              "finish_reason": finish_reason, "logprobs": None}
    if token_ids is not None:   # return_token_ids (vLLM's field name and place)
        choice["token_ids"] = token_ids
    return choice


def chat_completion(request_id: str, model: str, choices: list[dict], usage_: dict,
                    lance: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_, "lance": lance}


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None,
               token_ids: list[int] | None = None, **extra) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model, "choices": [choice]}
    chunk.update(extra)
    return chunk


def usage_chunk(request_id: str, model: str, usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [], "usage": usage_}


def video_content(data_url: str) -> list[dict]:
    return [{"type": "video_url", "video_url": {"url": data_url}}]


def image_content(data_url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": data_url}}]


def images_response(b64_images: list[str], size: str, usage_: dict, lance: dict,
                    output_format: str = "png") -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": b} for b in b64_images],
            "output_format": output_format, "size": size, "usage": usage_, "lance": lance}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
