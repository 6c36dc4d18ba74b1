"""Lance's prompt templates and system prompts (upstream `data/common.py`, `system_prompt_render.py`).

Upstream renders the Qwen chat template as text, with every visual item as
`<|vision_start|><|video_pad|><|vision_end|>`, tokenizes the whole string once and then expands each
`<|video_pad|>` to K placeholder slots. We do the same so token boundaries are upstream's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, Union

VISION_START, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"
VISUAL_ITEM = VISION_START + VIDEO_PAD + VISION_END

# First variant of each upstream pool (system_prompt_type SP0). The edit prompt uses the typographic ’.
_T2I = ("Describe the {v} by detailing the color, quantity, text, shape, size, texture, spatial "
        "relationships of the objects and background:")
_T2V = ("Describe the {v} by detailing the color, quantity, visible text, shape, size, texture, spatial "
        "relationships and motion/camera movements of the objects and background:")
_EDIT = ("Describe the key features of the input {v} (color, shape, size, texture, objects, background), "
         "then explain how the user\u2019s text instruction should alter or modify the {v}. Generate a new {v} "
         "that meets the user\u2019s requirements while maintaining consistency with the original input where "
         "appropriate.")
_CAPTION = ("Generate a detailed and accurate description of the {v}, including all the key moments and "
            "visual details.")
# Upstream's x2t examples: "Look at the image carefully ..." / "Watch the video carefully ...".
_ANSWER = {"image": "Look at the image carefully and answer the question.",
           "video": "Watch the video carefully and answer the question."}
_CHAT = "You are a helpful assistant."

_SYSTEM_PROMPTS = {"t2i": _T2I, "t2v": _T2V, "i2v": _T2V, "image_edit": _EDIT, "video_edit": _EDIT,
                   "caption": _CAPTION, "chat": _CHAT}


VIDEO_TASKS = frozenset({"t2v", "i2v", "video_edit", "x2t_video"})


def default_system_prompt(task: str, vision_type: Literal["image", "video"] | None = None) -> str:
    """Upstream's default system prompt for a task (x2t: the examples' question-answering prompt).

    `vision_type` defaults to the task's own ("video" for t2v, i2v, video_edit and x2t_video)."""
    if vision_type is None:
        vision_type = "video" if task in VIDEO_TASKS else "image"
    if task.startswith("x2t"):
        return _ANSWER[vision_type]
    return _SYSTEM_PROMPTS[task].format(v=vision_type)


@dataclass(frozen=True)
class Visual:
    """A visual item in a message (rendered as one placeholder block)."""

    kind: Literal["vit", "vae_ref", "target"]


Part = Union[str, Visual]


ASSISTANT_HEADER = "<|im_start|>assistant\n"


def render_chat(system: str, turns: Sequence[tuple[str, Sequence[Part]]]) -> str:
    """Render the system message and closed turns like upstream's jinja template.

    Callers append `ASSISTANT_HEADER` (the generation prompt) and, for image generation, the target
    block and `<|im_end|>` (upstream renders the assistant content and strips the final newline).
    """
    out = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    for role, parts in turns:
        body = "".join(p if isinstance(p, str) else VISUAL_ITEM for p in parts)
        out.append(f"<|im_start|>{role}\n{body}<|im_end|>\n")
    return "".join(out)
