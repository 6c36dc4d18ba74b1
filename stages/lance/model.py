"""`LanceModel`: the MoT language model plus Lance's generation connectors, loaded from the real layout.

Submodules mirror upstream's `class Lance` (language_model, time_embedder, vae2llm, llm2vae); the 3-D
latent position table is computed, not loaded (upstream pops the stored one). A stage loads only what
it needs: `parts=` leaves out lm_head (DiT) or the generation connectors (chat-only thinker).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from .config import LanceConfig
from .embeddings import TimestepEmbedder, latent_pos_embed
from .transformer import MoTLanguageModel
from .weights import RECOMPUTED_TENSORS, map_checkpoint_name, shard_slice

log = logging.getLogger(__name__)


class LanceModel(nn.Module):
    def __init__(self, config: LanceConfig):
        super().__init__()
        llm, latent = config.llm, config.latent
        self.config = config
        self.language_model = MoTLanguageModel(llm)
        self.time_embedder = TimestepEmbedder(llm.hidden_size)
        self.vae2llm = nn.Linear(latent.channels, llm.hidden_size)
        self.llm2vae = nn.Linear(llm.hidden_size, latent.channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._filled: set[tuple[str, str | None]] = set()  # (parameter, shard) that load_weights filled

    # --- embeddings of the two token kinds -------------------------------------------------------

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(ids)

    def latent_positions(self, grid: tuple[int, int, int]) -> torch.Tensor:
        key = (grid, self.vae2llm.weight.device, self.vae2llm.weight.dtype)
        if key not in self._pos_cache:
            rows = latent_pos_embed(self.config.llm.hidden_size, grid)
            self._pos_cache[key] = rows.to(self.vae2llm.weight.device, self.vae2llm.weight.dtype)
        return self._pos_cache[key]

    def embed_latents(self, latents: torch.Tensor, sigma: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """latents [..., thw, 48], sigma scalar or [...] -> vae2llm(x) + time_embedder(sigma) + pos."""
        temb = self.time_embedder(sigma.reshape(-1)).to(latents.dtype)  # [B or 1, hidden]
        temb = temb.view(*sigma.shape, 1, -1) if sigma.dim() else temb
        return self.vae2llm(latents) + temb + self.latent_positions(grid)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm2vae(hidden)

    # --- loading ----------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[set[str], set[str]]:
        """Copy checkpoint tensors into our (fused) parameters.

        Returns (loaded checkpoint names, names with no home here); the caller decides which of the
        latter are expected. Every parameter must be filled: see `missing_parameters`.
        """
        params = dict(self.named_parameters())
        llm = self.config.llm
        q, kv = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
        loaded, unused, self._filled = set(), set(), set()
        for name, tensor in tensors:
            if name in RECOMPUTED_TENSORS:
                self._check_position_table(tensor)
                loaded.add(name)
                continue
            target = map_checkpoint_name(name)
            if target is None or target.param not in params:
                unused.add(name)
                continue
            dst = params[target.param].data[shard_slice(target.shard, q, kv, llm.intermediate_size)]
            if dst.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(name)
            self._filled.add((target.param, target.shard))
        return loaded, unused

    def missing_parameters(self) -> list[str]:
        """Parameters (or fused shards) that `load_weights` has not filled."""
        missing = []
        for name, p in self.named_parameters():
            shards = ("q", "k", "v") if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias") \
                else ("gate", "up") if name.endswith("gate_up_proj.weight") else (None,)
            missing += [f"{name}[{s}]" if s else name for s in shards if (name, s) not in self._filled]
        return missing

    def _check_position_table(self, stored: torch.Tensor) -> None:
        # The stored table's t=0 rows must equal ours (the goldens show they are bit-identical).
        if stored.is_meta:
            return
        size = self.config.latent.max_latent_size
        ours = latent_pos_embed(self.config.llm.hidden_size, (1, size, size))
        rows = stored[: size * size].float().cpu()
        diff = (rows - ours).abs().max().item() if rows.shape == ours.shape else float("inf")
        if diff > 1e-4:
            log.warning("stored latent_pos_embed differs from the recomputed sin-cos table (max |diff| %.3g); "
                        "using the recomputed table as upstream does", diff)
