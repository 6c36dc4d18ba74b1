"""Prefill of a branch's context into a KV cache, segment by segment, as upstream's KV-cache path does.

Text segments run causally through the und expert; a ViT block runs bidirectionally (und); a reference
VAE block runs bidirectionally with its markers through und and its latents through gen at t = 0.
The vLLM thinker computes the same caches; this is the reference it is checked against.
"""
from __future__ import annotations

import torch

from .model import LanceModel
from .sequence import BranchPlan
from .transformer import KVCache


def segment_embeds(model: LanceModel, ids: torch.Tensor, kind: str, grid, vit_features=None, ref_latents=None):
    """Input embeddings [1, n, hidden] and gen mask [1, n] (or None) of one context segment."""
    embeds = model.embed_tokens(ids)
    if kind == "text":
        return embeds[None], None
    if kind == "vit":
        body = vit_features.to(embeds.dtype)
        gen_mask = None
    elif kind == "vae_ref":
        zero = torch.zeros((), device=ids.device, dtype=embeds.dtype)
        body = model.embed_latents(ref_latents.to(embeds.dtype), zero, grid)
        gen_mask = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        gen_mask[0] = gen_mask[-1] = False
        gen_mask = gen_mask[None]
    else:
        raise ValueError(f"segment kind {kind!r} is not part of a context")
    if body.shape[0] != len(ids) - 2:
        raise ValueError(f"{kind} block has {len(ids) - 2} slots but {body.shape[0]} embeddings")
    return torch.cat([embeds[:1], body, embeds[-1:]])[None], gen_mask


@torch.no_grad()
def prefill_context(model: LanceModel, plan: BranchPlan, vit_features: torch.Tensor | None = None,
                    ref_latents: torch.Tensor | None = None, extra_capacity: int = 0) -> KVCache:
    """Prefill every segment of `plan.context` with its positions; returns the branch's cache, with room
    for `extra_capacity` more tokens (decoding)."""
    seq, device = plan.context, model.vae2llm.weight.device
    cache = KVCache(capacity=seq.input_ids.numel() + extra_capacity)
    for i, seg in enumerate(seq.segments):
        span = seq.span(i)
        ids = seq.input_ids[span].to(device)
        embeds, gen_mask = segment_embeds(model, ids, seg.kind, seg.grid, vit_features, ref_latents)
        model.language_model(embeds, plan.context_positions[:, span].to(device), gen_mask=gen_mask,
                             cache=cache, causal=seg.attn == "causal", update_cache=True)
    return cache
