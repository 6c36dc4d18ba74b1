"""Typed configuration of a Lance checkpoint, read from its files (never from constants).

`LanceConfig` is what both stages share: the MoT decoder's geometry (from `llm_config.json`), the
runtime flags upstream sets in code (qk-norm for both experts, untied lm_head, mRoPE), the latent
geometry of the generation path, and the special-token ids (from the config and the tokenizer).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Architecture facts of Lance that the checkpoint files do not state; upstream sets them as runtime
# flags in `inference_lance.sh` (lance_spec.md §1.3), so they are defaults here, not magic numbers in code.
LATENT_CHANNELS = 48          # Wan2.2 VAE z_dim; latent patch size (1, 1, 1)
VAE_SPATIAL_DOWNSAMPLE = 16   # 2x patchify x 2^3 stride-2 stages
VAE_TEMPORAL_DOWNSAMPLE = 4   # causal; the first frame is kept alone
TIMESTEP_FREQ_DIM = 256       # DiT-style sinusoidal timestep features


@dataclass(frozen=True)
class LanceLLMConfig:
    """The Qwen2-MoT decoder. Both experts (und, gen) share this geometry."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    spatial_merge_size: int = 2
    tokens_per_second: float = 2.0
    # Runtime flags upstream adds (lance_spec.md §1.3); the json says tie_word_embeddings=true, upstream forces False.
    qk_norm_und: bool = True
    qk_norm_gen: bool = True
    tie_word_embeddings: bool = False

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K+V per context token and branch in bf16 (all layers)."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * 2

    @classmethod
    def from_dict(cls, cfg: dict) -> "LanceLLMConfig":
        rope = cfg.get("rope_scaling") or {}
        section = rope.get("mrope_section")
        if section is None:
            raise ValueError("llm_config.json has no rope_scaling.mrope_section: Lance needs Qwen2.5-VL mRoPE")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if 2 * sum(section) != head_dim:
            raise ValueError(f"mrope_section {section} does not cover head_dim {head_dim} (2*sum must equal it)")
        vision = cfg.get("vision_config") or {}
        return cls(
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 1e6),
            mrope_section=tuple(section),
            max_position_embeddings=cfg.get("max_position_embeddings", 128000),
            spatial_merge_size=vision.get("spatial_merge_size", 2),
            tokens_per_second=float(vision.get("tokens_per_second", 2)),
        )


@dataclass(frozen=True)
class LatentConfig:
    """Geometry of the generation path (VAE latent tokens)."""

    channels: int = LATENT_CHANNELS
    spatial_downsample: int = VAE_SPATIAL_DOWNSAMPLE
    temporal_downsample: int = VAE_TEMPORAL_DOWNSAMPLE
    max_latent_size: int = 64     # per spatial side -> 1024 px
    max_num_frames: int = 121     # RGB frames -> 31 latent frames in the position table

    @property
    def max_latent_frames(self) -> int:
        return (self.max_num_frames - 1) // self.temporal_downsample + 1

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.spatial_downsample

    def latent_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) latent grid of a (num_frames, height, width) pixel target."""
        return ((num_frames - 1) // self.temporal_downsample + 1,
                height // self.spatial_downsample, width // self.spatial_downsample)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens Lance's sequences are built from (from llm_config.json and the tokenizer)."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    visual_pad: int     # placeholder of ViT and VAE slots (<|video_pad|>, config.video_token_id)
    pad: int            # <|endoftext|>
    len_tokenizer: int  # logits >= this are masked at decode time

    @classmethod
    def from_config_and_tokenizer(cls, cfg: dict, tokenizer) -> "SpecialTokens":
        def tok(name: str) -> int:
            i = tokenizer.convert_tokens_to_ids(name)
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {name}")
            return int(i)

        return cls(
            im_start=tok("<|im_start|>"),
            im_end=tok("<|im_end|>"),
            vision_start=int(cfg.get("vision_start_token_id", tok("<|vision_start|>"))),
            vision_end=int(cfg.get("vision_end_token_id", tok("<|vision_end|>"))),
            visual_pad=int(cfg.get("video_token_id", tok("<|video_pad|>"))),
            pad=tok("<|endoftext|>"),
            len_tokenizer=len(tokenizer),
        )


@dataclass(frozen=True)
class LanceConfig:
    """Everything about a loaded Lance checkpoint that code needs, in one object."""

    llm: LanceLLMConfig
    latent: LatentConfig = field(default_factory=LatentConfig)
    variant: str = "Lance_3B"
    raw_llm_config: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_llm_config_file(cls, path: str | Path, variant: str = "Lance_3B") -> "LanceConfig":
        raw = json.loads(Path(path).read_text())
        return cls(llm=LanceLLMConfig.from_dict(raw), variant=variant, raw_llm_config=raw)
