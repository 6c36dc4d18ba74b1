"""Bidirectional visual blocks inside a causal vLLM prefill (Lance's `full` / `full_noise` segments).

Lance's contexts are causal text plus visual blocks (`<|vision_start|> ... <|vision_end|>`: the ViT
block, the reference VAE block) in which every token sees the whole block. vLLM's CPU attention can only
be causal or not per request, so each layer runs vLLM's causal kernel for all tokens (which also writes
the step's K/V into the paged cache) and then recomputes the rows of visual-block tokens exactly: their
queries attend, without a mask, to the request's keys up to the block's end, read back from the cache.
Text rows are untouched; decode steps have no spans and cost nothing extra.

Spans are found from the step's token ids, so this works whatever the backend or batch: a block is the
run from a `<|vision_start|>` to its `<|vision_end|>`; a step that starts inside a block (its first
marker is a `<|vision_end|>`, the block's head came from the prefix cache) refines from the step's first
token. A block's keys are [0, end], so its start does not matter. The scheduler must never end a step
inside a block (`disable_chunked_mm_input`, placeholders covering the whole block); a violation raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_layout import PagedKVReader


@dataclass(frozen=True)
class BidirectionalSpan:
    """Rows [start, stop) of the step's flattened tokens that attend to keys [0, num_keys) of one request."""

    start: int
    stop: int
    request: int   # row of the block table
    num_keys: int


def find_bidirectional_spans(input_ids: torch.Tensor, query_start_loc: list[int], seq_lens: list[int],
                             vision_start: int, vision_end: int) -> list[BidirectionalSpan]:
    """Visual-block spans of every request scheduled in this step (see the module docstring)."""
    spans: list[BidirectionalSpan] = []
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    for r in range(len(seq_lens)):
        a, b = query_start_loc[r], query_start_loc[r + 1]
        if b - a <= 1:  # decode, or one token: causal and bidirectional are the same
            continue
        first_pos = seq_lens[r] - (b - a)  # position of row a within its request
        open_at: int | None = None
        seen_marker = False
        for i in range(a, b):
            tok = ids[i]
            if tok == vision_start:
                open_at, seen_marker = i, True
            elif tok == vision_end:
                start = open_at if open_at is not None else (a if not seen_marker else None)
                seen_marker = True
                if start is not None and i > start:
                    spans.append(BidirectionalSpan(start, i + 1, r, first_pos + (i - a) + 1))
                open_at = None
        if open_at is not None and b - open_at > 1:
            raise RuntimeError("a visual block was split across scheduler steps; the thinker needs "
                               "disable_chunked_mm_input and placeholders that cover whole blocks")
    return spans


def refine_bidirectional(output: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                         block_table: torch.Tensor, spans: list[BidirectionalSpan], reader: PagedKVReader,
                         num_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """Overwrite the span rows of `output` [T, Hq*d] with unmasked attention over their request's keys."""
    for span in spans:
        q = query[span.start:span.stop].view(-1, num_heads, head_dim).transpose(0, 1)       # [Hq, n, d]
        k, v = reader.gather(kv_cache, block_table[span.request], span.num_keys)            # [L, Hkv, d]
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k.transpose(0, 1).unsqueeze(0).to(q.dtype),
                                           v.transpose(0, 1).unsqueeze(0).to(q.dtype), scale=scale,
                                           enable_gqa=True)                                   # [1, Hq, n, d]
        output[span.start:span.stop] = o[0].transpose(0, 1).reshape(span.stop - span.start, -1).to(output.dtype)
    return output
