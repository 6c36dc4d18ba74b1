"""Lance's Qwen2 Mixture-of-Transformers decoder in plain PyTorch (lance_spec.md §2.1).

Every layer holds two experts with identical shapes: `und` (text, markers, ViT tokens) and `gen` (VAE
latent tokens). Routing is by token index, never learned; both experts' tokens meet in one attention.
Projections are fused (q|k|v and gate|up) as in vLLM and gpt-fast; `stages.lance.weights` maps the
checkpoint's separate tensors onto them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanceLLMConfig


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: variance in fp32, weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class ExpertAttention(nn.Module):
    """One expert's attention projections: fused q|k|v (with bias), per-head qk-norm, o_proj."""

    def __init__(self, cfg: LanceLLMConfig):
        super().__init__()
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=True)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.head_dim = cfg.head_dim

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, hidden] -> q [T, Hq, d], k [T, Hkv, d] (normed, no RoPE yet), v [T, Hkv, d]."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        d = self.head_dim
        return self.q_norm(q.unflatten(-1, (-1, d))), self.k_norm(k.unflatten(-1, (-1, d))), v.unflatten(-1, (-1, d))


class ExpertMLP(nn.Module):
    def __init__(self, cfg: LanceLLMConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Expert(nn.Module):
    """One expert's parameters within a decoder layer."""

    def __init__(self, cfg: LanceLLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = ExpertAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = ExpertMLP(cfg)


@dataclass
class Routing:
    """Which flattened tokens go through which expert (`gen is None`: all und)."""

    und: torch.Tensor | None = None  # int64 indexes, None = all tokens
    gen: torch.Tensor | None = None

    @classmethod
    def from_mask(cls, gen_mask: torch.Tensor | None) -> "Routing":
        if gen_mask is None or not bool(gen_mask.any()):
            return cls()
        flat = gen_mask.reshape(-1)
        return cls(und=(~flat).nonzero().squeeze(1), gen=flat.nonzero().squeeze(1))

    def apply(self, x: torch.Tensor, und_fn, gen_fn) -> torch.Tensor:
        """Run `und_fn` on und tokens and `gen_fn` on gen tokens of x [T, ...] and reassemble."""
        if self.gen is None:
            return und_fn(x)
        y_und, y_gen = und_fn(x[self.und]), gen_fn(x[self.gen])
        out = y_und.new_empty((x.shape[0],) + y_und.shape[1:])
        out[self.und] = y_und
        out[self.gen] = y_gen
        return out


def mrope_cos_sin(positions: torch.Tensor, cfg: LanceLLMConfig, dtype: torch.dtype):
    """Qwen2.5-VL multimodal RoPE tables for positions [B, 3, N] -> cos, sin [B, N, head_dim]."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d))
    freqs = positions.float().unsqueeze(-1) * inv_freq        # [B, 3, N, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)                   # [B, 3, N, d]
    chunks = emb.split(list(cfg.mrope_section) * 2, dim=-1)   # section j takes axis j % 3
    emb = torch.cat([c[:, j % 3] for j, c in enumerate(chunks)], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, d]; cos/sin [B, N, d] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


class KVCache:
    """Per-layer context K (after qk-norm and RoPE) and V: [B, L, Hkv, d] each.

    Prefill and decoding write each block's K/V into preallocated per-layer buffers (`update`), as
    gpt-fast's `KVCache.update(input_pos, k, v)` does, so a decoded token costs a copy of its own K/V,
    not of the whole cache. Give `capacity` (tokens) when the final length is known; otherwise a buffer
    doubles when it is full. `valid` [B, L] marks real tokens when branches of different lengths are
    padded into one batch.
    """

    def __init__(self, keys: list[torch.Tensor] | None = None, values: list[torch.Tensor] | None = None,
                 valid: torch.Tensor | None = None, capacity: int = 0):
        self._keys = list(keys or [])        # per layer [B, capacity, Hkv, d]; the first _filled[i] rows hold data
        self._values = list(values or [])
        self._filled = [k.shape[1] for k in self._keys]
        self.valid = valid
        self.capacity = capacity

    @property
    def length(self) -> int:
        return self._filled[0] if self._filled else 0

    @property
    def keys(self) -> list[torch.Tensor]:
        return [k[:, :n] for k, n in zip(self._keys, self._filled)]

    @property
    def values(self) -> list[torch.Tensor]:
        return [v[:, :n] for v, n in zip(self._values, self._filled)]

    def layer(self, i: int):
        """Layer i's cached K and V (views), or (None, None) before its first block."""
        if i >= len(self._keys):
            return None, None
        n = self._filled[i]
        return self._keys[i][:, :n], self._values[i][:, :n]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a block's K/V [B, N, Hkv, d] after layer i's cached ones; returns all of layer i's (views)."""
        if i == len(self._keys):
            size = max(self.capacity, k.shape[1])
            self._keys.append(k.new_empty(k.shape[0], size, *k.shape[2:]))
            self._values.append(v.new_empty(v.shape[0], size, *v.shape[2:]))
            self._filled.append(0)
        start = self._filled[i]
        end = start + k.shape[1]
        if end > self._keys[i].shape[1]:
            self._grow(i, max(end, 2 * self._keys[i].shape[1]))
        self._keys[i][:, start:end] = k
        self._values[i][:, start:end] = v
        self._filled[i] = end
        return self._keys[i][:, :end], self._values[i][:, :end]

    def with_block(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's cached K/V followed by a block's own, without storing the block (a read-only query)."""
        past_k, past_v = self.layer(i)
        if past_k is None:
            return k, v
        return torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)

    def _grow(self, i: int, size: int) -> None:
        n = self._filled[i]
        for buffers in (self._keys, self._values):
            old = buffers[i]
            buffers[i] = old.new_empty(old.shape[0], size, *old.shape[2:])
            buffers[i][:, :n] = old[:, :n]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_layers, L, Hkv, d] K and V of batch row 0 (the exported form)."""
        return torch.stack([k[0] for k in self.keys]), torch.stack([v[0] for v in self.values])

    @classmethod
    def from_stacked(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """A cache over exported [num_layers, L, Hkv, d] K/V (views, no copy; a later update copies first)."""
        return cls(keys=[x.unsqueeze(0) for x in k], values=[x.unsqueeze(0) for x in v])


def attention_mask(batch: int, n_query: int, n_past: int, causal: bool, past_valid, query_valid, device):
    """Boolean [B, 1, N, L+N] mask, or None when every query sees every key."""
    if not causal and past_valid is None and query_valid is None:
        return None
    keys = torch.ones(batch, n_query, n_past + n_query, dtype=torch.bool, device=device)
    if causal:  # bottom-right aligned to the cache: query i sees the past and query tokens <= i
        keys[:, :, n_past:] = torch.ones(n_query, n_query, dtype=torch.bool, device=device).tril()
    if past_valid is not None:
        keys[:, :, :n_past] &= past_valid[:, None, :]
    if query_valid is not None:
        keys[:, :, n_past:] &= query_valid[:, None, :]
    return keys.unsqueeze(1)


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LanceLLMConfig):
        super().__init__()
        self.und = Expert(cfg)
        self.gen = Expert(cfg)

    def forward(self, x, routing: Routing, cos, sin, context_kv, mask, batch: int):
        """x [B*N, hidden] -> x'. `context_kv(k, v)` gives the keys and values the block attends to: its
        own, or the cache's followed by its own."""
        h = routing.apply(x, self.und.input_layernorm, self.gen.input_layernorm)
        qkv = routing.apply(h, lambda t: torch.cat([a.flatten(1) for a in self.und.attn.qkv(t)], -1),
                            lambda t: torch.cat([a.flatten(1) for a in self.gen.attn.qkv(t)], -1))
        attn = self.und.attn
        q, k, v = qkv.unflatten(0, (batch, -1)).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        d = attn.head_dim
        q = apply_rope(q.unflatten(-1, (-1, d)), cos, sin)
        k = apply_rope(k.unflatten(-1, (-1, d)), cos, sin)
        v = v.unflatten(-1, (-1, d))
        keys, vals = context_kv(k, v)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=True)
        o = o.transpose(1, 2).flatten(2).flatten(0, 1)           # [B*N, Hq*d]
        x = x + routing.apply(o, self.und.attn.o_proj, self.gen.attn.o_proj)
        h = routing.apply(x, self.und.post_attention_layernorm, self.gen.post_attention_layernorm)
        return x + routing.apply(h, self.und.mlp, self.gen.mlp)


class MoTLanguageModel(nn.Module):
    """Embeddings, the MoT layers, per-expert final norms and the (untied) lm_head."""

    def __init__(self, cfg: LanceLLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, *, gen_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, causal: bool = False, update_cache: bool = False,
                query_valid: torch.Tensor | None = None, layer_outputs: list | None = None) -> torch.Tensor:
        """Run a query block against the cache; returns the final normed hidden [B, N, hidden].

        embeds [B, N, hidden]; positions [B, 3, N] (or [3, N]); gen_mask [B, N] marks gen-expert tokens.
        With `update_cache` the block's K/V are stored after the cache's (prefill, decoding); otherwise
        the cache is only read (the denoising query).
        """
        batch, n = embeds.shape[:2]
        if positions.dim() == 2:
            positions = positions.unsqueeze(0).expand(batch, -1, -1)
        routing = Routing.from_mask(gen_mask)
        cos, sin = mrope_cos_sin(positions, self.cfg, embeds.dtype)
        n_past = cache.length if cache is not None else 0
        mask = attention_mask(batch, n, n_past, causal, cache.valid if cache is not None else None,
                              query_valid, embeds.device)
        x = embeds.flatten(0, 1)
        for i, layer in enumerate(self.layers):
            if cache is None:
                context_kv = lambda k, v: (k, v)  # noqa: E731
            else:
                context_kv = partial(cache.update if update_cache else cache.with_block, i)
            x = layer(x, routing, cos, sin, context_kv, mask, batch)
            if layer_outputs is not None:
                layer_outputs.append(x.view(batch, n, -1))
        x = routing.apply(x, self.norm, self.norm_gen)
        return x.view(batch, n, -1)
