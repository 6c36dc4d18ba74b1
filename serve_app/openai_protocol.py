"""OpenAI wire format: request models as clients send them, and the response objects we return.

Only the shapes live here; turning a request into a stage request (routing, knobs, limits) is
request_parsing.py.
"""
from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


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


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ResponseFormat(_Lenient):
    type: Literal["text"]   # json_object / json_schema: no constrained decoding in the thinker


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Unknown top-level keys land in `model_extra` and are read as
    generation knobs (that is what the OpenAI SDK's `extra_body` turns into on the wire)."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    modalities: Optional[list[str]] = None
    n: int = 1
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    # vLLM's extension: the generated token ids in choices[i].token_ids (text output only)
    return_token_ids: Optional[bool] = None
    # Accepted and ignored: they change nothing about what is generated.
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    parallel_tool_calls: Optional[bool] = None
    # Accepted only at their neutral value (checked in request_parsing).
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    # vLLM-Omni style knob containers (raw JSON clients send them nested).
    extra_body: Optional[dict[str, Any]] = None
    extra_args: Optional[dict[str, Any]] = None


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations (and the form fields of /v1/images/edits)."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    model: Optional[str] = None
    n: int = 1
    size: Optional[str] = None
    response_format: Optional[str] = None
    output_format: Optional[str] = None
    output_compression: Optional[int] = None   # webp/jpeg quality 0..100 (png: ignored)
    stream: bool = False
    # Accepted and ignored (DALL-E / gpt-image presentation knobs, bookkeeping).
    quality: Optional[str] = None
    style: Optional[str] = None
    background: Optional[str] = None
    moderation: Optional[str] = None
    input_fidelity: Optional[str] = None
    user: Optional[str] = None
    extra_body: Optional[dict[str, Any]] = None
    extra_args: Optional[dict[str, Any]] = None


# -- responses ------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(request_id: str, model: str, content: Any, finish_reason: str,
                    usage_: dict, token_ids: list[int] | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": content},
              "finish_reason": finish_reason, "logprobs": None}
    if token_ids is not None:   # return_token_ids (vLLM's field name and place)
        choice["token_ids"] = token_ids
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage_}


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


def image_content(data_url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": data_url}}]


def images_response(b64_images: list[str], size: str, usage_: dict, output_format: str = "png") -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": b} for b in b64_images],
            "output_format": output_format, "size": size, "usage": usage_}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
