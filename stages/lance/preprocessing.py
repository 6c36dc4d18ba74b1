"""Lance's image / video preprocessing for the VAE and the ViT (upstream `ValidationDataset`).

Each stream does: pick the aspect bucket nearest to the input (bucket sizes solved for area ~= R^2
at stride 16) -> center-crop to the bucket's ratio and bicubic-resize to it (torchvision
`RandomResizedCrop(scale=(1, 1), ratio=(r, r))` on PIL images) -> center-crop to a multiple of
`divisible_crop` -> normalize. Upstream runs torchvision on PIL frames; torchvision is not a
dependency here, so the same steps are written with PIL (same bicubic kernel) and torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

ASPECT_RATIOS = ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class StreamTransform:
    """Bucket resize + divisible crop + normalize for one consumer (VAE or ViT)."""

    resolution: int  # bucket area ~= resolution**2
    divisible_crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stride: int = 16
    aspect_ratios: tuple[str, ...] = ASPECT_RATIOS

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return bucket_sizes(self.resolution, self.aspect_ratios, self.stride)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(H, W) of the tensor this transform makes from a width x height input."""
        bh, bw = nearest_bucket(width, height, self.buckets)
        return bh - bh % self.divisible_crop, bw - bw % self.divisible_crop

    def output_sizes(self) -> list[tuple[int, int]]:
        """(H, W) for every bucket, in `aspect_ratios` order."""
        return [(h - h % self.divisible_crop, w - w % self.divisible_crop) for h, w in self.buckets]


@dataclass(frozen=True)
class ResolutionPreset:
    name: str
    vae: StreamTransform
    vit: StreamTransform

    def sizes_by_aspect(self) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        """{"16:9": ((vae H, W), (vit H, W)), ...}: the only sizes this preset produces."""
        return dict(zip(self.vae.aspect_ratios, zip(self.vae.output_sizes(), self.vit.output_sizes())))


def _preset(name: str, vae_res: int, vit_res: int) -> ResolutionPreset:
    vae = StreamTransform(vae_res, divisible_crop=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    vit = StreamTransform(vit_res, divisible_crop=28, mean=CLIP_MEAN, std=CLIP_STD)
    return ResolutionPreset(name, vae, vit)


# Upstream `--resolution` values (validation_dataset.py): VAE / ViT bucket side.
RESOLUTION_PRESETS: dict[str, ResolutionPreset] = {
    p.name: p
    for p in (
        _preset("image_256res", 256, 224),
        _preset("image_512res", 512, 448),
        _preset("image_768res", 768, 672),
        _preset("video_192p", 256, 224),
        _preset("video_360p", 480, 476),
        _preset("video_480p", 640, 616),
    )
}


def get_preset(preset: str | ResolutionPreset) -> ResolutionPreset:
    if isinstance(preset, ResolutionPreset):
        return preset
    if preset not in RESOLUTION_PRESETS:
        raise ValueError(f"unknown resolution preset {preset!r}; expected one of {sorted(RESOLUTION_PRESETS)}")
    return RESOLUTION_PRESETS[preset]


# ---------------------------------------------------------------------------------------------
# Buckets (upstream BucketResize.init_buckets / find_nearest_bucket)
# ---------------------------------------------------------------------------------------------

def bucket_sizes(resolution: int, aspect_ratios=ASPECT_RATIOS, stride: int = 16) -> list[tuple[int, int]]:
    """(H, W) per aspect ratio "w:h", multiples of `stride` with area ~= resolution**2.

    Two roundings are tried (width first / height first); the one whose ratio is closer wins,
    ties go to the area closer to resolution**2.
    """
    area = resolution**2
    buckets = []
    for name in aspect_ratios:
        w, h = (int(v) for v in name.split(":"))
        ratio = w / h
        w1 = round(math.sqrt(area * ratio) / stride) * stride
        h1 = round(w1 / ratio / stride) * stride
        h2 = round(math.sqrt(area / ratio) / stride) * stride
        w2 = round(h2 * ratio / stride) * stride
        err1, err2 = abs(w1 / h1 - ratio), abs(w2 / h2 - ratio)
        if err1 < err2 or (err1 == err2 and abs(w1 * h1 - area) <= abs(w2 * h2 - area)):
            buckets.append((h1, w1))
        else:
            buckets.append((h2, w2))
    return buckets


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose w/h is nearest to the input's (first one on ties, like np.argmin)."""
    ratios = np.array([w / h for h, w in buckets])
    return buckets[int(np.abs(width / height - ratios).argmin())]


def bucket_crop_box(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, crop_w, crop_h) that torchvision's RandomResizedCrop(scale=(1,1), ratio=(r,r)) uses.

    Its sampler keeps the full area at ratio r (r passes through float32 log/exp, as in
    torchvision); if that box fits it is used, otherwise it falls back to the largest central box
    of ratio r. Upstream places a fitting box at a random offset (range 0..1 px in practice,
    only when rounding makes it fit); we take the center.
    """
    ratio = bucket[1] / bucket[0]
    ratio_f32 = math.exp(torch.log(torch.tensor(ratio)).item())
    area = width * height
    w = int(round(math.sqrt(area * ratio_f32)))
    h = int(round(math.sqrt(area / ratio_f32)))
    if not (0 < w <= width and 0 < h <= height):
        in_ratio = width / height
        if in_ratio < ratio:
            w, h = width, int(round(width / ratio))
        elif in_ratio > ratio:
            w, h = int(round(height * ratio)), height
        else:
            w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def bucket_resize(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    left, top, w, h = bucket_crop_box(*image.size, bucket)
    cropped = image.crop((left, top, left + w, top + h))
    return cropped.resize((bucket[1], bucket[0]), Image.BICUBIC)


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """Upstream's image loading: palette/alpha images are composited onto white."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def pil_to_tensor01(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [0, 1] (torchvision to_tensor: uint8 / 255)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def divisible_center_crop(frames: torch.Tensor, factor: int) -> torch.Tensor:
    """Center crop [..., H, W] to multiples of `factor` (torchvision center_crop offsets)."""
    height, width = frames.shape[-2:]
    crop_h, crop_w = height - height % factor, width - width % factor
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return frames[..., top : top + crop_h, left : left + crop_w]


def transform_frames(frames: list[Image.Image], transform: StreamTransform) -> torch.Tensor:
    """PIL frames (same size) -> [3, T, H, W] float32, normalized."""
    if not frames:
        raise ValueError("no frames to preprocess")
    sizes = {frame.size for frame in frames}
    if len(sizes) != 1:
        raise ValueError(f"all frames must have the same size, got {sorted(sizes)}")
    bucket = nearest_bucket(*frames[0].size, transform.buckets)
    video = torch.stack([pil_to_tensor01(bucket_resize(to_rgb(f), bucket)) for f in frames])  # [T, 3, H, W]
    video = divisible_center_crop(video, transform.divisible_crop)
    mean = torch.tensor(transform.mean, dtype=video.dtype).view(-1, 1, 1)
    std = torch.tensor(transform.std, dtype=video.dtype).view(-1, 1, 1)
    return ((video - mean) / std).permute(1, 0, 2, 3).contiguous()


def vae_image_tensor(image: Image.Image, preset: str | ResolutionPreset) -> torch.Tensor:
    """[3, 1, H, W] in [-1, 1] for the VAE."""
    return transform_frames([image], get_preset(preset).vae)


def vae_video_tensor(frames: list[Image.Image], preset: str | ResolutionPreset) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1] for the VAE (T should be 4k+1, see `video_io.video_frame_indices`)."""
    return transform_frames(frames, get_preset(preset).vae)


def vit_image_tensor(image: Image.Image, preset: str | ResolutionPreset) -> torch.Tensor:
    """[3, 2, Hv, Wv] CLIP-normalized; the image is repeated to fill one temporal patch."""
    return transform_frames([image], get_preset(preset).vit).repeat(1, 2, 1, 1)


def vit_video_tensor(frames: list[Image.Image], preset: str | ResolutionPreset) -> torch.Tensor:
    """[3, T', Hv, Wv] CLIP-normalized, T' even (an odd last frame is repeated)."""
    video = transform_frames(frames, get_preset(preset).vit)
    if video.shape[1] % 2:
        video = torch.cat([video, video[:, -1:]], dim=1)
    return video
