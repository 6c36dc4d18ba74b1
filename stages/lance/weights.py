"""Loading Lance's checkpoint, as data: which tensors each model takes, renames, shard stacking, accounting.

The real `Lance_3B/model.safetensors` keeps upstream's names (`language_model.model.layers.L.self_attn.
q_proj_moe_gen.weight`, ...). Three models load it: the model core's `LanceModel` (offline pipeline), the
DiT stage's part of it and the thinker's vLLM model. They differ only in which parts of Lance they hold,
so everything else lives here, once:

1. `CHECKPOINT_PARTS`: the part of Lance a checkpoint name belongs to, by prefix. A model declares the parts
   it leaves out (`WeightsLoader(skip_parts=...)`, as vLLM's `AutoWeightsLoader(skip_prefixes=...)`) and
   the parts it loads its own way (`part_loaders=`); every other part is copied into its parameters.
2. `EXPERT_TENSORS` / `TOP_TENSORS`: checkpoint name -> our parameter name (our modules group a layer's
   parameters by expert, `layers.L.und.*` / `layers.L.gen.*`, and fuse q|k|v and gate|up; a stacked entry
   names the shard it fills), and each tensor's shape in config terms, so the loaders and the checkpoint
   check (`stages.lance.checkpoint`) read one name scheme.
3. `WeightsLoader`: strict accounting. A tensor is loaded, or skipped because its part is declared
   skipped, or unexpected; every parameter (every shard of a fused one) must be filled.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .config import TIMESTEP_FREQ_DIM, LanceLLMConfig

# ----------------------------------------------------------------------------------------------------
# 1. Parts of the checkpoint
# ----------------------------------------------------------------------------------------------------
BUNDLED_VIT_PREFIX = "vit_model."          # the ViT copy inside Lance_3B_Video's model.safetensors
# A loader that reads Qwen2.5-VL-ViT/vit.safetensors (bare `patch_embed.*/blocks.*/merger.*` names) in one
# stream with the model file puts this in front of its names (the thinker's second weight source); it is
# the name Qwen2.5-VL checkpoints give their vision tower.
VIT_FILE_PREFIX = "visual."
EMBED_TOKENS_NAME = "language_model.model.embed_tokens.weight"
POSITION_TABLE_NAME = "latent_pos_embed.pos_embed"


@dataclass(frozen=True)
class CheckpointPart:
    name: str
    prefixes: tuple[str, ...]
    holds: str


CHECKPOINT_PARTS: tuple[CheckpointPart, ...] = (
    CheckpointPart("decoder", ("language_model.model.",), "token embeddings, MoT layers, final norms"),
    CheckpointPart("lm_head", ("language_model.lm_head.",), "text logits"),
    CheckpointPart("latent_embedder", ("time_embedder.", "vae2llm."), "latent tokens into the LLM"),
    CheckpointPart("velocity_head", ("llm2vae.",), "hidden states to velocities"),
    # Upstream pops the stored sin-cos table at load and recomputes it; we recompute it too (and may check it).
    CheckpointPart("position_table", (POSITION_TABLE_NAME,), "3-D latent position table"),
    CheckpointPart("bundled_vit", (BUNDLED_VIT_PREFIX,), "the variant's own ViT (Lance_3B_Video)"),
    CheckpointPart("vit_file", (VIT_FILE_PREFIX,), "the standalone ViT, Qwen2.5-VL-ViT/vit.safetensors"),
)
# Where the ViT's weights come from, first present wins: upstream loads a variant's own copy over vit.safetensors.
VIT_SOURCES = ("bundled_vit", "vit_file")


def part_of(name: str) -> str | None:
    """The checkpoint part a tensor name belongs to (None: no part of Lance)."""
    for part in CHECKPOINT_PARTS:
        if name.startswith(part.prefixes):
            return part.name
    return None


# ----------------------------------------------------------------------------------------------------
# 2. Names, renames, shards and shapes
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertTensor:
    """One tensor of one expert in a decoder layer."""

    checkpoint: str              # inside the layer, und-expert spelling (the gen expert: `gen_expert_name`)
    param: str                   # our parameter inside an `Expert`
    shard: str | None            # the rows of a fused parameter it fills (q/k/v, gate/up)
    shape: tuple[str, ...]       # in config terms (`tensor_shape`)
    qk_norm: bool = False        # present only when the expert has qk-norm (upstream's runtime flag)


EXPERT_TENSORS: tuple[ExpertTensor, ...] = (
    ExpertTensor("self_attn.q_proj.weight", "attn.qkv_proj.weight", "q", ("q", "hidden")),
    ExpertTensor("self_attn.q_proj.bias", "attn.qkv_proj.bias", "q", ("q",)),
    ExpertTensor("self_attn.k_proj.weight", "attn.qkv_proj.weight", "k", ("kv", "hidden")),
    ExpertTensor("self_attn.k_proj.bias", "attn.qkv_proj.bias", "k", ("kv",)),
    ExpertTensor("self_attn.v_proj.weight", "attn.qkv_proj.weight", "v", ("kv", "hidden")),
    ExpertTensor("self_attn.v_proj.bias", "attn.qkv_proj.bias", "v", ("kv",)),
    ExpertTensor("self_attn.o_proj.weight", "attn.o_proj.weight", None, ("hidden", "q")),
    ExpertTensor("self_attn.q_norm.weight", "attn.q_norm.weight", None, ("head_dim",), qk_norm=True),
    ExpertTensor("self_attn.k_norm.weight", "attn.k_norm.weight", None, ("head_dim",), qk_norm=True),
    ExpertTensor("mlp.gate_proj.weight", "mlp.gate_up_proj.weight", "gate", ("ffn", "hidden")),
    ExpertTensor("mlp.up_proj.weight", "mlp.gate_up_proj.weight", "up", ("ffn", "hidden")),
    ExpertTensor("mlp.down_proj.weight", "mlp.down_proj.weight", None, ("hidden", "ffn")),
    ExpertTensor("input_layernorm.weight", "input_layernorm.weight", None, ("hidden",)),
    ExpertTensor("post_attention_layernorm.weight", "post_attention_layernorm.weight", None, ("hidden",)),
)


@dataclass(frozen=True)
class TopTensor:
    """A tensor outside the decoder layers."""

    checkpoint: str
    param: str | None            # None: no parameter (the position table is recomputed)
    shape: tuple[str, ...]
    untied_only: bool = False    # absent when the checkpoint ties lm_head to the embeddings


TOP_TENSORS: tuple[TopTensor, ...] = (
    TopTensor(EMBED_TOKENS_NAME, "language_model.embed_tokens.weight", ("vocab", "hidden")),
    TopTensor("language_model.model.norm.weight", "language_model.norm.weight", ("hidden",)),
    TopTensor("language_model.model.norm_moe_gen.weight", "language_model.norm_gen.weight", ("hidden",)),
    TopTensor("language_model.lm_head.weight", "language_model.lm_head.weight", ("vocab", "hidden"), untied_only=True),
    TopTensor("time_embedder.mlp.0.weight", "time_embedder.mlp.0.weight", ("hidden", "timestep_features")),
    TopTensor("time_embedder.mlp.0.bias", "time_embedder.mlp.0.bias", ("hidden",)),
    TopTensor("time_embedder.mlp.2.weight", "time_embedder.mlp.2.weight", ("hidden", "hidden")),
    TopTensor("time_embedder.mlp.2.bias", "time_embedder.mlp.2.bias", ("hidden",)),
    TopTensor("vae2llm.weight", "vae2llm.weight", ("hidden", "latent")),   # latent patch (1, 1, 1): one token a voxel
    TopTensor("vae2llm.bias", "vae2llm.bias", ("hidden",)),
    TopTensor("llm2vae.weight", "llm2vae.weight", ("latent", "hidden")),
    TopTensor("llm2vae.bias", "llm2vae.bias", ("latent",)),
    TopTensor(POSITION_TABLE_NAME, None, ("position_rows", "hidden")),
)

_LAYER_PREFIX = "language_model.model.layers.{layer}."
_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
_GEN = "_moe_gen"


def gen_expert_name(und_name: str) -> str:
    """`self_attn.q_proj.weight` -> `self_attn.q_proj_moe_gen.weight`; `mlp.up_proj.weight` -> `mlp_moe_gen.up_proj.weight`."""
    parts = und_name.split(".")
    if parts[0] == "mlp":
        parts[0] += _GEN
    else:
        parts[-2] += _GEN
    return ".".join(parts)


# name inside a layer (either expert's spelling) -> (tensor, expert)
_IN_LAYER: dict[str, tuple[ExpertTensor, str]] = {
    **{t.checkpoint: (t, "und") for t in EXPERT_TENSORS},
    **{gen_expert_name(t.checkpoint): (t, "gen") for t in EXPERT_TENSORS},
}
_TOP: dict[str, TopTensor] = {t.checkpoint: t for t in TOP_TENSORS}


def tensor_dims(llm: LanceLLMConfig, latent_channels: int, position_rows: int) -> dict[str, int]:
    """The config terms `ExpertTensor.shape` / `TopTensor.shape` are written in."""
    return {"hidden": llm.hidden_size, "head_dim": llm.head_dim, "ffn": llm.intermediate_size,
            "q": llm.num_attention_heads * llm.head_dim, "kv": llm.num_key_value_heads * llm.head_dim,
            "vocab": llm.vocab_size, "latent": latent_channels, "timestep_features": TIMESTEP_FREQ_DIM,
            "position_rows": position_rows}


def checkpoint_tensor_shapes(llm: LanceLLMConfig, latent_channels: int, position_rows: int) -> dict[str, tuple[int, ...]]:
    """Every name and shape of the MoT LLM and its generation connectors, as the checkpoint stores them."""
    dims = tensor_dims(llm, latent_channels, position_rows)

    def shape(t: ExpertTensor | TopTensor) -> tuple[int, ...]:
        return tuple(dims[d] for d in t.shape)

    und = [t for t in EXPERT_TENSORS if llm.qk_norm_und or not t.qk_norm]
    gen = [t for t in EXPERT_TENSORS if llm.qk_norm_gen or not t.qk_norm]
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(llm.num_hidden_layers):
        prefix = _LAYER_PREFIX.format(layer=layer)
        shapes.update({prefix + t.checkpoint: shape(t) for t in und})
        shapes.update({prefix + gen_expert_name(t.checkpoint): shape(t) for t in gen})
    shapes.update({t.checkpoint: shape(t) for t in TOP_TENSORS if not (t.untied_only and llm.tie_word_embeddings)})
    return shapes


@dataclass(frozen=True)
class WeightTarget:
    param: str              # our parameter name, relative to the model (LanceModel's names)
    shard: str | None       # q/k/v or gate/up for fused parameters
    layer: int | None = None
    expert: str | None = None  # "und" | "gen"


def map_checkpoint_name(name: str) -> WeightTarget | None:
    """Where a checkpoint tensor goes, or None if it is no parameter (unknown, or the recomputed table)."""
    if name in _TOP:
        param = _TOP[name].param
        return WeightTarget(param, None) if param is not None else None
    m = _LAYER.match(name)
    if not m or m.group(2) not in _IN_LAYER:
        return None
    layer = int(m.group(1))
    tensor, expert = _IN_LAYER[m.group(2)]
    return WeightTarget(f"language_model.layers.{layer}.{expert}.{tensor.param}", tensor.shard, layer, expert)


# our fused parameter inside an expert -> the checkpoint shards that fill it, in row order
_SHARDS_OF: dict[str, tuple[str, ...]] = {
    fused: tuple(t.shard for t in EXPERT_TENSORS if t.param == fused)
    for fused in dict.fromkeys(t.param for t in EXPERT_TENSORS if t.shard is not None)
}


def fused_shards(param: str) -> tuple[str | None, ...]:
    """The checkpoint shards that together fill one of our parameters ((None,) for an unfused one)."""
    for inner, shards in _SHARDS_OF.items():
        if param.endswith("." + inner):
            return shards
    return (None,)


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


# ----------------------------------------------------------------------------------------------------
# 3. Loading with strict accounting
# ----------------------------------------------------------------------------------------------------
class WeightsLoadError(ValueError):
    """Checkpoint tensors and a model's parameters do not match one to one."""


class WeightsLoader:
    """Routes (name, tensor) pairs to one model by the tables above and accounts for every one.

    `parameters`: the model's parameter names (our names); `fill(target, tensor)` copies one tensor into
    its (shard of a) parameter. `skip_parts`: parts the model leaves out on purpose (the DiT has no
    lm_head). `part_loaders`: parts the model takes its own way, `fn(name, tensor)` (the thinker's ViT,
    the model core's position-table check). Everything else is copied, or is unexpected.
    """

    def __init__(self, parameters: Iterable[str], fill: Callable[[WeightTarget, object], None], *,
                 skip_parts: Iterable[str] = (), part_loaders: Mapping[str, Callable[[str, object], None]] | None = None):
        known = {p.name for p in CHECKPOINT_PARTS}
        self.skip_parts = frozenset(skip_parts)
        self.part_loaders = dict(part_loaders or {})
        for name in self.skip_parts | set(self.part_loaders):
            if name not in known:
                raise ValueError(f"unknown checkpoint part {name!r} (known: {', '.join(sorted(known))})")
        self.parameters = set(parameters)
        self.fill = fill
        self.loaded: set[str] = set()
        self.skipped: set[str] = set()
        self.unexpected: set[str] = set()
        self.filled: set[tuple[str, str | None]] = set()

    def load(self, tensors: Iterable[tuple[str, object]]) -> "WeightsLoader":
        """`tensors`: (name, tensor), or (name, a function that reads it): skipped tensors are never read."""
        read = lambda t: t() if callable(t) else t  # noqa: E731
        for name, tensor in tensors:
            part = part_of(name)
            if part in self.skip_parts:
                self.skipped.add(name)
            elif part in self.part_loaders:
                self.part_loaders[part](name, read(tensor))
                self.loaded.add(name)
            else:
                target = map_checkpoint_name(name) if part is not None else None
                if target is None or target.param not in self.parameters:
                    self.unexpected.add(name)
                    continue
                self.fill(target, read(tensor))
                self.loaded.add(name)
                self.filled.add((target.param, target.shard))
        return self

    def missing(self, parameters: Iterable[str] | None = None) -> list[str]:
        """Parameters (`name[shard]` for a fused one) nothing filled; `parameters` narrows the check."""
        names = self.parameters if parameters is None else parameters
        return [f"{n}[{s}]" if s else n for n in sorted(names) for s in fused_shards(n) if (n, s) not in self.filled]

    def check(self, source: str, parameters: Iterable[str] | None = None) -> None:
        """Raise `WeightsLoadError` unless every parameter was filled and no tensor was unexpected."""
        missing, unexpected = self.missing(parameters), sorted(self.unexpected)
        if missing or unexpected:
            raise WeightsLoadError(f"{source}: {len(missing)} missing parameters {missing[:10]}, "
                                   f"{len(unexpected)} unexpected tensors {unexpected[:10]}")
