"""What the thinker hands to the DiT stage for one image or video request (lance_spec.md §2.5).

Per CFG branch: the context's per-layer K (after qk-norm and mRoPE) and V, and the positions the target
block must use in that branch. Plus the latent grid, the denoising knobs, and the number of reference
VAE tokens (edits): upstream draws the seeded noise over *all* VAE tokens of the sample and the target
takes its rows, so the DiT needs the count to reproduce a seed's image. The reference latent itself is
already inside the KV cache and is not sent. No hidden states: Lance's DiT re-embeds the two markers
itself (lance_spec.md §2.5), so they would be bytes moved for nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .prompts import VIDEO_TASKS
from .requests import DenoiseParams


@dataclass
class BranchKV:
    """One CFG branch's context cache.

    `kv` is either a tensor pair or a Ray ObjectRef to one (the thinker puts it in the object store):
    K and V of shape [num_layers, context_len, num_kv_heads, head_dim].
    """

    kv: Any
    context_len: int
    query_positions: torch.Tensor  # [3, target_len + 2] int64: <|vision_start|>, latents, <|vision_end|>

    def fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv
        if not isinstance(kv, tuple):
            import ray  # only a deployment hands over ObjectRefs
            kv = ray.get(kv)
        return kv


@dataclass
class ContextHandoff:
    request_id: str
    task: str                                  # "t2i" | "image_edit" | "t2v" | "i2v" | "video_edit"
    latent_grid: tuple[int, int, int]          # (t, h, w) of the target
    params: DenoiseParams
    cond: BranchKV
    uncond: BranchKV | None                    # None when cfg_text_scale == 1 (no CFG branch needed)
    num_reference_tokens: int = 0              # VAE tokens before the target in the sample (edit)
    initial_noise: torch.Tensor | None = None  # [target_tokens, 48]: caller-injected `latents=`
    # i2v: the clean first latent frame [h*w, 48] (posterior sample of the image); it replaces the first
    # rows of the target block, is embedded at timestep 0 and never integrated (spec §5.3)
    condition_latents: torch.Tensor | None = None
    kv_bytes: int = 0                          # bytes moved through the object store (metrics)

    @property
    def clean_rows(self) -> int:
        return 0 if self.condition_latents is None else self.condition_latents.shape[0]

    @property
    def num_target_tokens(self) -> int:
        t, h, w = self.latent_grid
        return t * h * w

    @property
    def is_video(self) -> bool:
        return self.task in VIDEO_TASKS or self.latent_grid[0] > 1
