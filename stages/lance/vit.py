"""Lance's ViT: the stock Qwen2.5-VL vision tower (transformers), loaded from the checkpoint's files.

`Qwen2.5-VL-ViT/config.json` describes it and `vit.safetensors` holds its bare tensors
(`patch_embed.* / blocks.* / merger.*`); the video variant also bundles a copy in its
model.safetensors under `vit_model.` (load it with `prefix=`). The features Lance feeds the LLM are
the merger output with the window order undone (`.pooler_output`), one row per 2x2 patch group.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2_5_VLVisionConfig
from transformers.initialization import no_init_weights
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from .checkpoint import VIT_CONFIG_NAME, VIT_WEIGHTS_NAME, SafetensorsFile, check_keys
from .preprocessing import vit_image_tensor, vit_video_tensor


def attention_backend(requested: str | None, device: torch.device | str) -> str:
    """The config asks for flash_attention_2; use it only where it can run (CUDA + flash-attn installed)."""
    requested = requested or "sdpa"
    if requested.startswith("flash_attention"):
        on_cuda = torch.device(device).type == "cuda"
        return requested if on_cuda and importlib.util.find_spec("flash_attn") is not None else "sdpa"
    return requested


class LanceViT(nn.Module):
    def __init__(self, model: Qwen2_5_VisionTransformerPretrainedModel):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.patch_size, self.temporal_patch_size = cfg.patch_size, cfg.temporal_patch_size
        self.spatial_merge_size, self.out_hidden_size = cfg.spatial_merge_size, cfg.out_hidden_size

    @classmethod
    def from_state_dict(
        cls, vit_config: dict, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu", attn_implementation: str | None = None, source: str = "ViT weights",
    ) -> "LanceViT":
        """Build from a config.json dict and bare `patch_embed./blocks./merger.` tensors (strict)."""
        attn = attention_backend(attn_implementation or vit_config.get("_attn_implementation"), device)
        config = Qwen2_5_VLVisionConfig(**{k: v for k, v in vit_config.items() if not k.startswith("_")})
        with no_init_weights():  # every parameter is assigned from the checkpoint below
            model = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation=attn)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        check_keys({k: tuple(v.shape) for k, v in state_dict.items()}, expected, source=source)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()},
                              strict=True, assign=True)
        return cls(model.to(device))

    @classmethod
    def from_pretrained(
        cls, vit_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        attn_implementation: str | None = None, weights_path: str | Path | None = None, prefix: str = "",
    ) -> "LanceViT":
        """Load `vit_dir/config.json` + `vit_dir/vit.safetensors`, or the tensors under `prefix` of
        another safetensors file (e.g. `weights_path=Lance_3B_Video/model.safetensors, prefix="vit_model."`)."""
        vit_dir = Path(vit_dir)
        vit_config = json.loads((vit_dir / VIT_CONFIG_NAME).read_text())
        weights = SafetensorsFile(weights_path or vit_dir / VIT_WEIGHTS_NAME)
        names = [n for n in weights.names() if n.startswith(prefix)]
        if not names:
            raise KeyError(f"{weights.path} has no tensors under prefix {prefix!r}")
        state_dict = {n[len(prefix):]: weights.get(n) for n in names}
        weights.close()
        return cls.from_state_dict(vit_config, state_dict, dtype, device, attn_implementation,
                                   source=f"{weights.path}" + (f" [{prefix}*]" if prefix else ""))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    @torch.no_grad()
    def forward(self, pixel_patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_patches [N, 3*tp*p*p] in merge-window order, grid_thw [n, 3] -> features [N/4, out_hidden]."""
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long, device=pixel_patches.device).reshape(-1, 3)
        if int(grid_thw.prod(-1).sum()) != pixel_patches.shape[0]:
            raise ValueError(f"grid_thw {grid_thw.tolist()} does not cover {pixel_patches.shape[0]} patches")
        out = self.model(hidden_states=pixel_patches.to(self.dtype), grid_thw=grid_thw)
        return out.pooler_output


def patchify_video_with_merge(
    video: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """video [C, T, H, W] -> (patches [gt*gh*gw, C*tp*p*p], grid_thw [1, 3] = (gt, gh, gw)).

    Rows go in merge-window order (gt, gh/m, gw/m, m, m) so each 2x2 group the merger fuses is
    contiguous; each row is (C, tp, p, p), the Conv3d patch-embed layout (= Qwen2VLImageProcessor's).
    """
    c, t, h, w = video.shape
    p, tp, m = patch_size, temporal_patch_size, merge_size
    if t % tp or h % (p * m) or w % (p * m):
        raise ValueError(f"video {list(video.shape)} needs T % {tp} == 0 and H, W multiples of {p * m}")
    gt, gh, gw = t // tp, h // p, w // p
    x = video.permute(1, 0, 2, 3).reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    patches = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * tp * p * p)
    return patches, torch.tensor([[gt, gh, gw]], dtype=torch.long)


def vit_patches(video: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2):
    """A preprocessed ViT input [3, T, H, W] -> merge-window patches, their patch grid (T/2, H/14, W/14)
    and the LLM grid of its block (T/2, H/28, W/28)."""
    patches, grid = patchify_video_with_merge(video, patch_size, temporal_patch_size, merge_size)
    t, h, w = grid[0].tolist()
    return patches, (t, h, w), (t, h // merge_size, w // merge_size)


def image_patches(image, resolution: str, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2):
    """An image's ViT input (the image repeated to one temporal patch): see `vit_patches`."""
    return vit_patches(vit_image_tensor(image, resolution), patch_size, temporal_patch_size, merge_size)


def video_patches(frames, resolution: str, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2):
    """Sampled video frames' ViT input (an odd last frame repeated, temporal groups of 2): see `vit_patches`."""
    return vit_patches(vit_video_tensor(frames, resolution), patch_size, temporal_patch_size, merge_size)
