"""Random-weight Lance checkpoints in the real layout (`lance-serve make-tiny-checkpoint`).

Same folders, file names, config files, tokenizer files, tensor names and key trees as
`bytedance-research/Lance` (lance_spec.md §1.1), at any small geometry, so every loader runs on real structure
without the 57 GB download. Values follow the recipe of the golden tiny checkpoint, so the default
geometry and seed reproduce `shared/golden/tiny_ckpt` bit for bit:

* every tensor from its own generator, seeded `seed + crc32(name)` (adding a tensor changes no other);
* matrices and biases N(0, 0.02^2); norm weights 1 + 0.1 N(0, 1), not exactly 1, so that swapping the
  und/gen experts or two layers' norms changes outputs;
* VAE convolutions N(0, (0.7 / sqrt(fan_in))^2), so activations stay O(1) through the tiny VAE;
* `latent_pos_embed.pos_embed` = the real sin-cos table (1 frame for Lance_3B, 31 for Lance_3B_Video).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import (
    LLM_CONFIG_NAME, TOP_CONFIG_NAME, VAE_FILE_NAME, VARIANTS, VIDEO_VARIANTS, VIT_CONFIG_NAME, VIT_DIR_NAME,
    VIT_WEIGHTS_NAME, CheckpointFiles, check_checkpoint, expected_llm_tensor_shapes,
    expected_vae_tensor_shapes, expected_vit_tensor_shapes, resolve_checkpoint, stored_latent_pos_embed_frames,
)
from .config import LATENT_CHANNELS, LanceConfig, LanceLLMConfig
from .embeddings import latent_pos_embed_table
from .weights import BUNDLED_VIT_PREFIX, POSITION_TABLE_NAME

logger = logging.getLogger(__name__)

DEFAULT_SEED = 20260714  # the golden tiny checkpoint's seed
# Head sizes vLLM's CPU attention backend supports; the tiny LLM must run in the vLLM thinker too.
VLLM_CPU_HEAD_DIMS = (64, 80, 112, 128)
TINY_TOKENIZER_DIR = Path(__file__).parent / "data" / "tiny_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
# Wan2.2 VAE structure (lance_spec.md §6.1); only the widths are tiny.
WAN22_VAE_STRUCTURE = dict(z_dim=LATENT_CHANNELS, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                           dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], scale_factor_temporal=4, scale_factor_spatial=16)


@dataclass(frozen=True)
class TinyCheckpointSpec:
    """Geometry of a random-weight checkpoint. Defaults = the golden tiny checkpoint."""

    layers: int = 2
    hidden: int = 128
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 256
    vocab_size: int = 1024          # embedding rows (>= len(tokenizer) = 998)
    vit_depth: int = 2
    vit_hidden: int = 64
    vit_heads: int = 2
    vit_intermediate: int = 128
    vae_dim: int = 16               # Wan2.2 `dim` (encoder base width)
    vae_decoder_dim: int = 16       # Wan2.2 `dec_dim`
    seed: int = DEFAULT_SEED
    variants: tuple[str, ...] = ("Lance_3B",)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mrope_section(self) -> list[int]:
        """t/h/w split of the rotary half, in Qwen2.5-VL's proportions ([16,24,24] for head_dim 128)."""
        half = self.head_dim // 2
        return [half // 4, 3 * half // 8, 3 * half // 8]

    @property
    def vit_fullatt_blocks(self) -> list[int]:
        """Full-attention ViT blocks, spaced like Qwen2.5-VL's (7, 15, 23, 31 of 32); the last block always."""
        every = max(2, self.vit_depth // 4)
        return [i for i in range(self.vit_depth) if (i + 1) % every == 0] or [self.vit_depth - 1]

    def validate(self, len_tokenizer: int) -> None:
        positive = {k: v for k, v in asdict(self).items() if isinstance(v, int) and k != "seed"}
        bad = [k for k, v in positive.items() if v < 1]
        if bad:
            raise ValueError(f"must be positive: {', '.join(bad)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.head_dim not in VLLM_CPU_HEAD_DIMS:
            raise ValueError(f"head_dim = hidden/heads = {self.head_dim}; vLLM's CPU attention supports only "
                             f"{list(VLLM_CPU_HEAD_DIMS)} (e.g. --hidden {64 * self.heads} for {self.heads} heads)")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv-heads {self.kv_heads}")
        if self.vocab_size < len_tokenizer:
            raise ValueError(f"vocab-size {self.vocab_size} < the tokenizer's {len_tokenizer} tokens")
        if self.vit_hidden % self.vit_heads or (self.vit_hidden // self.vit_heads) % 4:
            raise ValueError(f"ViT head_dim = {self.vit_hidden}/{self.vit_heads} must be a multiple of 4 (2-D rotary)")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be among {list(VARIANTS)}, got {list(self.variants)}")


# ----------------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------------
def _standard_normal(seed_name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + zlib.crc32(seed_name.encode()))
    return torch.randn(shape, generator=generator)


def variant_seed(seed: int, variant: str) -> int:
    """Base seed of one variant's model.safetensors (the variants are separate fine-tunes)."""
    return seed + VARIANTS.index(variant)


def _is_norm_weight(name: str) -> bool:
    module = name.split(".")[-2]
    return "norm" in module or module == "ln_q"  # ln_q: the ViT merger's RMSNorm


def transformer_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    r = _standard_normal(name, shape, seed)
    return 1 + 0.1 * r if _is_norm_weight(name) else 0.02 * r


def vae_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    r = _standard_normal(name, shape, seed)
    if name.endswith(".gamma"):
        return 1 + 0.1 * r
    if name.endswith(".bias"):
        return 0.02 * r
    return r * (0.7 / math.sqrt(math.prod(shape[1:])))


# ----------------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------------
def _token_ids() -> dict[str, int]:
    added = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())["added_tokens"]
    return {t["content"]: t["id"] for t in added}


def _len_tokenizer() -> int:
    vocab = json.loads((TINY_TOKENIZER_DIR / "vocab.json").read_text())
    return len(set(vocab.values()) | set(_token_ids().values()))


def vit_config(spec: TinyCheckpointSpec) -> dict:
    """`Qwen2.5-VL-ViT/config.json` (shape of the real one, lance_spec.md §1.1, §4.1)."""
    return {
        "_attn_implementation": "flash_attention_2", "depth": spec.vit_depth,
        "fullatt_block_indexes": spec.vit_fullatt_blocks, "hidden_act": "silu", "hidden_size": spec.vit_hidden,
        "in_channels": 3, "in_chans": 3, "intermediate_size": spec.vit_intermediate, "model_type": "qwen2_5_vl",
        "num_heads": spec.vit_heads, "out_hidden_size": spec.hidden, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": 112,
    }


def llm_config(spec: TinyCheckpointSpec, ids: dict[str, int]) -> dict:
    """`llm_config.json`: a stock Qwen2.5-VL config (lance_spec.md §1.3) with the tiny tokenizer's ids."""
    vit = vit_config(spec)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu", "hidden_size": spec.hidden, "initializer_range": 0.02,
        "intermediate_size": spec.intermediate, "max_position_embeddings": 128000, "max_window_layers": 70,
        "model_type": "qwen2_5_vl", "num_attention_heads": spec.heads, "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True,  # as the real file says; upstream unties
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vision_config": {k: vit[k] for k in ("depth", "hidden_act", "hidden_size", "intermediate_size", "num_heads",
                                              "in_chans", "out_hidden_size", "patch_size", "spatial_merge_size",
                                              "spatial_patch_size", "window_size", "fullatt_block_indexes",
                                              "tokens_per_second", "temporal_patch_size")},
        "rope_scaling": {"type": "mrope", "mrope_section": spec.mrope_section},
        "vocab_size": spec.vocab_size,
    }


def generation_config(ids: dict[str, int]) -> dict:
    """Stock shape (unused by upstream inference, which decodes greedily by hand)."""
    return {"bos_token_id": ids["<|endoftext|>"], "do_sample": True,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
            "repetition_penalty": 1.05, "temperature": 1e-06}


def top_config(spec: TinyCheckpointSpec) -> dict:
    """Top-level `config.json` (descriptive only; no code reads it for loading)."""
    dirs = {("video" if v in VIDEO_VARIANTS else "image"): v for v in spec.variants}
    return {"_note": "random-weight test checkpoint written by `lance-serve make-tiny-checkpoint`",
            "model_name": "Lance", "checkpoint_directories": dirs | {"vit": VIT_DIR_NAME, "vae": VAE_FILE_NAME},
            "tiny_spec": asdict(spec)}


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def make_tiny_checkpoint(out_dir: str | Path, spec: TinyCheckpointSpec = TinyCheckpointSpec()) -> CheckpointFiles:
    """Write a random-weight checkpoint into `out_dir` (created; our files overwritten) and verify that it
    accounts for every tensor (0 missing / 0 unexpected). Deterministic for a given spec."""
    ids = _token_ids()
    spec.validate(_len_tokenizer())
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)

    raw_llm = llm_config(spec, ids)
    vit = vit_config(spec)
    vit_shapes = expected_vit_tensor_shapes(vit)
    for variant in spec.variants:
        llm_dir = root / variant
        llm_dir.mkdir(exist_ok=True)
        cfg = LanceConfig(llm=LanceLLMConfig.from_dict(raw_llm), variant=variant, raw_llm_config=raw_llm)
        # Variants are separate fine-tunes: each variant's tensors come from its own base seed (seed + the
        # variant's index: Lance_3B_Video = seed + 1, as in the golden tiny checkpoint).
        seed = variant_seed(spec.seed, variant)
        tensors = {n: transformer_tensor(n, s, seed) for n, s in expected_llm_tensor_shapes(cfg).items()
                   if n != POSITION_TABLE_NAME}
        frames = stored_latent_pos_embed_frames(cfg)
        tensors[POSITION_TABLE_NAME] = latent_pos_embed_table(spec.hidden, frames, cfg.latent.max_latent_size)
        if variant in VIDEO_VARIANTS:  # the video file carries its own ViT copy (lance_spec.md §1.1)
            tensors |= {BUNDLED_VIT_PREFIX + n: transformer_tensor(BUNDLED_VIT_PREFIX + n, s, seed)
                        for n, s in vit_shapes.items()}
        _save_safetensors(tensors, llm_dir / "model.safetensors")
        _write_json(llm_dir / LLM_CONFIG_NAME, raw_llm)
        _write_json(llm_dir / "generation_config.json", generation_config(ids))
        for name in TOKENIZER_FILES:
            shutil.copyfile(TINY_TOKENIZER_DIR / name, llm_dir / name)

    vit_dir = root / VIT_DIR_NAME
    vit_dir.mkdir(exist_ok=True)
    _write_json(vit_dir / VIT_CONFIG_NAME, vit)
    _save_safetensors({n: transformer_tensor(n, s, spec.seed) for n, s in vit_shapes.items()},
                      vit_dir / VIT_WEIGHTS_NAME)

    vae_shapes = expected_vae_tensor_shapes(
        dict(WAN22_VAE_STRUCTURE, base_dim=spec.vae_dim, decoder_base_dim=spec.vae_decoder_dim))
    torch.save({n: vae_tensor(n, s, spec.seed) for n, s in vae_shapes.items()}, root / VAE_FILE_NAME)

    _write_json(root / TOP_CONFIG_NAME, top_config(spec))
    files = resolve_checkpoint(root, spec.variants[0])
    for variant in spec.variants:
        check_checkpoint(resolve_checkpoint(root, variant))
    logger.info("wrote tiny Lance checkpoint %s (%s)", root, ", ".join(spec.variants))
    return files


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes 0600; a serving container may run as another user


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
