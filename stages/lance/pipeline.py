"""`LancePipeline`: Lance in one process (diffusers style); the reference every stage is checked against.

    pipe = LancePipeline.from_pretrained("bytedance-research/Lance")      # or a local folder
    pipe.text_to_image("A red cube on a blue table", height=768, width=768).image
    pipe.edit_image(Image.open("in.png"), "Make the square green").image
    pipe.image_to_text(Image.open("in.png"), "What color is the square?").text

    video = LancePipeline.from_pretrained("bytedance-research/Lance", variant="Lance_3B_Video")
    video.text_to_video("A red ball rolls across a table", num_frames=121, height=480, width=848).frames
    video.image_to_video(Image.open("first.png"), "The ball rolls to the right", num_frames=61).frames
    video.edit_video("in.mp4", "Make the ball green").frames
    video.video_to_text("in.mp4", "Which way does the ball roll?").text

Each task reads top to bottom: build the sequence -> encode visual inputs -> prefill the context of each
CFG branch -> prepare latents -> denoising loop -> decode.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from PIL import Image

from .checkpoint import load_lance_config, load_tokenizer, resolve_checkpoint, SafetensorsFile
from .config import LanceConfig, SpecialTokens
from .context import prefill_context
from .denoise import BranchState, denoise, initial_noise
from .limits import check_target_size
from .model import LanceModel
from .prompts import Visual, default_system_prompt
from .requests import I2V_DEFAULT_FRAMES, T2V_DEFAULT_FRAMES, T2V_DEFAULT_SIZE, DenoiseParams
from .scheduler import FlowMatchEulerScheduler
from .sequence import BranchPlan, build_understanding_sequence, mrope_positions, plan_generation_request
from .transformer import KVCache
from .preprocessing import vae_image_tensor, vae_video_tensor
from .vae import (LanceVAE, decode_to_uint8, first_frame_condition, latent_tokens, posterior_latent, reference_latent,
                  uint8_to_pil)
from .video_io import sample_video
from .vit import LanceViT, image_patches, video_patches
from .weights import BUNDLED_VIT_PREFIX, part_of

log = logging.getLogger(__name__)

SAVE_FPS = 12  # upstream writes generated videos at 12 fps (the rate its frame sampler trains on)


@dataclass
class GenerationContext:
    """Everything computed before the denoising loop (kept on outputs for inspection and tests)."""

    cond: BranchPlan
    uncond: BranchPlan | None
    latent_grid: tuple[int, int, int]
    num_reference_tokens: int = 0
    vit_features: torch.Tensor | None = None
    reference_latents: torch.Tensor | None = None  # [tokens, 48], posterior sample
    cond_cache: KVCache | None = None
    uncond_cache: KVCache | None = None
    # i2v: the clean first latent frame [h*w, 48] that pins the first rows of the target block
    condition_latents: torch.Tensor | None = None
    frame_indices: list[int] | None = None  # video inputs: the frames sampled from the input video

    @property
    def clean_rows(self) -> int:
        return 0 if self.condition_latents is None else self.condition_latents.shape[0]


@dataclass
class ImageOutput:
    image: Image.Image
    latents: torch.Tensor          # final target latents [tokens, 48], token-major
    decoded: torch.Tensor          # VAE output [3, T, H, W] in [-1, 1]
    context: GenerationContext


@dataclass
class VideoOutput:
    frames: torch.Tensor           # uint8 [T, H, W, 3], T = 4(t-1)+1
    latents: torch.Tensor          # final target latents [t*h*w, 48], token-major
    decoded: torch.Tensor          # VAE output [3, T, H, W] in [-1, 1]
    context: GenerationContext
    fps: int = SAVE_FPS            # the frame rate upstream saves its videos at


@dataclass
class TextOutput:
    text: str
    token_ids: list[int]
    logits: list[torch.Tensor] = field(default_factory=list)  # per step, when output_logits=True


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


class LancePipeline:
    def __init__(self, model: LanceModel, tokenizer, tokens: SpecialTokens, vae: LanceVAE | None,
                 vit: LanceViT | None, config: LanceConfig):
        self.model, self.tokenizer, self.tokens = model, tokenizer, tokens
        self.vae, self.vit, self.config = vae, vit, config

    @property
    def device(self) -> torch.device:
        return self.model.vae2llm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vae2llm.weight.dtype

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        variant: str | None = None) -> "LancePipeline":
        files = resolve_checkpoint(path_or_repo_id, variant)
        config = load_lance_config(files)
        tokenizer = load_tokenizer(files)
        tokens = SpecialTokens.from_config_and_tokenizer(config.raw_llm_config, tokenizer)
        model = load_lance_model(files.llm_weights_path, config, dtype, device)
        vae = LanceVAE.from_wan22_pth(files.vae_path, dtype=dtype, device=device)
        vit = load_lance_vit(files, dtype, device)
        return cls(model, tokenizer, tokens, vae, vit, config)

    # --- tasks -----------------------------------------------------------------------------------

    @torch.no_grad()
    def text_to_image(self, prompt: str, height: int = 768, width: int = 768, num_inference_steps: int = 30,
                      timestep_shift: float = 3.5, cfg_text_scale: float = 4.0,
                      cfg_interval: tuple[float, float] = (0.4, 1.0), seed: int = 42,
                      latents: torch.Tensor | None = None, negative_prompt: str | None = None,
                      system_prompt: str | None = None, callback: StepCallback | None = None) -> ImageOutput:
        grid = self.target_grid(1, height, width)
        params = DenoiseParams(num_inference_steps, timestep_shift, cfg_text_scale, tuple(cfg_interval), seed=seed)
        system = system_prompt if system_prompt is not None else default_system_prompt("t2i")
        ctx = self.prepare_generation(system, prompt, [], grid, negative_prompt)
        return self.image_output(ctx, *self.generate_latents(ctx, params, latents, callback))

    @torch.no_grad()
    def edit_image(self, image: Image.Image, instruction: str, resolution: str = "image_768res",
                   num_inference_steps: int = 30, timestep_shift: float = 3.5, cfg_text_scale: float = 4.0,
                   cfg_interval: tuple[float, float] = (0.4, 1.0), seed: int = 42,
                   latents: torch.Tensor | None = None, reference_eps: torch.Tensor | None = None,
                   system_prompt: str | None = None, callback: StepCallback | None = None) -> ImageOutput:
        params = DenoiseParams(num_inference_steps, timestep_shift, cfg_text_scale, tuple(cfg_interval), seed=seed)
        vit_features, vit_grid = self.encode_vit(image, resolution)
        reference = reference_latent(self.vae, image, resolution, seed, reference_eps)  # [1, 48, t, h, w]
        grid = tuple(reference.shape[2:])
        system = system_prompt if system_prompt is not None else default_system_prompt("image_edit")
        ctx = self.prepare_generation(system, instruction, [("vit", vit_grid), ("vae_ref", grid)], grid,
                                      vit_features=vit_features, reference_latents=latent_tokens(reference))
        return self.image_output(ctx, *self.generate_latents(ctx, params, latents, callback))

    @torch.no_grad()
    def image_to_text(self, image: Image.Image, question: str, system_prompt: str | None = None,
                      resolution: str = "image_768res", max_new_tokens: int = 256,
                      output_logits: bool = False) -> TextOutput:
        vit_features, vit_grid = self.encode_vit(image, resolution)
        system = system_prompt if system_prompt is not None else default_system_prompt("x2t")
        parts = [Visual("vit")] + ([question] if question else [])
        seq = build_understanding_sequence(self.tokenizer, self.tokens, system, [("user", parts)], [vit_grid])
        positions = mrope_positions(seq, self.config.llm.tokens_per_second)  # x2t: no ViT shift
        return self.decode_greedy(BranchPlan(seq, positions, positions[:, :0]), vit_features, max_new_tokens,
                                  output_logits)

    @torch.no_grad()
    def text_to_video(self, prompt: str, num_frames: int = T2V_DEFAULT_FRAMES, height: int = T2V_DEFAULT_SIZE[0],
                      width: int = T2V_DEFAULT_SIZE[1],
                      num_inference_steps: int = 30, timestep_shift: float = 3.5, cfg_text_scale: float = 4.0,
                      cfg_interval: tuple[float, float] = (0.4, 1.0), seed: int = 42,
                      latents: torch.Tensor | None = None, negative_prompt: str | None = None,
                      system_prompt: str | None = None, callback: StepCallback | None = None) -> VideoOutput:
        """t2v: `num_frames` (4k+1; others round down to 4k+1 as upstream) at height x width (multiples of 16)."""
        grid = self.target_grid(num_frames, height, width)
        params = DenoiseParams(num_inference_steps, timestep_shift, cfg_text_scale, tuple(cfg_interval), seed=seed)
        system = system_prompt if system_prompt is not None else default_system_prompt("t2v")
        ctx = self.prepare_generation(system, prompt, [], grid, negative_prompt)
        return self.video_output(ctx, *self.generate_latents(ctx, params, latents, callback))

    @torch.no_grad()
    def image_to_video(self, image: Image.Image, prompt: str, num_frames: int = I2V_DEFAULT_FRAMES,
                       resolution: str = "video_480p",
                       num_inference_steps: int = 30, timestep_shift: float = 3.5, cfg_text_scale: float = 4.0,
                       cfg_interval: tuple[float, float] = (0.4, 1.0), seed: int = 42,
                       latents: torch.Tensor | None = None, reference_eps: torch.Tensor | None = None,
                       negative_prompt: str | None = None, system_prompt: str | None = None,
                       callback: StepCallback | None = None) -> VideoOutput:
        """i2v: the image (bucketed by `resolution`, which sets the video's size) is the clean first latent
        frame; it is not in the prompt. `reference_eps` is its posterior noise, [1, 48, t, h, w] (only
        latent frame 0 is used) or [1, 48, 1, h, w]."""
        if isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        pixels = vae_image_tensor(image, resolution)  # [3, 1, H, W]
        grid = self.target_grid(num_frames, *pixels.shape[-2:])
        params = DenoiseParams(num_inference_steps, timestep_shift, cfg_text_scale, tuple(cfg_interval), seed=seed)
        condition = self.first_frame_latent(pixels, grid, seed, reference_eps)
        system = system_prompt if system_prompt is not None else default_system_prompt("i2v")
        ctx = self.prepare_generation(system, prompt, [], grid, negative_prompt)
        ctx.condition_latents = latent_tokens(condition)
        return self.video_output(ctx, *self.generate_latents(ctx, params, latents, callback))

    @torch.no_grad()
    def edit_video(self, video, instruction: str, resolution: str = "video_480p", num_inference_steps: int = 30,
                   timestep_shift: float = 3.5, cfg_text_scale: float = 4.0,
                   cfg_interval: tuple[float, float] = (0.4, 1.0), seed: int = 42,
                   latents: torch.Tensor | None = None, reference_eps: torch.Tensor | None = None,
                   system_prompt: str | None = None, callback: StepCallback | None = None) -> VideoOutput:
        """video_edit: `video` is a path to a video file or an object with `.frames` and `.fps`; upstream's
        sampled frames (12 fps, <= 6 s, 4k+1) go through the ViT and the VAE; the output has their count
        and bucketed size. `reference_eps` is the reference latent's posterior noise, [1, 48, t, h, w]."""
        params = DenoiseParams(num_inference_steps, timestep_shift, cfg_text_scale, tuple(cfg_interval), seed=seed)
        indices, frames = sample_video(video)
        vit_features, vit_grid = self.encode_vit_video(frames, resolution)
        pixels = vae_video_tensor(frames, resolution)
        self.target_grid(pixels.shape[1], *pixels.shape[-2:])  # limits of the position table
        reference = posterior_latent(self.vae, pixels, seed, reference_eps)  # [1, 48, t, h, w]
        grid = tuple(reference.shape[2:])
        system = system_prompt if system_prompt is not None else default_system_prompt("video_edit")
        ctx = self.prepare_generation(system, instruction, [("vit", vit_grid), ("vae_ref", grid)], grid,
                                      vit_features=vit_features, reference_latents=latent_tokens(reference))
        ctx.frame_indices = indices
        return self.video_output(ctx, *self.generate_latents(ctx, params, latents, callback))

    @torch.no_grad()
    def video_to_text(self, video, question: str, system_prompt: str | None = None, resolution: str = "video_480p",
                      max_new_tokens: int = 200, output_logits: bool = False) -> TextOutput:
        """x2t_video: `video` is a path to a video file or an object with `.frames` and `.fps`."""
        _, frames = sample_video(video)
        vit_features, vit_grid = self.encode_vit_video(frames, resolution)
        system = system_prompt if system_prompt is not None else default_system_prompt("x2t_video")
        parts = [Visual("vit")] + ([question] if question else [])
        seq = build_understanding_sequence(self.tokenizer, self.tokens, system, [("user", parts)], [vit_grid])
        positions = mrope_positions(seq, self.config.llm.tokens_per_second)  # x2t: no ViT shift
        return self.decode_greedy(BranchPlan(seq, positions, positions[:, :0]), vit_features, max_new_tokens,
                                  output_logits)

    # --- building blocks (the stages reuse the same steps) ----------------------------------------

    def target_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent grid (t, h, w) of a generated image/video, checked against the model's limits."""
        return check_target_size(num_frames, height, width, self.config.latent)

    def first_frame_latent(self, pixels: torch.Tensor, grid, seed: int, eps: torch.Tensor | None) -> torch.Tensor:
        """i2v's condition latent [1, 48, 1, h, w] (see `vae.first_frame_condition`)."""
        return first_frame_condition(self.vae, pixels, grid, seed, eps)

    def encode_vit_video(self, frames, resolution: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """ViT features of sampled video frames and the block's LLM grid (T/2, H/28, W/28)."""
        patches, patch_grid, llm_grid = video_patches(frames, resolution, self.vit.patch_size,
                                                      self.vit.temporal_patch_size, self.vit.spatial_merge_size)
        feats = self.vit(patches.to(self.device, self.vit.dtype), torch.tensor([patch_grid]))
        return feats.to(self.dtype), llm_grid


    def encode_vit(self, image: Image.Image, resolution: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """ViT features [tokens, hidden] and the block's LLM grid (T/2, H/28, W/28)."""
        patches, patch_grid, llm_grid = image_patches(image, resolution, self.vit.patch_size,
                                                      self.vit.temporal_patch_size, self.vit.spatial_merge_size)
        feats = self.vit(patches.to(self.device, self.vit.dtype), torch.tensor([patch_grid]))
        return feats.to(self.dtype), llm_grid

    def prepare_generation(self, system: str, caption: str, context_visuals, grid, negative_prompt=None,
                           vit_features=None, reference_latents=None) -> GenerationContext:
        cond, uncond = plan_generation_request(self.tokenizer, self.tokens, system, caption, context_visuals, grid,
                                               negative_prompt, self.config.llm.tokens_per_second)
        n_ref = 0 if reference_latents is None else reference_latents.shape[0]
        return GenerationContext(cond, uncond, tuple(grid), n_ref, vit_features, reference_latents)

    def generate_latents(self, ctx: GenerationContext, params: DenoiseParams, latents: torch.Tensor | None = None,
                         callback: StepCallback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill the branches, denoise the target block and decode it: (latents [n, 48], video [3, T, H, W]).

        `latents` is the initial noise of the whole target block (default: the seed's draw over all VAE
        tokens of the request, as upstream); i2v's first rows are then replaced by the condition."""
        ctx.cond_cache = prefill_context(self.model, ctx.cond, ctx.vit_features, ctx.reference_latents)
        if params.uses_cfg:
            ctx.uncond_cache = prefill_context(self.model, ctx.uncond, ctx.vit_features, ctx.reference_latents)
        t, h, w = ctx.latent_grid
        channels = self.config.latent.channels
        if latents is None:
            latents = initial_noise(t * h * w, ctx.num_reference_tokens, params.seed, channels, self.device, self.dtype)
        elif tuple(latents.shape) != (t * h * w, channels):
            raise ValueError(f"latents must be [{t * h * w}, {channels}], got {list(latents.shape)}")
        x = latents.to(self.device, self.dtype)
        if ctx.condition_latents is not None:
            x = torch.cat([ctx.condition_latents.to(x), x[ctx.clean_rows:]])
        markers = torch.tensor([self.tokens.vision_start, self.tokens.vision_end], device=self.device)
        uncond = BranchState(ctx.uncond_cache, ctx.uncond.query_positions.to(self.device)) if params.uses_cfg else None
        x = denoise(self.model, FlowMatchEulerScheduler(params), x, ctx.latent_grid, markers,
                    BranchState(ctx.cond_cache, ctx.cond.query_positions.to(self.device)), uncond, callback,
                    clean_rows=ctx.clean_rows)
        return x, self.decode_latents(x, ctx.latent_grid)

    @staticmethod
    def image_output(ctx: GenerationContext, latents: torch.Tensor, decoded: torch.Tensor) -> ImageOutput:
        return ImageOutput(uint8_to_pil(decode_to_uint8(decoded))[0], latents, decoded, ctx)

    @staticmethod
    def video_output(ctx: GenerationContext, latents: torch.Tensor, decoded: torch.Tensor) -> VideoOutput:
        return VideoOutput(decode_to_uint8(decoded), latents, decoded, ctx)

    def decode_latents(self, latents: torch.Tensor, grid) -> torch.Tensor:
        """Token-major latents [t*h*w, 48] -> VAE video [3, T, H, W] in [-1, 1]."""
        t, h, w = grid
        z = latents.reshape(t, h, w, -1).permute(3, 0, 1, 2)[None]
        return self.vae.decode(z)[0]

    def decode_greedy(self, plan: BranchPlan, vit_features, max_new_tokens: int, output_logits: bool) -> TextOutput:
        """Prefill the prompt, then greedy decoding over `logits[:len(tokenizer)]`, stop at <|im_end|>."""
        lm = self.model.language_model
        n = plan.context.input_ids.numel() - 1
        cache = prefill_context(self.model, BranchPlan(plan.context.head(n), plan.context_positions[:, :n],
                                                       plan.query_positions), vit_features,
                                extra_capacity=1 + max_new_tokens)
        next_id = plan.context.input_ids[-1:].to(self.device)  # the "\n" after assistant (upstream decode 0)
        pos = int(plan.context_positions[0, -1])
        out, logits_seen = [], []
        for _ in range(max_new_tokens):
            hidden = lm(lm.embed_tokens(next_id)[None], torch.full((3, 1), pos, device=self.device),
                        cache=cache, causal=True, update_cache=True)
            logits = lm.lm_head(hidden[0, -1]).float()
            if output_logits:
                logits_seen.append(logits)
            token = int(logits[: self.tokens.len_tokenizer].argmax())
            if token == self.tokens.im_end:
                break
            out.append(token)
            next_id, pos = torch.tensor([token], device=self.device), pos + 1
        return TextOutput(self.tokenizer.decode(out), out, logits_seen)


def load_lance_model(weights_path, config: LanceConfig, dtype: torch.dtype, device, drop_lm_head: bool = False) -> LanceModel:
    """Build on the meta device, allocate in `dtype` on `device`, fill from the checkpoint lazily.

    Strict: every parameter must be filled and every tensor of the file used, except the ViT's (a bundled
    copy is `load_lance_vit`'s) and, with `drop_lm_head`, lm_head's.
    """
    with torch.device("meta"):
        model = LanceModel(config)
    if drop_lm_head:
        model.language_model.lm_head = None
    model = model.to_empty(device=device).to(dtype)
    skip = ("bundled_vit",) + (("lm_head",) if drop_lm_head else ())
    with SafetensorsFile(weights_path) as f:
        model.load_weights(((name, partial(f.get, name)) for name in f.names()), skip_parts=skip).check(str(weights_path))
    return model.eval()


def load_lance_vit(files, dtype: torch.dtype, device) -> LanceViT:
    """The ViT: a variant's own copy (Lance_3B_Video) wins over vit.safetensors (`weights.VIT_SOURCES`)."""
    with SafetensorsFile(files.llm_weights_path) as f:
        bundled = any(part_of(n) == "bundled_vit" for n in f.names())
    if bundled:
        return LanceViT.from_pretrained(files.vit_dir, dtype, device, weights_path=files.llm_weights_path,
                                        prefix=BUNDLED_VIT_PREFIX)
    return LanceViT.from_pretrained(files.vit_dir, dtype, device)
