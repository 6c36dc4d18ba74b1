"""Wan2.2 VAE as Lance uses it, on top of diffusers' `AutoencoderKLWan`.

The checkpoint (`Wan2.2_VAE.pth`) is in the stock Wan2.2 `WanVAE_` key tree; it is renamed to
diffusers' tree here (the mapping of diffusers' `convert_vae_22`, lance_spec.md §6.4) and loaded strictly.
Widths are read from tensor shapes, so any geometry of that tree loads (tiny test VAE or real).

Lance conventions (lance_spec.md §6.2-6.3): encode returns the per-channel *normalized* mean and the raw
log-variance; reference latents are sampled as `mean + exp(0.5*logvar) * eps` (noise not divided
by the channel std); decode de-normalizes, decodes and clamps to [-1, 1].
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from PIL import Image
from torch import nn

from .checkpoint import check_keys
from .preprocessing import vae_image_tensor

# Per-channel latent statistics of the Wan2.2 VAE (identical in Wan2.2, Lance and diffusers).
LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

# ---------------------------------------------------------------------------------------------
# Key conversion: stock Wan2.2 tree <-> diffusers AutoencoderKLWan
# ---------------------------------------------------------------------------------------------

# Residual block: Sequential(RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv) indices -> names.
_RESIDUAL_PARTS = {"0": "norm1", "2": "conv1", "3": "norm2", "6": "conv2"}
_SIDE_PARTS = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}
_TOP_PARTS = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_STAGES = {"encoder": ("downsamples", "down_blocks", "downsampler"), "decoder": ("upsamples", "up_blocks", "upsampler")}


class VAEKeyError(KeyError):
    """A VAE checkpoint key that neither key tree explains."""


def _resblock_to_diffusers(rest: str, key: str) -> str:
    if m := re.fullmatch(r"residual\.(\d+)\.(.+)", rest):
        if m[1] in _RESIDUAL_PARTS:
            return f"{_RESIDUAL_PARTS[m[1]]}.{m[2]}"
    elif m := re.fullmatch(r"shortcut\.(.+)", rest):
        return f"conv_shortcut.{m[1]}"
    raise VAEKeyError(f"unexpected Wan2.2 VAE key {key!r}")


def _wan22_key_to_diffusers(key: str) -> str:
    if m := re.fullmatch(r"(conv1|conv2)\.(\w+)", key):
        return f"{_TOP_PARTS[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.(conv1|head\.0|head\.2)\.(\w+)", key):
        return f"{m[1]}.{_SIDE_PARTS[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.middle\.(\d+)\.(.+)", key):
        # middle = [ResBlock, Attention, ResBlock, ...]: even -> resnets, odd -> attentions
        index = int(m[2])
        if index % 2:
            return f"{m[1]}.mid_block.attentions.{index // 2}.{m[3]}"
        return f"{m[1]}.mid_block.resnets.{index // 2}.{_resblock_to_diffusers(m[3], key)}"
    if m := re.fullmatch(r"(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.\2\.(\d+)\.(.+)", key):
        side, stage, block, rest = m[1], m[3], m[4], m[5]
        wan_name, diffusers_blocks, sampler = _STAGES[side]
        if m[2] == wan_name:
            if re.match(r"(resample|time_conv)\.", rest):
                return f"{side}.{diffusers_blocks}.{stage}.{sampler}.{rest}"
            return f"{side}.{diffusers_blocks}.{stage}.resnets.{block}.{_resblock_to_diffusers(rest, key)}"
    raise VAEKeyError(f"unexpected Wan2.2 VAE key {key!r} (not the stock Wan2.2 `WanVAE_` key tree)")


def wan22_to_diffusers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a stock Wan2.2 VAE state dict to diffusers' `AutoencoderKLWan` names (every key, or raise)."""
    return {_wan22_key_to_diffusers(k): v for k, v in state_dict.items()}


def diffusers_to_wan22_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `wan22_to_diffusers_state_dict` (e.g. to write a test checkpoint in the stock tree)."""
    inverse_residual = {v: k for k, v in _RESIDUAL_PARTS.items()}
    inverse_side = {v: k for k, v in _SIDE_PARTS.items()}
    inverse_top = {v: k for k, v in _TOP_PARTS.items()}
    # The Wan2.2 tree indexes the resampler after the block's residual blocks.
    n_resnets: dict[tuple[str, str], int] = {}
    for key in state_dict:
        if m := re.fullmatch(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.resnets\.(\d+)\..+", key):
            n_resnets[m[1], m[2]] = max(n_resnets.get((m[1], m[2]), 0), int(m[3]) + 1)

    def resblock(rest: str, key: str) -> str:
        part, _, param = rest.partition(".")
        if part == "conv_shortcut":
            return f"shortcut.{param}"
        if part in inverse_residual:
            return f"residual.{inverse_residual[part]}.{param}"
        raise VAEKeyError(f"unexpected AutoencoderKLWan key {key!r}")

    def convert(key: str) -> str:
        if m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(\w+)", key):
            return f"{inverse_top[m[1]]}.{m[2]}"
        if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(\w+)", key):
            return f"{m[1]}.{inverse_side[m[2]]}.{m[3]}"
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.(\d+)\.(.+)", key):
            return f"{m[1]}.middle.{2 * int(m[2]) + 1}.{m[3]}"
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            return f"{m[1]}.middle.{2 * int(m[2])}.{resblock(m[3], key)}"
        block = r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsampler|upsampler)\.(.+)"
        if m := re.fullmatch(block, key):
            side, stage = m[1], m[2]
            wan_name = _STAGES[side][0]
            if m[4] is not None:
                return f"{side}.{wan_name}.{stage}.{wan_name}.{m[4]}.{resblock(m[5], key)}"
            return f"{side}.{wan_name}.{stage}.{wan_name}.{n_resnets.get((side, stage), 0)}.{m[5]}"
        raise VAEKeyError(f"unexpected AutoencoderKLWan key {key!r}")

    return {convert(k): v for k, v in state_dict.items()}


def wan22_vae_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """`AutoencoderKLWan` kwargs for a stock Wan2.2 VAE state dict, read from its tensor shapes."""
    stage_of = {k: int(m[1]) for k in shapes if (m := re.match(r"encoder\.downsamples\.(\d+)\.downsamples\.", k))}
    if not stage_of:
        raise VAEKeyError("not a Wan2.2 VAE state dict: no encoder.downsamples.<i>.downsamples.* (Wan2.1 tree?)")
    n_stages = 1 + max(stage_of.values())
    try:
        base_dim, in_channels = shapes["encoder.conv1.weight"][:2]
        z_dim = shapes["conv2.weight"][0]
        decoder_out, decoder_in = shapes["decoder.head.2.weight"][:2]
        dim_mult = [shapes[f"encoder.downsamples.{i}.downsamples.0.residual.2.weight"][0] // base_dim
                    for i in range(n_stages)]
    except KeyError as missing:
        raise VAEKeyError(f"not a Wan2.2 VAE state dict: no {missing}") from None
    num_res_blocks = len({k.split(".")[4] for k in stage_of if stage_of[k] == 0 and ".residual." in k})
    temporal = [any(stage_of[k] == i and ".time_conv." in k for k in stage_of) for i in range(n_stages - 1)]
    patch_size = int(round((in_channels / 3) ** 0.5))
    return dict(
        base_dim=base_dim,
        decoder_base_dim=decoder_in // dim_mult[0],
        z_dim=z_dim,
        dim_mult=dim_mult,  # diffusers needs a list
        num_res_blocks=num_res_blocks,
        attn_scales=[],
        temperal_downsample=temporal,
        is_residual=True,
        in_channels=in_channels,
        out_channels=decoder_out,
        patch_size=patch_size,
        scale_factor_temporal=2 ** sum(temporal),
        scale_factor_spatial=patch_size * 2 ** (n_stages - 1),
        latents_mean=list(LATENTS_MEAN),
        latents_std=list(LATENTS_STD),
    )


# ---------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------

class LanceVAE(nn.Module):
    """Encode videos to normalized Wan2.2 latents and decode them back (upstream `WanVideoVAE`)."""

    def __init__(self, model: AutoencoderKLWan, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        z_dim = model.config.z_dim
        if z_dim != len(LATENTS_MEAN):
            raise ValueError(f"Lance latent statistics cover {len(LATENTS_MEAN)} channels, the VAE has z_dim={z_dim}")
        # Held in the model dtype and as 1/std, as upstream does (matters for bf16 parity).
        mean = torch.tensor(LATENTS_MEAN, dtype=dtype).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(LATENTS_STD, dtype=dtype).view(1, -1, 1, 1, 1)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_inv_std", inv_std, persistent=False)

    @classmethod
    def from_wan22_state_dict(
        cls, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu", encoder: bool = True, decoder: bool = True,
        source: str = "Wan2.2 VAE state dict",
    ) -> "LanceVAE":
        if not (encoder or decoder):
            raise ValueError("load at least one of encoder / decoder")
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        with torch.device("meta"):
            model = AutoencoderKLWan(**wan22_vae_config(shapes))
        expected = {k: tuple(v.shape) for k, v in diffusers_to_wan22_state_dict(model.state_dict()).items()}
        check_keys(shapes, expected, source=source)  # strict, in the file's own names; raises listing
        dropped = ()
        if not encoder:
            model.encoder, model.quant_conv = None, None
            dropped += ("encoder.", "quant_conv.")
        if not decoder:
            model.decoder, model.post_quant_conv = None, None
            dropped += ("decoder.", "post_quant_conv.")
        kept = {k: v.to(device=device, dtype=dtype)
                for k, v in wan22_to_diffusers_state_dict(state_dict).items() if not k.startswith(dropped)}
        model.load_state_dict(kept, strict=True, assign=True)
        return cls(model, dtype).to(device)

    @classmethod
    def from_wan22_pth(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        encoder: bool = True, decoder: bool = True,
    ) -> "LanceVAE":
        """Load `Wan2.2_VAE.pth`; `encoder=False` (DiT stage) or `decoder=False` (thinker) skips a half."""
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return cls.from_wan22_state_dict(state_dict, dtype, device, encoder, decoder, source=str(path))

    @property
    def has_encoder(self) -> bool:
        return self.model.encoder is not None

    @property
    def has_decoder(self) -> bool:
        return self.model.decoder is not None

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, 3, T, H, W] in [-1, 1] -> (normalized mean, raw logvar), each [B, z, t, h, w]."""
        if not self.has_encoder:
            raise RuntimeError("this LanceVAE was loaded without its encoder")
        moments = self.model._encode(video.to(self.latents_mean.dtype))  # raw (mu, logvar), no clamping
        mu, logvar = moments.chunk(2, dim=1)
        return (mu - self.latents_mean) * self.latents_inv_std, logvar

    @staticmethod
    def sample_posterior(
        mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Lance's reference-latent sample: normalized mean + exp(0.5*logvar) * eps (std NOT normalized)."""
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        elif eps.shape != mean.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} != latent shape {tuple(mean.shape)}")
        return mean + torch.exp(0.5 * logvar) * eps.to(mean)

    def encode_sampled(
        self, video: torch.Tensor, eps: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """encode + sample_posterior: the latent Lance feeds for reference images / first frames."""
        return self.sample_posterior(*self.encode(video), eps=eps, generator=generator)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalized latent [B, z, t, h, w] -> video [B, 3, 4(t-1)+1, 16h, 16w] clamped to [-1, 1]."""
        chunks = list(self.decode_chunks(latent))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)

    @torch.no_grad()
    def decode_chunks(self, latent: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decode a clip one latent frame at a time: yields [B, 3, f, H, W] in [-1, 1] (f = 1 for latent
        frame 0, then 4 per latent frame).

        This is diffusers' `AutoencoderKLWan._decode` loop (the causal decoder with its feature cache
        carried from chunk to chunk), yielding each chunk instead of concatenating: only one latent
        frame's activations and the cache are alive at a time, and a caller can encode or report
        progress per chunk. Concatenated, the chunks equal `_decode` exactly (unpatchify and clamp
        act per frame). The feature cache belongs to the generator, not to the module (diffusers keeps
        it on the module): several clips can be decoded interleaved on one VAE (the DiT stage does).
        """
        if not self.has_decoder:
            raise RuntimeError("this LanceVAE was loaded without its decoder")
        model = self.model
        z = latent.to(self.latents_mean.dtype) / self.latents_inv_std + self.latents_mean
        feat_cache = [None] * model._cached_conv_counts["decoder"]
        x = model.post_quant_conv(z)
        for i in range(x.shape[2]):
            out = model.decoder(x[:, :, i:i + 1], feat_cache=feat_cache, feat_idx=[0], first_chunk=(i == 0))
            if model.config.patch_size is not None:
                out = unpatchify(out, patch_size=model.config.patch_size)
            yield out.clamp_(-1, 1)


def decode_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Video [3, T, H, W] (or [1, 3, T, H, W]) in [-1, 1] -> uint8 frames [T, H, W, 3]."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"decode_to_uint8 takes one video, got batch {video.shape[0]}")
        video = video[0]
    pixels = ((video.float().clamp(-1, 1) * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous()


def uint8_to_pil(frames: torch.Tensor) -> list[Image.Image]:
    """uint8 frames [T, H, W, 3] -> one RGB PIL image per frame."""
    return [Image.fromarray(np.ascontiguousarray(frame.cpu().numpy())) for frame in frames]


def posterior_eps(shape, seed: int, device, dtype) -> torch.Tensor:
    """Noise of the reference latent's posterior sample. Upstream draws it from the global RNG (set_seed
    2025 plus whatever the data pipeline consumed), which no server can reproduce; we draw it from the
    request seed's own stream (offset by one so it is not the target noise's), so a seed fixes the edit."""
    g = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def posterior_latent(vae: LanceVAE, pixels: torch.Tensor, seed: int, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Lance's latent of a conditioning input: posterior *sample* of pixels [3, T, H, W], [1, z, t, h, w].
    `eps` (else drawn from the seed) is the posterior noise, shaped like the latent."""
    mean, logvar = vae.encode(pixels[None].to(vae.latents_mean.device, vae.latents_mean.dtype))
    if eps is None:
        eps = posterior_eps(mean.shape, seed, mean.device, mean.dtype)
    return vae.sample_posterior(mean, logvar, eps=eps)


def first_frame_condition(vae: LanceVAE, pixels: torch.Tensor, grid: tuple[int, int, int], seed: int,
                          eps: torch.Tensor | None = None) -> torch.Tensor:
    """i2v's condition: the posterior-sampled latent frame 0 of a bucketed image [3, 1, H, W], [1, z, 1, h, w].

    Upstream encodes a [3, T, H, W] video whose first 4 frames are the image and the rest noise, and keeps
    latent frame 0; the Wan2.2 encoder is causal and encodes frame 0 alone, so encoding the image alone
    gives the same latent frame. The posterior noise `eps` is the whole target latent's, [1, z, t, h, w] as
    upstream draws it (or just its frame 0, [1, z, 1, h, w]); frame 0 of it is used. Default: the seed's."""
    t, h, w = grid
    z = vae.latents_mean.shape[1]
    if eps is None:
        eps = posterior_eps((1, z, t, h, w), seed, vae.latents_mean.device, vae.latents_mean.dtype)
    elif eps.dim() != 5 or tuple(eps.shape[:2]) != (1, z) or tuple(eps.shape[3:]) != (h, w):
        raise ValueError(f"reference_eps must be [1, {z}, t, {h}, {w}], got {list(eps.shape)}")
    return posterior_latent(vae, pixels, seed, eps[:, :, :1])


def reference_latent(vae: LanceVAE, image: Image.Image, resolution: str, seed: int,
                     eps: torch.Tensor | None = None) -> torch.Tensor:
    """Lance's reference latent of an edit input: posterior *sample* of the bucketed image, [1, z, t, h, w]."""
    return posterior_latent(vae, vae_image_tensor(image, resolution), seed, eps)


def latent_tokens(latent: torch.Tensor) -> torch.Tensor:
    """[1, z, t, h, w] -> token-major [t*h*w, z] (the order of a VAE block's slots)."""
    return latent[0].permute(1, 2, 3, 0).reshape(-1, latent.shape[1]).contiguous()
