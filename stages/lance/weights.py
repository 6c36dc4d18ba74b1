"""Checkpoint tensor names -> our parameter names (one table for every model that loads Lance).

The real `Lance_3B/model.safetensors` keeps upstream's names (`language_model.model.layers.L.self_attn.
q_proj_moe_gen.weight`, ...). Our modules group each layer's parameters by expert (`layers.L.und.*`,
`layers.L.gen.*`) and fuse q|k|v and gate|up; a stacked entry names the shard a tensor fills.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
_GEN = "_moe_gen"

# checkpoint suffix (und spelling) -> (our module path inside an expert, shard or None)
_LAYER_TABLE: dict[str, tuple[str, str | None]] = {
    "self_attn.q_proj": ("attn.qkv_proj", "q"),
    "self_attn.k_proj": ("attn.qkv_proj", "k"),
    "self_attn.v_proj": ("attn.qkv_proj", "v"),
    "self_attn.o_proj": ("attn.o_proj", None),
    "self_attn.q_norm": ("attn.q_norm", None),
    "self_attn.k_norm": ("attn.k_norm", None),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
    "mlp.down_proj": ("mlp.down_proj", None),
    "input_layernorm": ("input_layernorm", None),
    "post_attention_layernorm": ("post_attention_layernorm", None),
}

_TOP_TABLE: dict[str, str] = {
    "language_model.model.embed_tokens.weight": "language_model.embed_tokens.weight",
    "language_model.model.norm.weight": "language_model.norm.weight",
    "language_model.model.norm_moe_gen.weight": "language_model.norm_gen.weight",
    "language_model.lm_head.weight": "language_model.lm_head.weight",
}
_TOP_PREFIXES = ("time_embedder.", "vae2llm.", "llm2vae.")

# Fixed sin-cos table: upstream pops it at load and recomputes it (we check it instead).
RECOMPUTED_TENSORS = ("latent_pos_embed.pos_embed",)


@dataclass(frozen=True)
class WeightTarget:
    param: str              # our parameter name, relative to LanceModel
    shard: str | None       # q/k/v or gate/up for fused parameters
    layer: int | None = None
    expert: str | None = None  # "und" | "gen"


def map_checkpoint_name(name: str) -> WeightTarget | None:
    """Where a checkpoint tensor goes, or None if it is not a LanceModel parameter."""
    if name in _TOP_TABLE:
        return WeightTarget(_TOP_TABLE[name], None)
    if name.startswith(_TOP_PREFIXES):
        return WeightTarget(name, None)
    m = _LAYER.match(name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    module, _, kind = rest.rpartition(".")          # kind: weight | bias
    expert = "gen" if _GEN in module else "und"
    module = module.replace(_GEN, "")               # self_attn.q_proj_moe_gen / mlp_moe_gen.gate_proj
    if module not in _LAYER_TABLE:
        return None
    ours, shard = _LAYER_TABLE[module]
    return WeightTarget(f"language_model.layers.{layer}.{expert}.{ours}.{kind}", shard, layer, expert)


def shard_slice(shard: str | None, q_size: int, kv_size: int, intermediate: int) -> slice:
    """Rows of a fused parameter that one checkpoint tensor fills."""
    return {
        None: slice(None),
        "q": slice(0, q_size),
        "k": slice(q_size, q_size + kv_size),
        "v": slice(q_size + kv_size, q_size + 2 * kv_size),
        "gate": slice(0, intermediate),
        "up": slice(intermediate, 2 * intermediate),
    }[shard]
