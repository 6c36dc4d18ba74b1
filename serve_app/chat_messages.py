"""What Lance reads from a chat completion's messages: system prompts, turns, input images and videos.

Prompts are plain text, or text that clients wrapped in `<|im_start|>` markers (the BAGEL client's
`<|im_start|>cat<|im_end|>`, or a whole rendered Lance template); images come as image_url parts,
videos as video_url parts (vLLM's shape).
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Optional

from stages.lance.requests import ChatTurn

from .errors import bad_request
from .knobs import RequestLimits
from .media import data_url_bytes, decode_data_url, decode_video_bytes, fetch_remote_bytes, fetch_remote_image
from .metrics import fetch_refused
from .openai_protocol import ChatMessage, ImagePart, TextPart, VideoPart

_TURN = re.compile(r"<\|im_start\|>(?:(system|user|assistant)\n)?(.*?)(?:<\|im_end\|>|\Z)", re.S)
_VISUAL = re.compile(r"<\|vision_start\|>(?:<\|(?:video_pad|image_pad)\|>)*<\|vision_end\|>")
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


def no_special_tokens(text: str, param: str) -> str:
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
        return None, no_special_tokens(text, param)
    system, users, end = None, [], 0
    for m in _TURN.finditer(text):
        if text[end:m.start()].strip():
            raise bad_request("the prompt mixes plain text with <|im_start|> blocks", param=param,
                              code="invalid_prompt")
        end = m.end()
        role, body = m.group(1), _VISUAL.sub("", m.group(2))
        if role == "system":
            system = no_special_tokens(body, param)
        elif role in (None, "user"):
            users.append(no_special_tokens(body, param))
        # an assistant block is the generation header the template ends with: nothing to keep
    if text[end:].strip():
        raise bad_request("the prompt mixes plain text with <|im_start|> blocks", param=param,
                          code="invalid_prompt")
    return system, " ".join(u.strip("\n") for u in users)


def one_system_prompt(candidates: list[tuple[str, str]]) -> Optional[str]:
    """The system prompt from (where, text) candidates; candidates that disagree are a 400."""
    distinct = {text for _, text in candidates}
    if len(distinct) > 1:
        where = ", ".join(w for w, _ in candidates)
        raise bad_request(f"the system prompt is given in several places that disagree ({where})",
                          param="system_prompt", code="conflicting_values")
    return candidates[0][1] if candidates else None


@dataclass
class InputImage:
    url: str
    param: str           # where it was sent, for errors: messages[i].content[j]
    message_index: int


@dataclass
class Conversation:
    system_prompts: list[tuple[str, str]] = field(default_factory=list)   # (where, text)
    turns: list[ChatTurn] = field(default_factory=list)                   # user / assistant
    images: list[InputImage] = field(default_factory=list)
    videos: list[InputImage] = field(default_factory=list)   # video_url parts (same fields)
    first_user_message: int = 0   # index in messages

    def user_text(self) -> str:
        """The text of all user turns: an image request's prompt."""
        return " ".join(t.text for t in self.turns if t.role == "user" and t.text)


def _message_parts(msg: ChatMessage, i: int) -> list[tuple[object, str]]:
    """(part, param path) of a message; a string content is one text part."""
    if isinstance(msg.content, str):
        return [(TextPart(type="text", text=msg.content), f"messages[{i}].content")]
    return [(part, f"messages[{i}].content[{j}]") for j, part in enumerate(msg.content or [])]


def _message_text(msg: ChatMessage, i: int, conv: Conversation) -> str:
    """The message's text; its images go to conv.images, a template's system text to
    conv.system_prompts."""
    texts = []
    for part, param in _message_parts(msg, i):
        if isinstance(part, ImagePart):
            if msg.role != "user":
                raise bad_request("images are accepted in user messages only", param=param,
                                  code="invalid_image_position")
            conv.images.append(InputImage(part.image_url.url, param, i))
        elif isinstance(part, VideoPart):
            if msg.role != "user":
                raise bad_request("videos are accepted in user messages only", param=param,
                                  code="invalid_video_position")
            conv.videos.append(InputImage(part.video_url.url, param, i))
        elif msg.role == "user":
            template_system, text = unwrap_prompt(part.text, param)
            if template_system is not None:
                conv.system_prompts.append((f"{param} (template)", template_system))
            texts.append(text)
        elif msg.role == "assistant":
            # an earlier answer, sent back as history: the model's own text may hold special-token
            # strings (a random-weights model's certainly does); they are dropped, not refused,
            # so that a client can always continue its conversation
            texts.append(_SPECIAL.sub("", part.text))
        else:
            texts.append(no_special_tokens(part.text, param))
    return " ".join(t for t in texts if t)


def collect_messages(messages: list[ChatMessage]) -> Conversation:
    conv, system_messages = Conversation(), []
    for i, msg in enumerate(messages):
        text = _message_text(msg, i, conv)
        if msg.role in ("system", "developer"):
            system_messages.append(text)
            continue
        if msg.role == "user" and not any(t.role == "user" for t in conv.turns):
            conv.first_user_message = i
        conv.turns.append(ChatTurn(msg.role, text))
    if system_messages:
        conv.system_prompts.insert(0, ("system message", "\n\n".join(system_messages)))
    if not any(t.role == "user" for t in conv.turns):
        raise bad_request("messages need at least one user message", param="messages",
                          code="invalid_value")
    return conv


async def load_image(img: InputImage, limits: RequestLimits):
    url = img.url.strip()
    if url.startswith("data:"):
        return decode_data_url(url, img.param, limits.max_image_bytes)
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            fetch_refused("disabled")
            raise bad_request("image URLs are disabled on this server; send the image as a "
                              "data:image/...;base64 URL", param=img.param,
                              code="remote_images_disabled")
        return await fetch_remote_image(url, img.param, limits)   # safe_fetch: allowlist, no SSRF
    raise bad_request("image_url.url must be a data: URL (or http(s) if the operator enabled it)",
                      param=img.param, code="invalid_image_url")


async def load_video(video: InputImage, limits: RequestLimits):
    """A video_url part -> the `VideoClip` Lance sees; decoded in a worker thread."""
    url = video.url.strip()
    if url.startswith("data:"):
        data = data_url_bytes(url, video.param, limits.max_video_bytes, "video")
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            fetch_refused("disabled")
            raise bad_request("media URLs are disabled on this server; send the video as a "
                              "data:video/mp4;base64 URL", param=video.param,
                              code="remote_media_disabled")
        data = await fetch_remote_bytes(url, video.param, limits, limits.max_video_bytes, "video")
    else:
        raise bad_request("video_url.url must be a data: URL (or http(s) if the operator enabled "
                          "it)", param=video.param, code="invalid_video_url")
    return await asyncio.to_thread(decode_video_bytes, data, video.param)
