"""Single-frame Wan2.2 VAE decode as a 2-D network (an image is one latent frame).

diffusers' `AutoencoderKLWan._decode` runs the causal 3-D decoder with a feature cache even for one
frame: every 3x3x3 causal conv pads two zero frames in front (3x the conv FLOPs, two of them on
zeros), every conv input is cloned into the cache, and each temporal upsampling shortcut builds two
frames to drop one. For the first frame all of that is exactly a 2-D network: a causal conv's output
at frame 0 only sees the last temporal slice of its kernel, the temporal upsampling conv is skipped,
and the duplicated-frame shortcut keeps its last copy. `FrameDecoder` runs that 2-D network on the
same parameters (no copies kept), so it equals `LanceVAE.decode` for t = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    DupUp3D, WanCausalConv3d, WanResample, WanResidualBlock, WanResidualUpBlock, WanRMS_norm, WanUpBlock,
)

from stages.lance.vae import LanceVAE


def _conv(conv: WanCausalConv3d, x: torch.Tensor) -> torch.Tensor:
    """The causal conv's output frame 0 for a single input frame: a 2-D conv with the kernel's last slice."""
    kt = conv.kernel_size[0]
    if conv._padding[4] != kt - 1:
        raise ValueError(f"{conv}: not a causal conv with {kt - 1} front padding frames")
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else torch.contiguous_format
    weight = conv.weight[:, :, -1].contiguous(memory_format=fmt)   # a copy of one slice, not kept
    return F.conv2d(x, weight, conv.bias, stride=conv.stride[1:], padding=(conv._padding[2], conv._padding[0]))


def _norm(norm: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    """WanRMS_norm over channels of a [B, C, H, W] tensor (its gamma is shaped for 5-D inputs)."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    y = F.normalize(x.float() if low else x, dim=1).to(x.dtype)
    c = x.shape[1]
    bias = norm.bias.view(c, 1, 1) if isinstance(norm.bias, torch.Tensor) else norm.bias
    return y * norm.scale * norm.gamma.view(c, 1, 1) + bias


def _resblock(block: WanResidualBlock, x: torch.Tensor) -> torch.Tensor:
    h = x if isinstance(block.conv_shortcut, torch.nn.Identity) else _conv(block.conv_shortcut, x)
    x = _conv(block.conv1, block.nonlinearity(_norm(block.norm1, x)))
    x = _conv(block.conv2, block.nonlinearity(_norm(block.norm2, x)))
    return x + h


def _resample(resample: WanResample, x: torch.Tensor) -> torch.Tensor:
    # First frame: upsample3d skips its temporal conv (diffusers' "Rep" branch), the rest is 2-D.
    if resample.mode not in ("upsample2d", "upsample3d", "none"):
        raise ValueError(f"unexpected decoder resample mode {resample.mode!r}")
    return resample.resample(x)


def _dup_up_first_frame(dup: DupUp3D, x: torch.Tensor) -> torch.Tensor:
    """DupUp3D(first_chunk=True) for one frame: only the last of its factor_t temporal copies."""
    b, _, h, w = x.shape
    fs, ft = dup.factor_s, dup.factor_t
    x = x.repeat_interleave(dup.repeats, dim=1).reshape(b, dup.out_channels, ft, fs, fs, h, w)[:, :, ft - 1]
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, dup.out_channels, h * fs, w * fs)


def _up_block(block, x: torch.Tensor) -> torch.Tensor:
    shortcut = x
    for resnet in block.resnets:
        x = _resblock(resnet, x)
    if isinstance(block, WanResidualUpBlock):
        if block.upsampler is not None:
            x = _resample(block.upsampler, x)
        if block.avg_shortcut is not None:
            x = x + _dup_up_first_frame(block.avg_shortcut, shortcut)
    elif isinstance(block, WanUpBlock):
        if block.upsamplers is not None:
            x = _resample(block.upsamplers[0], x)
    else:
        raise TypeError(f"unexpected decoder block {type(block).__name__}")
    return x


class FrameDecoder:
    """Decode normalized single-frame latents [B, z, h, w] to images [B, 3, 16h, 16w] in [-1, 1]."""

    def __init__(self, vae: LanceVAE, channels_last: bool = False):
        """`channels_last`: run the convs in NHWC (cuDNN's native tensor-core layout on GPUs)."""
        if not vae.has_decoder:
            raise ValueError("FrameDecoder needs a LanceVAE loaded with its decoder")
        self.vae = vae
        self.channels_last = channels_last
        self.model = vae.model
        self.patch_size = self.model.config.patch_size or 1

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() == 5:
            if latents.shape[2] != 1:
                raise ValueError(f"FrameDecoder decodes one latent frame, got {latents.shape[2]}")
            latents = latents[:, :, 0]
        vae, dec = self.vae, self.model.decoder
        z = latents.to(vae.latents_mean.dtype) / vae.latents_inv_std[:, :, 0] + vae.latents_mean[:, :, 0]
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        x = _conv(self.model.post_quant_conv, z)
        x = _conv(dec.conv_in, x)
        mid = dec.mid_block
        x = _resblock(mid.resnets[0], x)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                x = attn(x.unsqueeze(2)).squeeze(2)
            x = _resblock(resnet, x)
        for block in dec.up_blocks:
            x = _up_block(block, x)
        x = _conv(dec.conv_out, dec.nonlinearity(_norm(dec.norm_out, x)))
        p = self.patch_size
        if p > 1:  # diffusers' unpatchify for one frame
            b, c = x.shape[0], x.shape[1] // (p * p)
            h, w = x.shape[2], x.shape[3]
            x = x.reshape(b, c, p, p, h, w).permute(0, 1, 4, 3, 5, 2).reshape(b, c, h * p, w * p)
        return x.clamp(-1, 1).contiguous()
