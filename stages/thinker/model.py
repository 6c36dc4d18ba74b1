"""Lance as a vLLM model: the Qwen2 Mixture-of-Transformers decoder, the Qwen2.5-VL tower, Lance's positions.

Shape follows vLLM's qwen2.py: Expert (one parameter set: fused q|k|v with qk-norm, o_proj, gate|up MLP,
norms) -> DecoderLayer (an `und` and a `gen` expert sharing one mRoPE and one vLLM `Attention`) ->
LanguageModel -> LanceThinkerForConditionalGeneration (tower, latent embedder, positions, weights).

* Routing: a token goes through the gen expert iff its id is the reserved gen-slot id (reference VAE
  latents of edits, see `multimodal.py`); every other token (text, markers, ViT tokens, generated
  tokens) goes through und. No learned router, as upstream.
* Attention: vLLM's paged causal attention, then the rows of visual blocks are recomputed without a mask
  (`bidirectional.py`), so ViT and reference blocks are bidirectional as upstream's `full` segments.
* Positions: per item, taken verbatim from `stages.lance.sequence` (`get_mrope_input_positions`).
* Logits past the tokenizer's length are masked (upstream does the same before argmax).

Parameter names are `stages.lance.weights`' (one table for every model that loads the checkpoint), so the
real `Lance_3B/model.safetensors` loads directly; the ViT comes from the variant's own copy when it has
one, else from `Qwen2.5-VL-ViT/vit.safetensors`, read as a second weight source.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Callable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal
from vllm.multimodal import MULTIMODAL_REGISTRY

from stages.lance.config import LATENT_CHANNELS
from stages.lance.embeddings import TimestepEmbedder, embed_latent_tokens, latent_pos_embed
from stages.lance.vit import LanceViT, attention_backend
from stages.lance.weights import (BUNDLED_VIT_PREFIX, VIT_FILE_PREFIX, VIT_SOURCES, WeightsLoader, WeightsLoadError,
                                  WeightTarget)

from .bidirectional import BidirectionalSpan, find_bidirectional_spans, refine_bidirectional
from .kv_layout import PagedKVReader, reader_for
from .multimodal import (LanceDummyInputsBuilder, LanceMultiModalProcessor,
                         LanceProcessingInfo, fields_of, lance_token_ids)

log = logging.getLogger(__name__)

# Checkpoint parts the thinker leaves out (stages.lance.weights.CHECKPOINT_PARTS): it never predicts
# velocities (the DiT stage owns llm2vae) and computes latent positions itself.
SKIPPED_PARTS = ("velocity_head", "position_table")
_VIT_PREFIXES = {"bundled_vit": BUNDLED_VIT_PREFIX, "vit_file": VIT_FILE_PREFIX}
# vLLM's shard ids of the fused parameters: q/k/v by name, gate/up by index.
_VLLM_SHARD_IDS = {"q": "q", "k": "k", "v": "v", "gate": 0, "up": 1}


class Routing:
    """Which of a step's tokens go through the gen expert (`gen is None`: all und)."""

    def __init__(self, gen_mask: torch.Tensor):
        if bool(gen_mask.any()):
            self.gen = gen_mask.nonzero().squeeze(1)
            self.und = (~gen_mask).nonzero().squeeze(1)
        else:
            self.gen = self.und = None

    def apply(self, x: torch.Tensor, und_fn: Callable, gen_fn: Callable) -> torch.Tensor:
        if self.gen is None:
            return und_fn(x)
        y_und, y_gen = und_fn(x[self.und]), gen_fn(x[self.gen])
        out = y_und.new_empty((x.shape[0],) + y_und.shape[1:])
        out[self.und], out[self.gen] = y_und, y_gen
        return out


class ExpertAttention(nn.Module):
    """One expert's attention projections: fused q|k|v (with bias), per-head qk-norm, o_proj."""

    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.num_heads, self.num_kv_heads = heads // tp, max(1, kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads, bias=True,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def qkv(self, h: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, q|k|v] with q and k normalized per head (RoPE comes after, shared)."""
        qkv, _ = self.qkv_proj(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        d = self.head_dim
        q = self.q_norm(q.reshape(-1, d)).view(q.shape)
        k = self.k_norm(k.reshape(-1, d)).view(k.shape)
        return torch.cat([q, k, v], dim=-1)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(o)[0]


class ExpertMLP(nn.Module):
    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)[0]))[0]


class Expert(nn.Module):
    """One expert's parameters within a decoder layer (und: text/markers/ViT; gen: VAE latents)."""

    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = ExpertAttention(config, quant_config, f"{prefix}.attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = ExpertMLP(config, quant_config, f"{prefix}.mlp")


class MoTDecoderLayer(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix: str):
        super().__init__()
        self.und = Expert(config, quant_config, f"{prefix}.und")
        self.gen = Expert(config, quant_config, f"{prefix}.gen")
        proj = self.und.attn
        self.num_heads, self.head_dim = proj.num_heads, proj.head_dim
        self.q_size, self.kv_size = proj.q_size, proj.kv_size
        rope = dict(config.rope_parameters)
        rope.setdefault("rope_type", "default")
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings, rope_parameters=rope,
                                   mrope_positions_factor=1)
        self.attn = Attention(proj.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=proj.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")
        self._reader: PagedKVReader | None = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, routing: Routing,
                spans: list[BidirectionalSpan]) -> torch.Tensor:
        und, gen = self.und, self.gen
        h = routing.apply(x, und.input_layernorm, gen.input_layernorm)
        qkv = routing.apply(h, und.attn.qkv, gen.attn.qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v)
        if spans:
            o = self._refine_bidirectional(o, q, spans)
        x = x + routing.apply(o, und.attn.out, gen.attn.out)
        h = routing.apply(x, und.post_attention_layernorm, gen.post_attention_layernorm)
        return x + routing.apply(h, und.mlp, gen.mlp)

    def _refine_bidirectional(self, o: torch.Tensor, q: torch.Tensor, spans: list[BidirectionalSpan]) -> torch.Tensor:
        meta = _layer_metadata(self.attn.layer_name)
        kv_cache = self.attn.kv_cache
        if self._reader is None:
            self._reader = reader_for(self.attn.attn_backend.get_name(), head_dim=self.head_dim,
                                      block_size=kv_cache.shape[2], dtype=kv_cache.dtype,
                                      isa=getattr(self.attn, "isa", None))
        return refine_bidirectional(o, q, kv_cache, meta.block_table, spans, self._reader, self.num_heads,
                                    self.head_dim, self.attn.impl.scale)


def _layer_metadata(layer_name: str):
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):
        meta = meta[0]
    return meta[layer_name] if isinstance(meta, dict) else meta


class MoTLanguageModel(nn.Module):
    """Embeddings, MoT layers, per-expert final norms and the (untied) lm_head."""

    def __init__(self, config, cache_config, quant_config, prefix: str):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(MoTDecoderLayer(config, cache_config, quant_config, f"{prefix}.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_gen = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                      prefix=f"{prefix}.lm_head")

    def forward(self, x: torch.Tensor, positions: torch.Tensor, routing: Routing,
                spans: list[BidirectionalSpan]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(positions, x, routing, spans)
        return routing.apply(x, self.norm, self.norm_gen)


@MULTIMODAL_REGISTRY.register_processor(LanceMultiModalProcessor, info=LanceProcessingInfo,
                                        dummy_inputs=LanceDummyInputsBuilder)
class LanceThinkerForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE):
    # The routing and the visual-block spans are read from the token ids.
    requires_raw_input_tokens = True

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None  # prompts are built by stages.thinker.inputs, never from chat templates

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        text = config.get_text_config()
        self.config, self.text_config = config, text
        self.token_ids = lance_token_ids(config)
        quant = vllm_config.quant_config
        cache = vllm_config.cache_config
        self.visual = _build_vision_tower(config.vision_config, vllm_config.device_config.device)
        self.language_model = MoTLanguageModel(text, cache, quant, "language_model")
        self.time_embedder = TimestepEmbedder(text.hidden_size)
        self.vae2llm = nn.Linear(LATENT_CHANNELS, text.hidden_size)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        vit_dir = config.lance.get("vit_dir")
        # vLLM reads these after the model's own folder (Lance_3B/): the ViT lives beside it.
        self.secondary_weights = [DefaultModelLoader.Source(vit_dir, None, prefix=VIT_FILE_PREFIX,
                                                            allow_patterns_overrides=["vit.safetensors"])] if vit_dir else []

    # --- embeddings ----------------------------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.language_model.embed_tokens(input_ids)
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            mm = torch.cat(list(multimodal_embeddings)).to(embeds.dtype)
            embeds = embeds.clone()
            embeds[is_multimodal] = mm
        return embeds

    def embed_multimodal(self, **kwargs) -> list[torch.Tensor]:
        if "vit_pixel_values" in kwargs:
            return self._embed_vit(kwargs["vit_pixel_values"], kwargs["vit_grid_thw"])
        if "latent_tokens" in kwargs:
            return self._embed_latents(kwargs["latent_tokens"], kwargs["latent_grid"])
        if "anchor_token_id" in kwargs:
            ids = torch.cat([torch.as_tensor(t).reshape(-1) for t in kwargs["anchor_token_id"]])
            return list(self.language_model.embed_tokens(ids.to(self._device)).unsqueeze(1))
        return []

    @property
    def _device(self) -> torch.device:
        return self.vae2llm.weight.device

    def _embed_vit(self, pixels: torch.Tensor, grids) -> list[torch.Tensor]:
        grids = torch.stack([torch.as_tensor(g).reshape(3) for g in grids])
        features = self.visual(pixels.to(self._device), grids)
        merge = self.config.vision_config.spatial_merge_size ** 2
        return list(features.split((grids.prod(-1) // merge).tolist()))

    def _embed_latents(self, latents, grids) -> list[torch.Tensor]:
        """Reference latents at t = 0: vae2llm(x) + time_embedder(0) + latent_pos_embed (ids restart per block)."""
        dtype = self.vae2llm.weight.dtype
        t0 = self.time_embedder(torch.zeros(1, device=self._device)).to(dtype)
        out = []
        for x, grid in zip(latents, grids):
            grid = tuple(torch.as_tensor(grid).reshape(3).tolist())
            pos = latent_pos_embed(self.text_config.hidden_size, grid).to(self._device, dtype)
            out.append(embed_latent_tokens(self.vae2llm, x.to(self._device, dtype), t0, pos))
        return out

    # --- positions -----------------------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Items carry their own positions and the next one; text between items counts up from there."""
        positions = torch.empty(3, len(input_tokens), dtype=torch.long)
        at, next_pos = 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            f = fields_of(feature.modality)
            start, length = feature.mm_position.offset, feature.mm_position.length
            positions[:, at:start] = torch.arange(next_pos, next_pos + start - at)
            item_pos = feature.data[f.positions].data
            if item_pos.shape != (3, length):
                raise ValueError(f"{feature.modality} item positions {list(item_pos.shape)} != placeholder [3, {length}]")
            positions[:, start:start + length] = item_pos
            at, next_pos = start + length, int(feature.data[f.next_position].data)
        positions[:, at:] = torch.arange(next_pos, next_pos + len(input_tokens) - at)
        # vLLM places decoded token i at position i + delta: continue the text after the last item
        delta = next_pos - at
        return positions, delta

    # --- forward -------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        ids = input_ids[: inputs_embeds.shape[0]]
        routing = Routing(ids == self.token_ids.gen_pad)
        spans = self._bidirectional_spans(ids)
        return self.language_model(inputs_embeds, positions, routing, spans)

    def _bidirectional_spans(self, ids: torch.Tensor) -> list[BidirectionalSpan]:
        meta = _layer_metadata(self.language_model.layers[0].attn.layer_name)
        if meta is None:  # profiling / warm-up
            return []
        n = int(meta.num_actual_tokens)
        num_reqs = int(meta.seq_lens.shape[0])
        qsl = meta.query_start_loc[: num_reqs + 1].tolist()
        return find_bidirectional_spans(ids[:n], qsl, meta.seq_lens[:num_reqs].tolist(),
                                        self.token_ids.vision_start, self.token_ids.vision_end)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.language_model.lm_head, hidden_states)
        if logits is not None:
            logits[:, self.token_ids.len_tokenizer:] = float("-inf")  # upstream: argmax over len(tokenizer)
        return logits

    # --- weights -------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names -> our parameters (`stages.lance.weights`); every parameter must be filled."""
        params = dict(self.named_parameters())
        vit_sources: dict[str, dict[str, torch.Tensor]] = {source: {} for source in VIT_SOURCES}

        def fill(target: WeightTarget, tensor: torch.Tensor) -> None:
            param = params[target.param]
            load = getattr(param, "weight_loader", default_weight_loader)
            if target.shard is None:
                load(param, tensor)
            else:
                load(param, tensor, _VLLM_SHARD_IDS[target.shard])

        def collect_vit(source: str):
            prefix = _VIT_PREFIXES[source]
            return lambda name, tensor: vit_sources[source].__setitem__(name[len(prefix):], tensor)

        language = [n for n in params if not n.startswith("visual.")]
        loader = WeightsLoader(language, fill, skip_parts=SKIPPED_PARTS,
                               part_loaders={source: collect_vit(source) for source in VIT_SOURCES})
        loader.load(weights).check("thinker weights")
        vit_state = next((state for state in vit_sources.values() if state), {})   # first source present wins
        return set(language) | self._load_vision_tower(vit_state)

    def _load_vision_tower(self, state: dict[str, torch.Tensor]) -> set[str]:
        model = self.visual.model
        expected = dict(model.state_dict())
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise WeightsLoadError(f"ViT weights do not match the tower: missing {missing[:10]}, unexpected {extra[:10]}")
        for name, tensor in state.items():
            expected[name].copy_(tensor)
        return {f"visual.model.{n}" for n, _ in model.named_parameters()}


def _build_vision_tower(vision_config, device) -> LanceViT:
    """The stock Qwen2.5-VL vision tower (the model core's LanceViT), weights filled by `load_weights`.

    vLLM's own Qwen2.5-VL tower would be the natural pick, but its module imports transformers' Qwen2-VL
    image processor, which needs torchvision, which this project's CPU environment cannot carry (builds that
    do not match the CPU torch break transformers); the model core's tower is the same network.
    """
    from transformers.initialization import no_init_weights
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    attn = attention_backend(getattr(vision_config, "_attn_implementation", None), device)
    with no_init_weights():
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config, attn_implementation=attn)
    return LanceViT(tower.to(torch.get_default_dtype()))
