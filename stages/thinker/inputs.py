"""vLLM prompts for Lance's contexts: a segmented sequence and its positions -> compact ids + item data.

The sequence, its segments and its positions all come from `stages.lance.sequence` (never recomputed
here). Each visual segment becomes an item that carries its block's positions; a text token whose
position is not the one counting up from its predecessor (the text-uncond branch's tokens after the
removed caption) becomes an anchor item that carries its position. See `multimodal.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.lance.sequence import LanceSequence

from .engine_config import LanceTokenIds
from .multimodal import ANCHOR, LATENT, VIT, compact_placeholder, fields_of


@dataclass
class VisualInputs:
    """What the vLLM model embeds itself: ViT pixel patches (merge-window order) and reference latents."""

    vit_patches: torch.Tensor | None = None     # [N, 3*tp*p*p]
    vit_patch_grid: tuple[int, int, int] | None = None  # (t, h, w) in patches
    ref_latents: torch.Tensor | None = None     # [t*h*w, 48] token-major, posterior-sampled
    latent_grid: tuple[int, int, int] | None = None


def vllm_prompt(seq: LanceSequence, positions: torch.Tensor, ids: LanceTokenIds, visuals: VisualInputs) -> dict:
    """A vLLM TokensPrompt (`prompt_token_ids`, `multi_modal_data`) for `seq` prefilled at `positions` [3, L]."""
    if positions.shape != (3, seq.input_ids.numel()):
        raise ValueError(f"positions {list(positions.shape)} do not cover the {seq.input_ids.numel()} tokens")
    positions = positions.long().cpu()
    tokens = seq.input_ids.tolist()
    compact: list[int] = []
    items: dict[str, list[dict]] = {}
    expected = 0  # position the next plain text token must have
    for i, seg in enumerate(seq.segments):
        span = seq.span(i)
        if seg.kind == "text":
            for j in range(span.start, span.stop):
                p = positions[:, j]
                if not bool((p == p[0]).all()):
                    raise ValueError(f"text token {j} has unequal mRoPE axes {p.tolist()}")
                if int(p[0]) != expected:
                    items.setdefault(ANCHOR, []).append({
                        "anchor_token_id": torch.tensor([tokens[j]]), "anchor_positions": p.view(3, 1).clone(),
                        "anchor_next_position": torch.tensor(int(p[0]) + 1)})
                    compact += compact_placeholder(ANCHOR, ids)
                else:
                    compact.append(tokens[j])
                expected = int(p[0]) + 1
            continue
        block_pos = positions[:, span].clone()
        # The next text position follows the end marker's h/w axes (the ViT t-axis shift never moves them).
        expected = int(block_pos[1:, -1].max()) + 1
        if seg.kind == "vit":
            if visuals.vit_patches is None:
                raise ValueError("the sequence has a ViT block but no ViT patches were given")
            modality = VIT
            data = {"vit_pixel_values": visuals.vit_patches, "vit_grid_thw": torch.tensor(visuals.vit_patch_grid)}
        elif seg.kind == "vae_ref":
            if visuals.ref_latents is None:
                raise ValueError("the sequence has a reference VAE block but no reference latents were given")
            modality = LATENT
            data = {"latent_tokens": visuals.ref_latents, "latent_grid": torch.tensor(visuals.latent_grid)}
        else:
            raise ValueError(f"a {seg.kind!r} segment cannot be part of a thinker prompt")
        f = fields_of(modality)
        items.setdefault(modality, []).append({**data, f.positions: block_pos, f.next_position: torch.tensor(expected)})
        compact += compact_placeholder(modality, ids)
    prompt: dict = {"prompt_token_ids": compact}
    if items:
        prompt["multi_modal_data"] = items
    return prompt


def expanded_length(seq: LanceSequence) -> int:
    """Tokens the engine will hold for `seq` (the processor expands blocks back to their full length)."""
    return seq.input_ids.numel()
