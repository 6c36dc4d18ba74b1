"""Typed requests the ingress hands to the stages (no HTTP in here, no model code).

One definition for the ingress, the thinker, the DiT stage and the offline pipeline: the defaults are
upstream's (`inference_lance.sh`, lance_spec.md §3.8), so a request that sets nothing gets upstream's image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from .limits import CFG_RENORM_TYPES

ImageTask = Literal["t2i", "image_edit"]
TextTask = Literal["x2t_image", "chat"]


@dataclass(frozen=True)
class DenoiseParams:
    """Knobs of the flow-matching loop (lance_spec.md §3.4, §3.5)."""

    num_inference_steps: int = 30
    timestep_shift: float = 3.5
    cfg_text_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: Literal[CFG_RENORM_TYPES] = "global"
    cfg_renorm_min: float = 0.0
    seed: int = 42

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_text_scale != 1.0


@dataclass
class ImageRequest:
    """t2i (no image) or image_edit (one input image)."""

    task: ImageTask
    prompt: str
    height: int | None = None          # t2i target size; edits take the bucketed input size
    width: int | None = None
    image: Image.Image | None = None
    resolution: str = "image_768res"   # bucket preset of the edit input (lance_spec.md §4.2)
    negative_prompt: str | None = None  # replaces the caption in the text-uncond branch
    system_prompt: str | None = None    # None: upstream's system prompt for the task
    params: DenoiseParams = field(default_factory=DenoiseParams)
    request_id: str = ""


@dataclass
class ChatTurn:
    role: Literal["system", "user", "assistant"]
    text: str


@dataclass
class TextRequest:
    """Understanding (an image and a question) or plain chat, generated token by token."""

    task: TextTask
    turns: list[ChatTurn]                # user/assistant turns in order; the last one is the user's
    image: Image.Image | None = None     # x2t_image: placed before the text of the first user turn
    system_prompt: str | None = None
    resolution: str = "image_768res"
    max_tokens: int = 256
    temperature: float = 0.0             # 0 = greedy, as upstream
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    request_id: str = ""
