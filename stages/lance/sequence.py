"""Token sequences, segments and 3-axis mRoPE positions of Lance's tasks (lance_spec.md §2.2, §2.3).

One definition for the offline pipeline, the vLLM thinker and the DiT stage. A sequence is a list of
segments (text, ViT block, reference VAE block, target block), each with its attention mode; positions
follow Qwen2.5-VL `get_rope_index`, then (generation only) upstream's `shift_position_ids`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .config import SpecialTokens
from .prompts import ASSISTANT_HEADER, VISUAL_ITEM, Part, Visual, render_chat

VIT_T_ANCHOR = 1000  # generation tasks move the ViT block's t axis to start here (pro_type 10)

SegmentKind = Literal["text", "vit", "vae_ref", "target"]
_ATTN = {"text": "causal", "vit": "full", "vae_ref": "full", "target": "noise"}
# Upstream's per-token modality codes (sample_modality): -1 template text, 0 caption, 1 target,
# 2 reference VAE block, 4 ViT block.
_MODALITY = {"text": -1, "vit": 4, "vae_ref": 2, "target": 1}


@dataclass(frozen=True)
class Segment:
    kind: SegmentKind
    length: int
    grid: tuple[int, int, int] | None = None  # (T, H, W) LLM grid of a visual block's body
    is_caption: bool = False                  # modality 0: dropped by the text-uncond CFG branch

    @property
    def attn(self) -> str:
        return _ATTN[self.kind]

    @property
    def modality(self) -> int:
        return 0 if self.is_caption else _MODALITY[self.kind]


@dataclass
class LanceSequence:
    input_ids: torch.Tensor  # [L] int64, placeholder ids in visual slots
    segments: list[Segment]

    def __post_init__(self):
        assert sum(s.length for s in self.segments) == len(self.input_ids)

    @property
    def starts(self) -> list[int]:
        out, at = [], 0
        for s in self.segments:
            out.append(at)
            at += s.length
        return out

    @property
    def modality(self) -> torch.Tensor:
        return torch.cat([torch.full((s.length,), s.modality, dtype=torch.long) for s in self.segments])

    def index_of(self, kind: SegmentKind) -> int:
        return next(i for i, s in enumerate(self.segments) if s.kind == kind)

    def span(self, i: int) -> slice:
        start = self.starts[i]
        return slice(start, start + self.segments[i].length)

    def without_caption(self) -> "LanceSequence":
        keep = [i for i, s in enumerate(self.segments) if not s.is_caption]
        ids = torch.cat([self.input_ids[self.span(i)] for i in keep])
        return LanceSequence(ids, [self.segments[i] for i in keep])

    def head(self, n: int) -> "LanceSequence":
        """The first n tokens (segments cut at n)."""
        segs, at = [], 0
        for s in self.segments:
            if at >= n:
                break
            take = min(s.length, n - at)
            segs.append(s if take == s.length else Segment(s.kind, take, s.grid, s.is_caption))
            at += take
        return LanceSequence(self.input_ids[:n], segs)

    def kept_token_index(self) -> torch.Tensor:
        """Token indexes of `without_caption()` within this sequence."""
        return torch.cat([torch.arange(self.span(i).start, self.span(i).stop)
                          for i, s in enumerate(self.segments) if not s.is_caption])


# ----------------------------------------------------------------------------------------------
# Building sequences from text


def visual_block_length(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w + 2


def _tokenize_expanded(tokenizer, text: str, tokens: SpecialTokens, grids: Sequence[tuple[int, int, int]]):
    """Tokenize `text` once and expand each visual placeholder to its grid's number of slots."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out, spans, g = [], [], iter(grids)
    i = 0
    while i < len(ids):
        if ids[i] == tokens.vision_start and i + 2 < len(ids) and ids[i + 2] == tokens.vision_end:
            grid = next(g)
            spans.append((len(out), visual_block_length(grid), grid))
            out += [tokens.vision_start] + [tokens.visual_pad] * (visual_block_length(grid) - 2) + [tokens.vision_end]
            i += 3
        else:
            out.append(ids[i])
            i += 1
    return out, spans


def _find(haystack: list[int], needle: list[int]) -> int:
    """First index of `needle` in `haystack` (upstream's caption search), -1 if absent."""
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i:i + n] == needle:
            return i
    return -1


def _segments(n_tokens: int, spans, caption: tuple[int, int] | None, kinds: Sequence[SegmentKind]) -> list[Segment]:
    """Cut [0, n_tokens) into text segments around the visual spans and the caption range."""
    cuts = []  # (start, length, segment)
    for (start, length, grid), kind in zip(spans, kinds):
        cuts.append((start, length, Segment(kind, length, grid)))
    if caption is not None and caption[1] > 0:
        cuts.append((caption[0], caption[1], Segment("text", caption[1], is_caption=True)))
    cuts.sort(key=lambda c: c[0])
    segs, at = [], 0
    for start, length, seg in cuts:
        if start > at:
            segs.append(Segment("text", start - at))
        segs.append(seg)
        at = start + length
    if at < n_tokens:
        segs.append(Segment("text", n_tokens - at))
    return segs


def build_generation_sequence(
    tokenizer, tokens: SpecialTokens, system: str, caption: str,
    context_visuals: Sequence[tuple[SegmentKind, tuple[int, int, int]]], target_grid: tuple[int, int, int],
) -> LanceSequence:
    """t2i / t2v / edits: system, user [visuals..., caption], assistant [target] (upstream layout).

    The caption is located by searching its own tokens in the whole sequence, as upstream does.
    """
    user: list[Part] = [Visual(k) for k, _ in context_visuals] + [caption]
    text = render_chat(system, [("user", user)]) + ASSISTANT_HEADER + VISUAL_ITEM + "<|im_end|>"
    grids = [g for _, g in context_visuals] + [target_grid]
    kinds = [k for k, _ in context_visuals] + ["target"]
    ids, spans = _tokenize_expanded(tokenizer, text, tokens, grids)
    cap_ids = tokenizer(caption, add_special_tokens=False)["input_ids"] if caption else []
    at = _find(ids, cap_ids) if cap_ids else -1
    if cap_ids and at < 0:
        # Token boundaries merged the caption with its neighbours (upstream fails here): tokenize the
        # caption on its own so the text-uncond branch can still drop exactly it.
        head = render_chat(system, [("user", [Visual(k) for k, _ in context_visuals])]).removesuffix("<|im_end|>\n")
        tail = "<|im_end|>\n" + ASSISTANT_HEADER + VISUAL_ITEM + "<|im_end|>"
        head_ids, head_spans = _tokenize_expanded(tokenizer, head, tokens, grids[:-1])
        tail_ids, tail_spans = _tokenize_expanded(tokenizer, tail, tokens, grids[-1:])
        at = len(head_ids)
        off = at + len(cap_ids)
        ids = head_ids + cap_ids + tail_ids
        spans = head_spans + [(s + off, n, g) for s, n, g in tail_spans]
    caption_range = (at, len(cap_ids)) if cap_ids else None
    return LanceSequence(torch.tensor(ids, dtype=torch.long), _segments(len(ids), spans, caption_range, kinds))


def build_understanding_sequence(
    tokenizer, tokens: SpecialTokens, system: str, turns: Sequence[tuple[str, Sequence[Part]]],
    vit_grids: Sequence[tuple[int, int, int]] = (),
) -> LanceSequence:
    """x2t / chat prompt up to and including `<|im_start|>assistant\\n` (the generation prompt)."""
    text = render_chat(system, turns) + ASSISTANT_HEADER
    ids, spans = _tokenize_expanded(tokenizer, text, tokens, vit_grids)
    return LanceSequence(torch.tensor(ids, dtype=torch.long), _segments(len(ids), spans, None, ["vit"] * len(spans)))


# ----------------------------------------------------------------------------------------------
# Positions


def mrope_positions(seq: LanceSequence, tokens_per_second: float = 2.0) -> torch.Tensor:
    """Qwen2.5-VL `get_rope_index` over a segmented sequence: [3, L] (t, h, w).

    Text tokens get (p, p, p); a visual block at marker position P gets body (P+1+tps*t, P+1+h, P+1+w)
    (one second per temporal grid step) and its end marker the next free position.
    """
    cols, p = [], 0
    for seg in seq.segments:
        if seg.grid is None:
            cols.append(torch.arange(p, p + seg.length).expand(3, -1))
            p += seg.length
            continue
        t, h, w = seg.grid
        tt = (torch.arange(t) * tokens_per_second).long().view(t, 1, 1).expand(t, h, w)
        hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
        ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
        body = torch.stack([tt, hh, ww]).reshape(3, -1) + p + 1
        end = int(body.max()) + 1  # the end marker takes the position after the body's largest one
        cols += [torch.full((3, 1), p), body, torch.full((3, 1), end)]
        p = end + 1
    return torch.cat(cols, dim=1).long()


def shift_generation_positions(pos: torch.Tensor, seq: LanceSequence) -> torch.Tensor:
    """Upstream `shift_position_ids(pro_type=10)`: ViT t axis to 1000; target reuses reference positions."""
    pos = pos.clone()
    mod = seq.modality
    vit = mod == 4
    if vit.any():
        pos[0, vit] += VIT_T_ANCHOR - pos[0, vit][0]
    target, ref = mod == 1, mod == 2
    if target.any() and int(target.sum()) == int(ref.sum()):
        pos[:, target] = pos[:, ref]
    return pos


@dataclass
class BranchPlan:
    """One CFG branch: the context segments to prefill with their positions, and the target query's."""

    context: LanceSequence
    context_positions: torch.Tensor  # [3, L_ctx]
    query_positions: torch.Tensor    # [3, target_len + 2]


def plan_generation(cond: LanceSequence, negative: LanceSequence | None = None,
                    tokens_per_second: float = 2.0) -> tuple[BranchPlan, BranchPlan]:
    """Cond and text-uncond branch plans of a generation sequence (upstream KV-cache path).

    Default uncond = the context without the caption. Upstream quirk kept (goldens): its cache is
    prefilled with the *cond* positions of the kept tokens; only its target query uses positions
    recomputed on the caption-free sequence. With a `negative` sequence (negative prompt in place of
    the caption) that branch is a sequence of its own with its own positions.
    """
    def split(seq: LanceSequence, pos: torch.Tensor) -> BranchPlan:
        ti = seq.index_of("target")
        ctx = LanceSequence(seq.input_ids[:seq.starts[ti]], seq.segments[:ti])
        return BranchPlan(ctx, pos[:, :seq.starts[ti]], pos[:, seq.span(ti)])

    cond_pos = shift_generation_positions(mrope_positions(cond, tokens_per_second), cond)
    cond_plan = split(cond, cond_pos)
    if negative is not None:
        neg_pos = shift_generation_positions(mrope_positions(negative, tokens_per_second), negative)
        return cond_plan, split(negative, neg_pos)
    uncond = cond.without_caption()
    uncond_pos = shift_generation_positions(mrope_positions(uncond, tokens_per_second), uncond)
    uncond_plan = split(uncond, uncond_pos)
    kept_cond_pos = cond_pos[:, cond.kept_token_index()]
    uncond_plan.context_positions = kept_cond_pos[:, :uncond_plan.context.input_ids.numel()]
    return cond_plan, uncond_plan


def plan_generation_request(tokenizer, tokens: SpecialTokens, system: str, prompt: str,
                            context_visuals: Sequence[tuple[SegmentKind, tuple[int, int, int]]],
                            target_grid: tuple[int, int, int], negative_prompt: str | None = None,
                            tokens_per_second: float = 2.0) -> tuple[BranchPlan, BranchPlan]:
    """Both branch plans of one generation request (the thinker and the offline pipeline build alike)."""
    def build(caption: str) -> LanceSequence:
        return build_generation_sequence(tokenizer, tokens, system, caption, context_visuals, target_grid)

    negative = build(negative_prompt) if negative_prompt is not None else None
    return plan_generation(build(prompt), negative, tokens_per_second)
